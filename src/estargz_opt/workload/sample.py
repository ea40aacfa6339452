"""Run an image's workload once under the file-access monitor, with any runner.

The run is the same for every runner (see `runner.Runner`): a private run directory,
the rootfs the runner prepares, mounted by the monitor in its own mount namespace, the
generated /etc files, the CNI namespace (--cni), the spec from the shared steps, the
stdio FIFOs, then the container the runner creates, joined to the monitor's namespace.
The run ends when the workload exits, prints the `--wait-on-line` text, gets Ctrl-C
under `--wait-on-signal`, or when `--period` is over; it is then killed with the image's
stop signal.

Everything the run creates is undone in reverse order whatever happens (success, error,
timeout, Ctrl-C): the task and the container, the stdio, the network namespace, the
monitor (and with it the rootfs mount, which lives only in its namespace), the runner's
rootfs, and the run directory; once that has taken a second, each step is named as it
starts (`CleanupSteps`). After a SIGKILL the next run reaps what was left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from estargz_opt.errors import RunnerError, SampleError, WorkloadStartError
from estargz_opt.fstree import remove_tree
from estargz_opt.stores.owner import is_dead, this_process
from estargz_opt.workload import network
from estargz_opt.workload.options import SamplerOptions
from estargz_opt.workload.runner import (
    KILL_WAIT,
    SAMPLE_PREFIX,
    FileMonitor,
    RunDir,
    Runner,
    SampleImage,
    Task,
    quietly,
)
from estargz_opt.workload.spec import (
    NO_GPU_HOOK,
    build_spec,
    etc_file_texts,
    find_gpu_hook,
    stop_signal,
)
from estargz_opt.workload.stdio import Stdio

log = logging.getLogger("estargz_opt")


@dataclass(slots=True)
class SampleResult:
    """What happened in the run; `paths` are container paths in first-access order."""

    paths: list[str] = field(default_factory=list)
    #: "exit", "line", "period" or "signal"
    ended_by: str = ""
    exit_status: int | None = None
    overflows: int = 0


#: Called about once a second while the workload runs: (seconds left or None, files seen);
#: a last call with 0 seconds left ends the countdown.
Tick = Callable[[float | None, int], None]


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """One workload run: with which runner, of which image, with which flags, watched how."""

    runner: Runner
    image: SampleImage
    opts: SamplerOptions
    on_tick: Tick | None = None
    #: where the workload's stdout and stderr go (default: our stderr), so that our stdout
    #: keeps carrying only the digest or the JSON report
    output: BinaryIO | None = None


def run_sample(req: SampleRequest) -> SampleResult:
    """Run the workload once under the file-access monitor; see the module docstring."""
    runner, image, opts, on_tick = req.runner, req.image, req.opts, req.on_tick
    opts.validate()
    runner.check()
    if opts.gpus and find_gpu_hook() is None:
        raise SampleError.with_terms(NO_GPU_HOOK, gpus="gpus")
    out = req.output if req.output is not None else sys.stderr.buffer
    run_id = f"{SAMPLE_PREFIX}{secrets.token_hex(8)}"
    # The runner's objects first: a dead run's container may still use its run directory.
    runner.reap_stale()
    reap_stale_dirs()
    with ExitStack() as stack:
        run = RunDir(run_id, os.path.join(tempfile.gettempdir(), run_id))
        os.mkdir(run.path, 0o700)
        undo = CleanupSteps()
        stack.callback(undo.done)
        stack.callback(quietly, "remove the run directory", remove_tree, run.path)
        stack.callback(undo.step, "the run directory")
        _write(os.path.join(run.path, "owner"), this_process())
        os.mkdir(run.rootfs)

        mounts = stack.enter_context(runner.rootfs(run, image))
        stack.callback(undo.step, "the rootfs")
        log_path = os.path.join(run.path, "monitor.log")
        monitor = stack.enter_context(runner.monitor(run, image, mounts, log_path))
        stack.callback(undo.step, "the file-access monitor")

        etc_dir = None
        if not opts.net_host:
            etc_dir = os.path.join(run.path, "etc")
            os.mkdir(etc_dir)
            for name, text in etc_file_texts(opts).items():
                _write(os.path.join(etc_dir, name), text)
        netns = None
        if opts.cni:
            netns = stack.enter_context(network.cni_namespace(run.id, opts))
            stack.callback(undo.step, "the CNI network namespace")

        spec = build_spec(
            image.config,
            opts,
            rootfs=run.rootfs,
            hostname="",
            etc_dir=etc_dir,
            mount_ns_path=monitor.ns_path,
            netns_path=netns,
            container_id=run.id,
            namespace=runner.namespace,
            files_root=monitor.rootfs_view,
            gpu_hook=find_gpu_hook() if opts.gpus else None,
        )
        stdio = stack.enter_context(Stdio(os.path.join(run.path, "io"), opts, out))
        stack.callback(undo.step, "the workload's stdio")
        # A workload that never ran recorded nothing that means anything: the run fails
        # (as ctr-remote's does when its task cannot be created or started), and
        # everything made so far is undone. One that ran and exited non-zero is recorded.
        try:
            task = stack.enter_context(runner.container(run, image, spec, stdio.paths))
            stack.callback(undo.step, "the sample container")
            monitor.begin()
            stdio.start(task)
            task.start()
        except WorkloadStartError as exc:
            raise WorkloadStartError(f"the workload could not start: {exc}") from None
        result = _wait(task, opts, stdio, monitor, on_tick)
        if result.ended_by != "exit":
            _kill(task, stop_signal(image.config), result)
        status = task.delete()
        if status is not None and result.exit_status is None:
            result.exit_status = status
        stdio.finish()
        result.paths = monitor.stop()
        result.overflows = monitor.overflows
        log.info(
            "workload ended (%s) with exit status %s; %d file accesses seen",
            _ENDINGS[result.ended_by],
            result.exit_status,
            len(result.paths),
        )
        return result
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack does not swallow


_ENDINGS = {
    "exit": "the workload exited",
    "line": "the --wait-on-line text was printed",
    "period": "the --period elapsed",
    "signal": "interrupted under --wait-on-signal",
}


#: How long a run's cleanup may take before it says what it is still undoing.
SLOW_CLEANUP = 1.0


class CleanupSteps:
    """Names the run's cleanup steps as they start, so that a slow one is said.

    `step` is pushed on the run's ExitStack after each thing the run makes, so it is
    called just before that thing is undone. Once the cleanup has taken SLOW_CLEANUP, the
    step under way is logged, and each later one as it starts: a Ctrl-C or SIGTERM that
    does not end the run at once says what it waits for. Meanwhile a further Ctrl-C or
    SIGTERM (from the main thread's handlers) names the step instead of cutting it short,
    which would leave a container, a mount or a namespace behind."""

    def __init__(self, after: float = SLOW_CLEANUP) -> None:
        self._after = after
        self._current = ""
        self._timer: threading.Timer | None = None
        self._said = False
        self._previous: dict[int, Any] = {}
        self._interrupted = False

    def step(self, what: str) -> None:
        self._current = what
        if self._said:
            log.info("cleaning up: %s", what)
        elif self._timer is None:
            self._timer = threading.Timer(self._after, self._slow)
            self._timer.daemon = True
            self._timer.start()
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self._previous[sig] = signal.signal(sig, self._again)

    def _slow(self) -> None:
        self._said = True
        log.info("cleaning up: %s", self._current)

    def _again(self, _signum: int, _frame: object) -> None:
        self._interrupted = True
        log.warning("still cleaning up: %s (it cannot be cut short)", self._current)

    def done(self) -> None:
        """The cleanup is over: an interrupt that came during it ends the run now."""
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._interrupted:
            raise KeyboardInterrupt


def reap_stale_dirs() -> None:
    """Remove the run directories of runs killed with SIGKILL (they could not clean up).

    Only directories whose owner process was on this host and is gone are touched: a
    concurrent run's directory is left alone. Each runner reaps its own objects.
    """
    tmp = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(tmp):
            owner_file = os.path.join(tmp, name, "owner")
            if name.startswith(SAMPLE_PREFIX) and os.path.isfile(owner_file):
                with open(owner_file) as f:
                    dead = is_dead(f.read())
                if dead:
                    try:
                        remove_tree(os.path.join(tmp, name))
                    except OSError as exc:  # tried again by the next run; never in its way
                        log.debug("cannot remove %s, left by a killed run: %s", name, exc)


def _wait(
    task: Task,
    opts: SamplerOptions,
    stdio: Stdio,
    monitor: FileMonitor,
    on_tick: Tick | None,
) -> SampleResult:
    result = SampleResult()
    done = threading.Event()
    ending: list[str] = []

    def end(why: str) -> None:
        if not ending:
            ending.append(why)
        done.set()

    def waiter() -> None:
        try:
            result.exit_status = task.wait()
        except RunnerError as exc:
            log.debug("waiting for the sample task: %s", exc)
        end("exit")

    def line_waiter() -> None:
        # The line may have come already: the event stays set.
        if stdio.line_seen.wait():
            end("line")

    threading.Thread(target=waiter, name="sample-wait", daemon=True).start()
    if opts.wait_on_line:
        threading.Thread(target=line_waiter, name="sample-line", daemon=True).start()

    deadline = None if opts.wait_on_signal else time.monotonic() + opts.effective_period
    previous = None
    if opts.wait_on_signal:
        log.info("waiting for the workload to exit, or for Ctrl-C (SIGINT)")
        previous = signal.signal(signal.SIGINT, lambda *_: end("signal"))
    else:
        log.info("waiting for %ds ...", opts.effective_period)
    try:
        while not done.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                end("period")
                break
            if on_tick is not None:
                on_tick(left, len(monitor.paths))
            done.wait(1.0 if left is None else min(1.0, left))
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if on_tick is not None:
            on_tick(0.0, len(monitor.paths))  # the end of the countdown
    result.ended_by = ending[0]
    return result


def _kill(task: Task, signo: int, result: SampleResult) -> None:
    """Stop the workload with the image's stop signal; SIGKILL if it ignores it for 5 s."""
    for sig in dict.fromkeys((signo, signal.SIGKILL)):
        try:
            task.kill(sig)
        except RunnerError as exc:
            log.debug("kill with signal %d: %s", sig, exc)
        try:
            result.exit_status = task.wait(timeout=KILL_WAIT)
            return
        except RunnerError:
            log.warning("the workload did not exit %gs after signal %d", KILL_WAIT, sig)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
