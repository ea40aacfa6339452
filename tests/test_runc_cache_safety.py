"""The runc runner's directories and hostile trees.

- An image's setuid/setgid files and file capabilities, kept in the unpacked-layer cache
  (the workload may need them: it sees them as the image has them) and, with
  --no-cache, in the run directory: an unprivileged user can neither reach nor execute
  any of them, during the run or after it, while everything above stays reachable.
- `--cache-dir` moves the unpacked-layer directory, which is 0700: another user cannot
  plant a file in a cached layer's world-writable directory either.
- A 1,100-level directory image: the run succeeds (its file recorded), leaves nothing,
  with or without the cache, and the next run of another image succeeds; the same
  with the rootless runner, whose monitor walks the tree for its handle map.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import analyzeimages as ai, imagefactory as f
from support.cli import cli_argv, cli_env, run_cli
from support.runnerlib import RunLeftovers
from support.unprivileged import UID, make_unprivileged, setpriv

pytestmark = [pytest.mark.interop, pytest.mark.root]

SPECIAL = ("app/suid", "app/sgid", "app/cap")


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user can reach (as /var/cache or /tmp are): the cache and
    $TMPDIR go under it, so what keeps another user out is estargz-opt's doing."""
    d = Path(tempfile.mkdtemp(prefix="estargz-opt-safety-", dir="/tmp"))
    d.chmod(0o755)
    (d / "tmp").mkdir(mode=0o1777)
    (d / "tmp").chmod(0o1777)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=True)  # deeper than shutil.rmtree goes


@pytest.fixture(scope="module")
def special_layer(tmp_path_factory) -> bytes:
    """app/suid (4755), app/sgid (2755), app/cap (cap_net_raw+ep): busybox copies owned by
    root, made and archived by the real tools (GNU tar keeps the capability xattr)."""
    src = tmp_path_factory.mktemp("special")
    (src / "app").mkdir()
    for name, mode in (("suid", 0o4755), ("sgid", 0o2755), ("cap", 0o755)):
        shutil.copy("/usr/bin/busybox", src / "app" / name)
        os.chown(src / "app" / name, 0, 0)
        (src / "app" / name).chmod(mode)
    subprocess.run(["setcap", "cap_net_raw+ep", str(src / "app" / "cap")], check=True)
    (src / "app" / "tmp").mkdir()
    (src / "app" / "tmp").chmod(0o1777)  # as an image's /tmp: anyone may write there
    return subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=security.capability", "--numeric-owner",
         "-C", str(src), "-cf", "-", "app"], check=True, capture_output=True).stdout


def _special_files(top: Path) -> list[Path]:
    """Files under `top` with a setuid/setgid bit or a file capability (found as root)."""
    found = []
    for dirpath, _, files in os.walk(top):
        for name in files:
            p = Path(dirpath, name)
            st = p.lstat()
            has_cap = False
            with contextlib.suppress(OSError):
                has_cap = bool(os.getxattr(p, "security.capability", follow_symlinks=False))
            if st.st_mode & 0o6000 or has_cap:
                found.append(p)
    return found


def _as_user(paths: list[Path], control: Path) -> str:
    """What an unprivileged user (no capabilities, but a bounding set that a setuid
    binary could use) meets trying to reach and run each path; `control` must be
    reachable, or the check proves nothing."""
    script = ('[ -e "$1" ] && echo "CONTROL reached"; shift\n'
              'for p in "$@"; do\n'
              '  if [ -e "$p" ]; then echo "REACHED $p"; fi\n'
              '  echo "RUN $p: $("$p" 2>&1 | head -1)"\n'
              'done\n')
    res = subprocess.run([*setpriv(UID, UID, setuid_helpers=True), "/bin/sh", "-c", script,
                          "sh", str(control), *map(str, paths)],
                         capture_output=True, text=True, timeout=60, check=False)
    return res.stdout + res.stderr


def _check_unreachable(base: Path, want_at_least: int) -> list[Path]:
    found = _special_files(base)
    assert len(found) >= want_at_least, f"the image's special files are not here: {found}"
    seen = _as_user(found, base / "tmp")
    assert "CONTROL reached" in seen, seen
    assert "REACHED" not in seen, seen
    runs = [line for line in seen.splitlines() if line.startswith("RUN ")]
    assert len(runs) == len(found) and all("Permission denied" in r for r in runs), seen
    return found


@pytest.mark.parametrize("cache", ["cache", "no-cache"])
def test_setuid_files_are_out_of_other_users_reach(
    cache: str, busybox_layer: Path, special_layer: bytes, base: Path
) -> None:
    layout = base / "layout"
    f.write_layout(layout, "v1", [busybox_layer.read_bytes(), special_layer],
                   ai.config(["/bin/sh", "-c",
                              "stat -c '%a %n' /app/suid /app/sgid; echo READY; "
                              "exec /bin/busybox sleep 1000"]))
    leftovers = RunLeftovers(base / "tmp" / "run")
    leftovers.tmpdir.chmod(0o1777)
    flags = ["--cache-dir", str(base / "cache")] if cache == "cache" else ["--no-cache"]
    err = base / "err"
    with open(err, "wb") as e:
        proc = subprocess.Popen(
            [*cli_argv(), "analyze", "--runner", "runc", *flags,
             "--wait-on-signal", "--record-out", str(base / "r.jsonl"), f"oci:{layout}:v1"],
            env=cli_env(leftovers.tmpdir), stdout=subprocess.DEVNULL, stderr=e,
            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while "READY" not in err.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.2)
        # the workload sees the bits as the image has them (stripping would change it)
        assert "4755 /app/suid" in err.read_text() and "2755 /app/sgid" in err.read_text()
        # during the run: in the unpacked-layer cache, or in the run directory
        found = _check_unreachable(base, len(SPECIAL))
        where = base / "cache" / "unpacked" if cache == "cache" else leftovers.tmpdir
        assert all(where in p.parents for p in found), found
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, err.read_text()
    leftovers.check()
    if cache == "cache":
        unpacked = base / "cache" / "unpacked"
        assert (unpacked.stat().st_mode & 0o777) == 0o700
        # after the run, the layers stay (for the next run), still out of reach
        _check_unreachable(base, len(SPECIAL))
        # nor can another user plant a file in a cached layer through its world-writable
        # /tmp (every later container would see it): stripping setuid bits would not
        # have stopped that, a 0700 directory does
        [tmp] = [p for p in unpacked.glob("*/app/tmp")]
        res = subprocess.run([*setpriv(UID, UID), "/bin/sh", "-c", f"echo x > {tmp}/planted"],
                             capture_output=True, text=True, timeout=30, check=False)
        assert res.returncode != 0 and "Permission denied" in res.stderr, res
        assert not (tmp / "planted").exists()
    else:
        assert _special_files(base) == [], "--no-cache kept an unpacked layer"


def test_a_cache_dir_someone_else_owns_is_not_used(busybox_layer: Path,
                                                   special_layer: bytes, base: Path) -> None:
    """An `unpacked` directory another user owns, or one in a directory another user
    owns (who could plant or reach layers, or swap the directory): not used; the run
    unpacks into its own run directory, and says so."""
    layout = base / "layout"
    f.write_layout(layout, "v1", [busybox_layer.read_bytes(), special_layer],
                   ai.config(["/bin/sh", "-c", "echo ran"]))
    leftovers = RunLeftovers(base / "tmp" / "run")
    for owned in ("unpacked", "cache"):  # the directory, or the one that holds it
        cache = base / owned / "cache"
        planted = cache / "unpacked"
        planted.mkdir(parents=True, mode=0o700)
        os.chown(cache if owned == "cache" else planted, UID, UID)
        res = run_cli("analyze", "--runner", "runc", "--cache-dir", cache,
                      "--record-out", base / "r.jsonl", f"oci:{layout}:v1",
                      env=cli_env(leftovers.tmpdir))
        assert res.returncode == 0, res.stderr
        assert "ran" in res.stderr and "unpacking for this run only" in res.stderr, res.stderr
        assert f"uid {os.geteuid()}" in res.stderr, res.stderr
        assert list(planted.iterdir()) == []
        leftovers.check()


DEPTH = 1_100


def _deep_layer() -> bytes:
    """A chain of 1,100 directories with a file at the bottom."""
    chain = "/".join(["d"] * DEPTH)
    return ai.layer([ai.file(f"{chain}/bottom.txt", "deep\n"),
                     ai.script("app/run.sh", f"cat /{chain}/bottom.txt\necho deep-done\n")])


def test_a_1100_level_tree_then_another_image(busybox_layer: Path, base: Path) -> None:
    busybox = busybox_layer.read_bytes()
    layout = base / "layout"
    f.write_layout(layout, "deep", [busybox, _deep_layer()], ai.config(["/bin/sh", "/app/run.sh"]))
    f.write_layout(layout, "plain", [busybox, ai.layer([ai.script("app/run.sh", "echo plain\n")])],
                   ai.config(["/bin/sh", "/app/run.sh"]))
    leftovers = RunLeftovers(base / "tmp" / "run")
    env = cli_env(leftovers.tmpdir)
    cache = base / "cache"
    for flags in (["--cache-dir", str(cache)], ["--no-cache"]):
        record = base / "deep.jsonl"
        started = time.monotonic()
        res = run_cli("analyze", "--runner", "runc", *flags, "--record-out", record,
                      f"oci:{layout}:deep", env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        assert "deep-done" in res.stderr, res.stderr
        recorded = [json.loads(line) for line in record.read_text().splitlines()]
        assert {"path": "/".join(["d"] * DEPTH) + "/bottom.txt", "layerIndex": 1}.items() <= \
            next(r for r in recorded if r["path"].endswith("bottom.txt")).items()
        assert time.monotonic() - started < 120
        leftovers.check()
        assert not [n for n in os.listdir(cache / "unpacked") if n.endswith(".tmp")] \
            if cache.exists() else True, "a partial unpack was left"
        res = run_cli("analyze", "--runner", "runc", *flags, "--record-out",
                      base / "plain.jsonl", f"oci:{layout}:plain", env=env)
        assert res.returncode == 0 and "plain" in res.stderr, res.stderr
        leftovers.check()


def test_a_partial_unpack_that_cannot_be_removed_blocks_no_run(busybox_layer: Path,
                                                               base: Path) -> None:
    """A dead run's fill that cannot be removed (a mount inside it: EBUSY): each run
    says so in a warning and goes on; once it can be, the next run removes it."""
    layout = base / "layout"
    f.write_layout(layout, "v1", [busybox_layer.read_bytes()],
                   ai.config(["/bin/sh", "-c", "echo ran"]))
    dead = subprocess.Popen(["true"])
    dead.wait()
    fill = base / "cache" / "unpacked" / f".unpack@{socket.gethostname()}@{dead.pid}@1@x.tmp"
    (fill / "busy").mkdir(parents=True, mode=0o700)
    (base / "cache" / "unpacked").chmod(0o700)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(fill / "busy")], check=True)
    leftovers = RunLeftovers(base / "tmp" / "run")
    argv = ["analyze", "--runner", "runc", "--cache-dir", base / "cache",
            "--record-out", base / "r.jsonl", f"oci:{layout}:v1"]
    try:
        for _ in range(2):
            res = run_cli(*argv, env=cli_env(leftovers.tmpdir))
            assert res.returncode == 0 and "ran" in res.stderr, res.stderr
            assert "cannot remove a partial unpack" in res.stderr, res.stderr
            assert fill.exists()
    finally:
        subprocess.run(["umount", str(fill / "busy")], check=True)
    res = run_cli(*argv, env=cli_env(leftovers.tmpdir))
    assert res.returncode == 0 and "cannot remove" not in res.stderr, res.stderr
    assert not fill.exists()
    leftovers.check()


def test_the_rootless_runner_on_a_1100_level_tree(busybox_layer: Path) -> None:
    user = make_unprivileged()
    try:
        busybox = busybox_layer.read_bytes()
        layout = user.home / "layout"
        f.write_layout(layout, "deep", [busybox, _deep_layer()],
                       ai.config(["/bin/sh", "/app/run.sh"]))
        f.write_layout(layout, "plain",
                       [busybox, ai.layer([ai.script("app/run.sh", "echo plain\n")])],
                       ai.config(["/bin/sh", "/app/run.sh"]))
        user.give(layout)
        record = user.home / "deep.jsonl"
        res = user.run("analyze", "--runner", "rootless", "--record-out", record,
                       f"oci:{layout}:deep", timeout=300)
        assert res.returncode == 0 and "deep-done" in res.stderr, res.stderr
        assert any(json.loads(line)["path"].endswith("/d/bottom.txt")
                   for line in record.read_text().splitlines()), record.read_text()
        res = user.run("analyze", "--runner", "rootless", "--record-out",
                       user.home / "plain.jsonl", f"oci:{layout}:plain")
        assert res.returncode == 0 and "plain" in res.stderr, res.stderr
        assert os.listdir(user.tmpdir) == []
    finally:
        user.remove()
