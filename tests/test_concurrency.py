"""Concurrent and killed runs of ``optimize`` never lose another run's work.

* Four runs at once into one existing OCI layout, with different tags, all keep their tag,
  20 rounds out of 20 (index.json is updated under a lock and re-read under it).
* Run A starts into a new layout, run B writes a tag into it, then A is interrupted:
  A's rollback leaves B's image whole and verifying, whether B has finished or is still
  writing (and depends on a blob A added).
* SIGKILL at random points of a run into an OCI layout, each followed by a rerun
  (tests/support/kill_and_rerun.py): no ``*.tmp`` is left and the result verifies.
* Three runs at once converting the same image in one containerd all succeed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import imagefactory as f
from support.cli import cli_argv, cli_env, printed_digest
from support.containerd import Containerd, active, import_layout, leases
from support.ociimage import image_target

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CLI = cli_argv()
BIG = 24 << 20  # a layer that takes a while to compress and write: time to interrupt


def start(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            env=cli_env())


def finish(proc: subprocess.Popen, timeout: float = 180) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} did not end within {timeout} s\n{err}", pytrace=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def verify(layout: Path, tag: str) -> dict:
    res = subprocess.run([*CLI, "verify", "--json", f"oci:{layout}:{tag}"], capture_output=True,
                         text=True, env=cli_env(), timeout=180)
    assert res.returncode == 0, f"verify oci:{layout}:{tag} failed:\n{res.stdout}\n{res.stderr}"
    report = json.loads(res.stdout)
    assert report["ok"], report
    return report


def unreferenced_warnings(report: dict) -> list[str]:
    return [w for w in report["warnings"] if "referenced by no image" in w]


@pytest.fixture(scope="module")
def small(tmp_path_factory, busybox_layer: Path) -> Path:
    """busybox + a small data layer, tag t: quick runs whose index updates collide."""
    layout = tmp_path_factory.mktemp("small") / "layout"
    f.write_busybox_image(layout, "t", busybox_layer,
                          extra_layers=[f.simple_layer({"d/": None, "d/a.txt": b"a\n"})])
    return layout


@pytest.fixture(scope="module")
def slow(tmp_path_factory, busybox_layer: Path) -> Path:
    """busybox + BIG random bytes (uncompressed), tag t: a run that takes seconds to write."""
    layout = tmp_path_factory.mktemp("slow") / "layout"
    f.write_busybox_image(layout, "t", busybox_layer, extra_layers=[
        f.simple_layer({"big/": None, "big/random.bin": os.urandom(BIG)})])
    return layout


# --- four runs, one layout, four tags ---------------------------------------------------------

# Two runs write the same blobs (one finds them present and skips them), two others.
VARIANTS = [[], [], ["--zstdchunked"], ["--estargz-chunk-size", "1048576"]]


def test_concurrent_runs_keep_every_tag(small: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    f.write_layout(dst, "keep", [f.simple_layer({"keep.txt": b"keep\n"})])
    rounds, lost = 20, []
    for r in range(rounds):
        procs = [start("optimize", "--oci", "--no-optimize", *opts, f"oci:{small}:t",
                       f"oci:{dst}:r{r}-{i}") for i, opts in enumerate(VARIANTS)]
        for p in [finish(p) for p in procs]:
            assert p.returncode == 0, p.stderr
        want = {f"r{r}-{i}" for i in range(len(VARIANTS))}
        lost += sorted(want - set(f.tags(dst)))
    assert lost == [], f"tags lost in {len({t.split('-')[0] for t in lost})} of {rounds} rounds"
    assert len(f.tags(dst)) == 1 + rounds * len(VARIANTS)
    for tag in f.tags(dst):
        for digest in f.referenced_digests(dst, tag):
            assert f.blob_path(dst, digest).is_file(), (tag, digest)
    for i in range(len(VARIANTS)):
        verify(dst, f"r{rounds - 1}-{i}")
    assert f.tmp_files(dst) == []


# --- A's rollback and B's image ---------------------------------------------------------------

def wait_for_big_write(dst: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the big layer's temporary file holds a few MB (the busybox one is ~1 MB)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its big layer was half-written:\n"
                        f"{finish(proc).stderr}", pytrace=False)
        blobs = dst / "blobs" / "sha256"
        with_tmp = [p for p in blobs.glob(".*.tmp") if p.stat().st_size > 4 << 20] \
            if blobs.is_dir() else []
        if with_tmp:
            return
        time.sleep(0.01)
    pytest.fail("the big layer's temporary file never showed up", pytrace=False)


def interrupt(proc: subprocess.Popen) -> None:
    """Ctrl-C for a run stopped with SIGSTOP (it takes the signal as it resumes)."""
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("b_state", ["finished", "running"])
def test_rollback_keeps_the_image_another_run_wrote(b_state: str, slow: Path, small: Path,
                                                    tmp_path: Path) -> None:
    dst = tmp_path / "new"
    a = start("optimize", "--oci", "--no-optimize", f"oci:{slow}:t", f"oci:{dst}:a")
    wait_for_big_write(dst, a)
    a.send_signal(signal.SIGSTOP)  # A is mid-run, with the busybox blob in place
    # B converts the same busybox layer: its blob is one A added, which B skips writing.
    if b_state == "finished":
        b = start("optimize", "--oci", "--no-optimize", f"oci:{small}:t", f"oci:{dst}:b")
        assert finish(b).returncode == 0
        verify(dst, "b")
    else:
        b = start("optimize", "--oci", "--no-optimize", f"oci:{slow}:t", f"oci:{dst}:b")
        # B writes its own big temporary file (A's is still there: two of them)
        deadline = time.monotonic() + 120
        while len([p for p in (dst / "blobs" / "sha256").glob(".*.tmp")
                   if p.stat().st_size > 1 << 20]) < 2:
            assert time.monotonic() < deadline and b.poll() is None, \
                "B never wrote while A was stopped"
            time.sleep(0.01)
        b.send_signal(signal.SIGSTOP)
    interrupt(a)
    done_a = finish(a)
    assert done_a.returncode == 130, done_a.stderr
    if b_state == "running":
        assert "other runs writing into it" in done_a.stderr, done_a.stderr
        b.send_signal(signal.SIGCONT)
        assert finish(b).returncode == 0
    assert f.tags(dst) == ["b"]
    report = verify(dst, "b")
    assert f.tmp_files(dst) == []
    if b_state == "finished":
        # A was alone when it rolled back: it removed what B does not use.
        assert unreferenced_warnings(report) == [], report["warnings"]


@pytest.mark.parametrize("signo", [signal.SIGINT, signal.SIGTERM], ids=["int", "term"])
def test_a_signal_mid_run_exits_128_plus_it_and_rolls_back(
    slow: Path, tmp_path: Path, signo: int
) -> None:
    """As shells report a signal: 130 for Ctrl-C, 143 for SIGTERM; one line either way."""
    dst = tmp_path / "new"
    a = start("--log-level", "warning", "optimize", "--oci", "--no-optimize", "--quiet",
              f"oci:{slow}:t", f"oci:{dst}:a")
    wait_for_big_write(dst, a)
    a.send_signal(signo)
    done = finish(a)
    assert (done.returncode, done.stderr) == (128 + signo, "estargz-opt: error: interrupted\n")
    assert not dst.exists(), sorted(p.name for p in dst.rglob("*"))


def test_rollback_of_a_new_layout_nobody_else_used_removes_it(slow: Path, tmp_path: Path) -> None:
    dst = tmp_path / "new"
    a = start("optimize", "--oci", "--no-optimize", f"oci:{slow}:t", f"oci:{dst}:a")
    wait_for_big_write(dst, a)
    a.send_signal(signal.SIGSTOP)
    interrupt(a)
    assert finish(a).returncode == 130
    assert not dst.exists(), sorted(p.name for p in dst.rglob("*"))


# --- SIGKILL and rerun ------------------------------------------------------------------------

def test_killed_runs_leave_no_tmp_after_a_rerun(slow: Path, tmp_path: Path) -> None:
    """The first 5 of support/kill_and_rerun.py's 20 points (its seed fixed), checked here."""
    script = Path(__file__).resolve().parent / "support" / "kill_and_rerun.py"
    res = subprocess.run([sys.executable, str(script), str(slow),
                          "t", str(tmp_path), "--kills", "5", "--seed", "17"],
                         capture_output=True, text=True, env=cli_env(), timeout=900)
    summary = json.loads(res.stdout)
    assert res.returncode == 0, json.dumps(summary, indent=1) + res.stderr
    assert summary["kills"] == 5 and summary["reruns_ok"] == 5, summary
    # The kills landed while the layout was being written, not before or after.
    assert summary["kills_leaving_tmp"] + summary["kills_leaving_blobs"] > 0, summary
    for i in range(5):
        dst = tmp_path / f"dst-{i}"
        assert f.tmp_files(dst) == [], (i, f.tmp_files(dst))
        assert unreferenced_warnings(verify(dst, "t")) == []


def test_dead_runs_temp_files_are_removed_live_ones_kept(small: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    f.write_layout(dst, "keep", [f.simple_layer({"keep.txt": b"keep\n"})])
    blobs = dst / "blobs" / "sha256"
    host = os.uname().nodename
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(f"/proc/{os.getpid()}/stat") as st:
        me = st.read().rsplit(")", 1)[1].split()[19]
    files = {
        "dead": blobs / f".ingest@{host}@{dead.pid}@1@abc.tmp",
        "dead-index": dst / f".index.json@{host}@{dead.pid}@1@abc.tmp",
        "alive": blobs / f".ingest@{host}@{os.getpid()}@{me}@abc.tmp",
        "other-host": blobs / f".ingest@elsewhere.example@{dead.pid}@1@abc.tmp",
    }
    for p in files.values():
        p.write_bytes(b"partial")
    res = subprocess.run([*CLI, "optimize", "--oci", "--no-optimize", f"oci:{small}:t",
                          f"oci:{dst}:x"], capture_output=True, text=True, env=cli_env())
    assert res.returncode == 0, res.stderr
    assert {k for k, p in files.items() if p.exists()} == {"alive", "other-host"}


def test_verify_reports_unreferenced_blobs(small: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    res = subprocess.run([*CLI, "optimize", "--oci", "--no-optimize", f"oci:{small}:t",
                          f"oci:{dst}:x"], capture_output=True, text=True, env=cli_env())
    assert res.returncode == 0, res.stderr
    assert unreferenced_warnings(verify(dst, "x")) == []
    digest, size = f.put_blob(dst, b"left by an interrupted run\n" * 10)
    [warning] = unreferenced_warnings(verify(dst, "x"))
    assert f"1 blob(s) ({size} bytes)" in warning and digest in warning, warning


# --- three runs, one containerd ---------------------------------------------------------------

@pytest.fixture
def same_image(containerd: Containerd, busybox_layer: Path, tmp_path: Path) -> Iterator[str]:
    """busybox + BIG random bytes: a layer whose ingest is open for a while."""
    layout = tmp_path / "layout"
    f.write_busybox_image(layout, "v1", busybox_layer, extra_layers=[
        f.simple_layer({"big/": None, "big/random.bin": os.urandom(BIG)})])
    name = f"localhost/concurrent-{os.getpid()}:1"
    import_layout(containerd, layout, "v1", name, tmp_path / "image.tar")
    yield name
    containerd.ctr("images", "rm", name)


def test_concurrent_conversions_in_one_containerd(containerd: Containerd,
                                                  same_image: str) -> None:
    """The first run is stopped while it holds the big layer's ingest, as a long upload
    would: the others must not wait for it (they used to fail with 'locked' after 10 s)."""
    before = {lease for lease, _ in leases(containerd)}
    dsts = [f"{same_image}-esgz{i}" for i in range(3)]

    def run(dst: str) -> subprocess.Popen:
        return start("-a", containerd.address, "optimize", "--oci", "--no-optimize",
                     same_image, dst)

    first = run(dsts[0])
    deadline = time.monotonic() + 120
    while not [n for ref, n in active(containerd).items()
               if ref.startswith("estargz-opt-") and n >= 2e6]:
        assert time.monotonic() < deadline and first.poll() is None, \
            "the first run never held the big layer's ingest"
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)
    try:
        others = [finish(run(dst)) for dst in dsts[1:]]
    finally:
        first.send_signal(signal.SIGCONT)
    digests = {printed_digest(p) for p in [*others, finish(first)]}
    assert len(digests) == 1, "the same conversion gave different images"
    for dst in dsts:
        assert image_target(containerd, dst) in digests
    assert [x for x in active(containerd) if x.startswith("estargz-opt-")] == []
    assert [x for x, _ in leases(containerd) if x not in before] == []
    for dst in dsts:
        containerd.ctr("images", "rm", dst)
