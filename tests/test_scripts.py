"""Checks of the test harness itself: scripts/, the private containerd, the
reference ctr-remote and the test layers. They need no estargz-opt code, so a
failure here points at the set-up rather than at the format engine."""

from __future__ import annotations

import gzip
import os
import subprocess
import tarfile
from pathlib import Path, PurePosixPath

import pytest
from support.containerd import (
    SCRIPTS,
    Containerd,
    containerd_unavailable_reason,
    file_digest,
)
from support.layers import BIG_SIZE, LONG_NAME

pytestmark = pytest.mark.root


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and entry.name != str(os.getpid()):
            found.append(int(entry.name))
    return found


def test_shell_scripts_parse() -> None:
    for script in sorted(SCRIPTS.glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_containerd_up_down_leaves_nothing(tmp_path: Path) -> None:
    reason = containerd_unavailable_reason()
    if reason:
        pytest.skip(reason)
    directory = tmp_path / "c"
    daemon = Containerd.start(directory)
    try:
        assert Path(daemon.address).is_socket()
        version = daemon.ctr("version").stdout
        assert "Server:" in version
        toml = (directory / "containerd.toml").read_text()
        assert '"io.containerd.grpc.v1.cri"' in toml
        assert _processes_mentioning(str(directory / "containerd.toml"))
    finally:
        daemon.stop()
    assert not directory.exists()
    assert not _mounts_under(directory)
    assert not _processes_mentioning(str(directory / "containerd.toml"))
    # Stopping twice is harmless.
    subprocess.run(["bash", str(SCRIPTS / "containerd-down.sh"), str(directory)], check=True,
                   capture_output=True)


def test_ingest_keeps_blob(containerd, tmp_path: Path) -> None:
    blob = tmp_path / "blob.gz"
    blob.write_bytes(gzip.compress(os.urandom(4096)))
    digest = containerd.ingest(blob)
    assert digest == file_digest(blob)
    got = containerd.ctr("content", "get", digest, input=b"").stdout
    assert got == blob.read_bytes()
    assert digest in containerd.ctr("content", "ls", "-q").stdout.split()


def test_ctr_remote_runs(ctr_remote: Path) -> None:
    res = subprocess.run([str(ctr_remote), "images", "get-toc-digest", "--help"],
                         capture_output=True, text=True, check=True)
    assert "--zstdchunked" in res.stdout
    stamp = ctr_remote.parent.parent.parent / "PACKAGE-VERSION"
    if stamp.exists():
        assert stamp.read_text().startswith("0.14.3")


def test_ctr_remote_rejects_non_estargz(containerd, ctr_remote: Path, tmp_path: Path) -> None:
    """Sanity of the reader side: a plain gzip blob has no eStargz footer."""
    blob = tmp_path / "plain.gz"
    blob.write_bytes(gzip.compress(b"x" * 100000))
    digest = containerd.ingest(blob)
    res = subprocess.run([str(ctr_remote), "-a", containerd.address, "-n", "default",
                          "images", "get-toc-digest", digest],
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "footer" in res.stderr


def _check_parents_have_entries(members: list[tarfile.TarInfo]) -> None:
    seen_dirs = set()
    for m in members:
        path = PurePosixPath(m.name)
        assert not m.name.startswith(("/", "./")), m.name
        for parent in list(path.parents)[:-1]:
            assert str(parent) in seen_dirs, f"{m.name}: parent {parent} has no earlier entry"
        if m.isdir():
            seen_dirs.add(str(path))


def test_busybox_layer_layout(busybox_layer: Path) -> None:
    with tarfile.open(busybox_layer) as tar:
        members = tar.getmembers()
    _check_parents_have_entries(members)
    by_name = {m.name: m for m in members}
    assert by_name["bin"].isdir()
    assert by_name["bin/busybox"].isreg() and by_name["bin/busybox"].size > 500_000
    assert by_name["bin/sh"].issym() and by_name["bin/sh"].linkname == "busybox"


def test_synthetic_layer_layout(synthetic_layer: Path) -> None:
    with tarfile.open(synthetic_layer) as tar:
        members = tar.getmembers()
    _check_parents_have_entries(members)
    by_name = {m.name: m for m in members}
    assert by_name["data/big.bin"].size == BIG_SIZE
    assert by_name["links/hard"].islnk() and by_name["links/hard"].linkname == "data/small1.txt"
    assert by_name["links/sym"].issym()
    assert by_name["data/xattr.txt"].pax_headers["SCHILY.xattr.user.foo"] == "bar"
    assert len(LONG_NAME) > 100 and by_name[LONG_NAME].isreg()
