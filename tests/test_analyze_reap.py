"""A run killed with SIGKILL cannot clean up; the next run removes what it left.

The sample container carries its owner (host/pid/start time). After `kill -9` of
estargz-opt mid-run, its monitor process is gone at once (it dies with its parent, and
the rootfs mount with its namespace), but the container, task, snapshot and lease stay in
containerd. The next `optimize` notices that the owner is dead and removes them all,
while a sample container whose owner still runs is left alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from support.cli import cli_argv, cli_env, printed_digest
from support.containerd import optimize
from support.imagefactory import archive_for_ctr, write_busybox_image
from support.tarfactory import build_tar, dir_, reg

from estargz_opt.workload.containerd.runner import OWNER_LABEL, SAMPLE_LABEL

WORKLOAD = ["/bin/busybox", "sh", "-c", "cat /app/data.txt; echo started; sleep 600"]


@pytest.fixture(scope="module")
def image(containerd, busybox_layer: Path, tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("reap")
    app = build_tar([dir_("app/"), reg("app/data.txt", b"data\n")])
    write_busybox_image(base / "layout", "v1", busybox_layer, extra_layers=[app], cmd=WORKLOAD)
    archive_for_ctr(base / "layout", "v1", "localhost/reap:1", base / "img.tar")
    containerd.ctr("images", "import", "--no-unpack", str(base / "img.tar"))
    return "localhost/reap:1"


def _samples(containerd) -> set[str]:
    out = containerd.ctr("containers", "ls", "-q").stdout.split()
    return {c for c in out if c.startswith("estargz-opt-sample-")}


def _state(containerd) -> tuple[set[str], str, list[str]]:
    tasks = containerd.ctr("tasks", "ls").stdout
    snaps = [line.split()[0] for line in containerd.ctr("snapshots", "ls").stdout.splitlines()[1:]]
    return _samples(containerd), tasks, [s for s in snaps if "sample" in s]


def _sample_leases(containerd) -> list[str]:
    rows = containerd.ctr("leases", "ls").stdout.splitlines()[1:]
    return [r for r in rows if SAMPLE_LABEL in r]


def _children(pid: int, needle: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and needle in cmdline:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _start_killed_run(containerd, image: str, target: str) -> tuple[str, list[int]]:
    """Start optimize, wait for the workload to run, SIGKILL estargz-opt.

    Returns the sample container's id and the pids of its monitor process(es)."""
    proc = subprocess.Popen(
        [*cli_argv(), "-a", containerd.address, "optimize", "--oci",
         "--period", "120", "--wait-on-line", "never-printed", image, target],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=cli_env(),
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = [c for c in _samples(containerd)
                       if "RUNNING" in containerd.ctr("tasks", "ls").stdout]
            if running:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the sample container never ran")
        time.sleep(0.5)
        monitors = _children(proc.pid, "estargz_opt.workload.monitor")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    [cid] = running
    return cid, monitors


def test_next_run_removes_what_a_killed_run_left(containerd, image: str) -> None:
    before = _sample_leases(containerd)
    cid, monitors = _start_killed_run(containerd, image, "localhost/reap:killed")
    assert len(monitors) == 1
    # Left in containerd: the container, its running task, its snapshot and lease.
    containers, tasks, snaps = _state(containerd)
    assert cid in containers and cid in tasks and cid in snaps
    assert len(_sample_leases(containerd)) == len(before) + 1
    # Gone with the process: the monitor (and so its namespace and the rootfs mount).
    deadline = time.monotonic() + 5
    while _alive(monitors[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(monitors[0])
    with open("/proc/self/mountinfo") as f:
        assert cid not in f.read()
    # Its temporary directory is named after it and says who owns it.
    tmp = Path(tempfile.gettempdir()) / cid
    assert (tmp / "owner").read_text().split("/")[0] == os.uname().nodename
    info = json.loads(containerd.ctr("containers", "info", cid).stdout)
    assert info["Labels"][SAMPLE_LABEL] == "1"
    assert info["Labels"][OWNER_LABEL].split("/")[0] == os.uname().nodename

    res = optimize(containerd, "--oci", "--period", "2", image, "localhost/reap:next")
    printed_digest(res)
    assert f"removing sample container {cid}" in res.stderr
    containers, tasks, snaps = _state(containerd)
    assert not containers and cid not in tasks and not snaps
    assert _sample_leases(containerd) == before
    # The killed run's own lease (the one optimize holds while it converts) is gone too.
    rows = containerd.ctr("leases", "ls").stdout.splitlines()[1:]
    assert not [r for r in rows if "estargz-opt" in r], rows
    assert not tmp.exists()
    assert "localhost/reap:killed" not in containerd.ctr("images", "ls", "-q").stdout


def test_a_running_owners_container_is_left_alone(containerd, image: str) -> None:
    """Two runs at once: the second must not reap the first's live container."""
    first = subprocess.Popen(
        [*cli_argv(), "-a", containerd.address, "optimize", "--oci",
         "--period", "8", image, "localhost/reap:first"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=cli_env(),
    )
    try:
        deadline = time.monotonic() + 60
        while not _samples(containerd) and time.monotonic() < deadline:
            time.sleep(0.2)
        [cid] = _samples(containerd)
        second = optimize(containerd, "--oci", "--period", "1", image, "localhost/reap:second")
        printed_digest(second)
        assert f"removing sample container {cid}" not in second.stderr
        _out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, err
    assert cid not in _samples(containerd)
    assert not _samples(containerd)
