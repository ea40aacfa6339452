"""Stopping is prompt, with the runners that need no containerd: the rootless runner as an
unprivileged uid with no capabilities (setpriv), the runc runner as root.

* Ctrl-C typed on the command's terminal (a pty, so the whole foreground process group
  gets it) and SIGTERM end a run within 2 s, with the one "interrupted" line, and leave
  nothing behind;
* a cleanup step that takes longer (a runtime wrapper whose `delete` takes 3 s) is named
  after a second, and a second Ctrl-C meanwhile names it instead of cutting it short;
* the rootless runner ends its workload within 1 s of the period's end, and as fast as
  the runc runner: on a small image its wall time is within 1.5 s of runc's, and no run
  waits for a workload that did not exit after a signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from support import analyzeimages as ai, imagefactory as f
from support.cli import cli_argv, cli_env
from support.ptyrun import PtyRun
from support.runnerlib import RunLeftovers, sample_containers
from support.unprivileged import Unprivileged, make_unprivileged

pytestmark = pytest.mark.root

APP = "echo ready\nexec /bin/busybox sleep 1000\n"
RUNNERS = ["runc", "rootless"]


@pytest.fixture(scope="module")
def user() -> Iterator[Unprivileged]:
    made = make_unprivileged()
    yield made
    made.remove()


@pytest.fixture(scope="module")
def small(user: Unprivileged, busybox_layer: Path) -> str:
    """A 2 MiB image whose app is ready at once, then sleeps; owned by the user."""
    path = user.home / "small"
    app = ai.layer([ai.script("app/run.sh", APP)])
    f.write_layout(path, "v1", [busybox_layer.read_bytes(), app], ai.config(["/bin/sh",
                                                                             "/app/run.sh"]))
    user.give(path)
    return f"oci:{path}:v1"


def uid_processes(uid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class Run:
    """One runner's command line, environment and leftover check."""

    def __init__(self, runner: str, user: Unprivileged, tmp: Path) -> None:
        self.runner, self.user = runner, user
        self.tmp = user.tmpdir if runner == "rootless" else tmp / "tmp"
        self.leftovers = None if runner == "rootless" else RunLeftovers(self.tmp)

    def argv(self, *args: str | Path, top: tuple[str, ...] = ()) -> list[str]:
        """`analyze --runner RUNNER ARGS`, after the global options `top`."""
        args = (*top, "analyze", "--runner", self.runner, *args)
        if self.runner == "rootless":
            return self.user.argv(*args)
        return cli_argv(*args)

    def env(self) -> dict[str, str]:
        if self.runner == "rootless":
            return self.user.env()
        return cli_env(self.tmp, ESTARGZ_OPT_CACHE_DIR=str(self.tmp.parent / "cache"))

    def check_clean(self) -> None:
        if self.leftovers is not None:
            self.leftovers.check()
            return
        deadline = time.monotonic() + 5
        while uid_processes(self.user.uid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert uid_processes(self.user.uid) == []
        assert os.listdir(self.user.tmpdir) == []


@pytest.mark.parametrize("runner", RUNNERS)
def test_ctrl_c_on_a_terminal(runner: str, user: Unprivileged, small: str,
                              tmp_path: Path) -> None:
    run = Run(runner, user, tmp_path)
    term = PtyRun(run.argv("--period", "60", "--record-out", user.home / "c.jsonl", small),
                  run.env())
    try:
        term.wait_for("ready")
        term.wait_for("60s left")  # the countdown: the run is waiting for the period
        typed = term.type(b"\x03")
        code = term.finish()
    finally:
        term.close()
    took = term.ended - typed
    assert code == 130, term.text
    assert term.text.rstrip().endswith("estargz-opt: error: interrupted"), term.text
    assert took < 2.0, f"Ctrl-C took {took:.2f}s:\n{term.text}"
    run.check_clean()


@pytest.mark.parametrize("runner", RUNNERS)
def test_sigterm(runner: str, user: Unprivileged, small: str, tmp_path: Path) -> None:
    run = Run(runner, user, tmp_path)
    err = user.home / f"err-{runner}"
    with open(err, "wb") as stream:
        proc = subprocess.Popen(
            run.argv("--period", "60", "--record-out", user.home / "t.jsonl", small),
            env=run.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stream,
            start_new_session=True)
    deadline = time.monotonic() + 60
    while "waiting for 60s" not in err.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.05)
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    took = time.monotonic() - sent
    assert code == 143 and err.read_text().rstrip().endswith("error: interrupted"), \
        err.read_text()
    assert took < 2.0, f"SIGTERM took {took:.2f}s:\n{err.read_text()}"
    run.check_clean()


def test_slow_cleanup_is_named(user: Unprivileged, small: str, tmp_path: Path) -> None:
    """A runtime whose `delete` takes 3 s (a wrapper around runc, given as --runtime):
    after Ctrl-C the run says, within about a second, that it is removing the sample
    container; a second Ctrl-C names it again and does not cut it short."""
    wrapper = tmp_path / "slow-delete-runc"
    wrapper.write_text('#!/bin/sh\nfor a; do [ "$a" = delete ] && sleep 3; done\n'
                       'exec runc "$@"\n')
    wrapper.chmod(0o755)
    run = Run("runc", user, tmp_path)
    term = PtyRun(run.argv("--runtime", wrapper, "--period", "60", "--record-out",
                           tmp_path / "s.jsonl", small), run.env())
    try:
        term.wait_for("60s left")
        typed = term.type(b"\x03")
        said = term.wait_for("cleaning up: the sample container")
        term.type(b"\x03")
        term.wait_for("still cleaning up: the sample container (it cannot be cut short)")
        code = term.finish()
    finally:
        term.close()
    assert said - typed < 1.8, term.text
    assert code == 130 and term.text.rstrip().endswith("error: interrupted"), term.text
    assert sample_containers() == run.leftovers.containers
    run.check_clean()


def test_rootless_stops_as_fast_as_runc(user: Unprivileged, small: str,
                                        tmp_path: Path) -> None:
    """The same run (--period 2) with each runner: the rootless one's wall time is within
    1.5 s of the runc runner's, and no run waits for a workload that ignored a signal."""
    took = {}
    for runner in RUNNERS:
        run = Run(runner, user, tmp_path)
        t0 = time.monotonic()
        res = subprocess.run(run.argv("--period", "2", "--record-out",
                                      user.home / f"{runner}.jsonl", small,
                                      top=("--log-format", "json")),
                             env=run.env(), capture_output=True, text=True, timeout=120,
                             check=False)
        took[runner] = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        assert "ended (the --period elapsed) with exit status 137" in res.stderr, res.stderr
        assert "did not exit" not in res.stderr, res.stderr
        if runner == "rootless":
            # the workload is gone, the monitor stopped, within 1 s of the period's end
            stopped = logged_at(res.stderr, "workload ended") - logged_at(res.stderr,
                                                                           "waiting for 2s")
            assert stopped < 2 + 1.0, f"{stopped - 2:.2f}s after the period:\n{res.stderr}"
        run.check_clean()
    assert took["rootless"] < took["runc"] + 1.5, took


def logged_at(stderr: str, text: str) -> float:
    """When the JSON log line holding `text` was written (seconds)."""
    [line] = [json.loads(x) for x in stderr.splitlines() if text in x and x.startswith("{")]
    return datetime.strptime(line["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
