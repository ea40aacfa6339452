"""What `optimize` says on stderr is true: a misspelled transport is named as such, an
interrupted layer is never reported done, and a layer's totals are its real sizes."""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import imagefactory as f
from support.cli import cli_argv

pytestmark = pytest.mark.unit

ERROR = "estargz-opt: error:"


def cli(*args: str | Path, tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_argv(*args),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=os.environ | {"TMPDIR": str(tmp)}, timeout=timeout)


@pytest.mark.parametrize(("ref", "meant"), [
    ("docker:/localhost:5000/app:1", "docker://"),
    ("oci-archive//tmp/app.tar", "oci-archive:"),
    ("docker-archive//tmp/app.tar", "docker-archive:"),
    ("dokcer:/x", None),
])
@pytest.mark.parametrize("side", ["source", "destination"])
def test_misspelled_transport_is_a_usage_error(tmp_path: Path, ref: str, meant: str | None,
                                               side: str) -> None:
    """Not taken for a containerd name: no socket is tried (-a names one that does not
    exist, which would be the error otherwise), and the reference is named."""
    other = f"oci:{tmp_path / 'layout'}:t"
    src, dst = (ref, other) if side == "source" else (other, ref)
    started = time.monotonic()
    proc = cli("-a", tmp_path / "no-containerd.sock", "optimize", "--no-optimize", src, dst,
               tmp=tmp_path)
    assert time.monotonic() - started < 30
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(ERROR) and repr(ref) in line and "is not a transport" in line, line
    if meant:
        assert f"did you mean {meant}?" in line, line
    assert "containerd.sock" not in line and "socket" not in line, line
    assert list(tmp_path.iterdir()) == []


def test_names_that_look_alike_stay_containerd_names(tmp_path: Path) -> None:
    """`docker:latest` is a valid name (docker.io/library/docker:latest): containerd is
    asked for it, and it is that socket the error then names."""
    proc = cli("-a", tmp_path / "none.sock", "optimize", "--no-optimize", "docker:latest",
               "docker:latest-esgz", tmp=tmp_path)
    assert proc.returncode != 0
    assert "is not a transport" not in proc.stderr and "none.sock" in proc.stderr, proc.stderr


def _done_lines(stderr: str) -> dict[str, str]:
    return dict(re.findall(r"layer (sha256:[0-9a-f]{64}) done: (.*)", stderr))


def test_done_line_reports_the_whole_tar(tmp_path: Path) -> None:
    """A small layer: its tar's record padding is not rewritten, and it is no 0.0 MiB."""
    tars = [f.simple_layer({"a/": None, "a/x": b"x" * 3000}),
            f.simple_layer({"b/": None, "b/y": os.urandom(70_000)})]
    layout = tmp_path / "src"
    info = f.put_image_manifest(layout, tars)
    f.tag_descriptor(layout, "t", info.descriptor)
    proc = cli("optimize", "--oci", "--no-optimize", f"oci:{layout}:t",
               f"oci:{tmp_path / 'out'}:t", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    done = _done_lines(proc.stderr)
    assert set(done) == set(info.layer_digests), proc.stderr
    for digest, tar in zip(info.layer_digests, tars, strict=True):
        assert done[digest].startswith(f"{len(tar) / 1024:.1f} KiB of tar in, "), done[digest]
        assert re.search(r"of tar in, [1-9][\d.]* (B|KiB) out in ", done[digest]), done[digest]
    assert "0.0 MiB" not in proc.stderr and "%" not in "".join(done.values()), proc.stderr


def test_interrupted_layer_is_not_reported_done(tmp_path: Path) -> None:
    """Ctrl-C while a big layer converts: 'interrupted', never 'done' for that layer."""
    tar = f.simple_layer({"big/": None, "big/random": os.urandom(96 << 20)})
    layout = f.init_layout(tmp_path / "src")
    digest, size = f.put_blob(layout, gzip.compress(tar, compresslevel=1))
    info = f.put_image_manifest(layout, [])  # a config and manifest to rewrite below
    manifest = f.read_json(layout, info.digest)
    config = f.read_json(layout, manifest["config"]["digest"])
    config["rootfs"]["diff_ids"] = [f.sha256_digest(tar)]
    c_digest, c_size = f.put_json(layout, config)
    manifest["config"] = f.descriptor(f.OCI_CONFIG, c_digest, c_size)
    manifest["layers"] = [f.descriptor(f.OCI_LAYER_GZIP, digest, size)]
    m_digest, m_size = f.put_json(layout, manifest)
    f.tag_descriptor(layout, "big", f.descriptor(f.OCI_MANIFEST, m_digest, m_size))
    del tar
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*cli_argv(), "optimize", "--oci", "--no-optimize",
         f"oci:{layout}:big", f"oci:{out}:t"],
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        text=True, env=os.environ | {"TMPDIR": str(tmp_path)})
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if f"converting layer {digest}" in line:
            # The layer is under way once this line is out (the old code logged "done"
            # for it however early it was stopped); a 96 MiB random tar takes seconds.
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=60)[1]
    stderr = "".join(seen) + rest
    assert proc.returncode == 130, stderr
    assert stderr.splitlines()[-1] == f"{ERROR} interrupted", stderr
    assert _done_lines(stderr) == {}, stderr
    assert not (out / "index.json").exists() or "t" not in f.tags(out)
