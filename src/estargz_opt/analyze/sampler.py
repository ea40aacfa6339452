"""Run an image's workload once in a sample container and collect the files it touches.

The sample container is built the way ctr-remote's analyzer builds it:
the image is unpacked into snapshots, a snapshot on its top chain ID is mounted as the
rootfs, and the container (runc, through containerd's task service) joins the mount
namespace of the file-access monitor. The run ends when the workload exits, prints the
`--wait-on-line` text, gets Ctrl-C under `--wait-on-signal`, or when `--period` is over;
it is then killed with the image's stop signal.

Everything the run creates is undone in reverse order whatever happens (success, error,
timeout, Ctrl-C): the task, the container, the monitor (and with it the rootfs mount,
which lives only in its namespace), the snapshot, the network namespace, the temporary
directory and the lease that protected the unpacked layers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import select
import shutil
import signal
import sys
import tempfile
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from estargz_opt.analyze import network
from estargz_opt.analyze.monitor import Monitor
from estargz_opt.analyze.spec import (
    SamplerOptions,
    build_spec,
    find_gpu_hook,
    hosts_file,
    resolv_conf,
    stop_signal,
)
from estargz_opt.analyze.unpack import unpack
from estargz_opt.descriptor import Descriptor
from estargz_opt.errors import EstargzOptError
from estargz_opt.stores.containerd.client import Client
from estargz_opt.stores.containerd.errors import ContainerdError
from estargz_opt.stores.containerd.model import Container
from estargz_opt.stores.containerd.owner import OWNER_LABEL, is_dead, this_process

log = logging.getLogger("estargz_opt")

#: Label on every container this module creates, so leftovers of a killed run are findable.
SAMPLE_LABEL = "estargz-opt/sample"
#: Names of sample containers, snapshots and temporary directories start with this.
SAMPLE_PREFIX = "estargz-opt-sample-"
_KILL_WAIT = 5.0


class SampleError(EstargzOptError):
    """The sample container could not be set up."""


@dataclass(frozen=True, slots=True)
class SampleImage:
    """What the sample container is made from: the host manifest's parts."""

    name: str
    config: dict[str, Any]
    layers: list[Descriptor]
    diff_ids: list[str]


@dataclass(slots=True)
class SampleResult:
    """What happened in the run; `paths` are container paths in first-access order."""

    paths: list[str] = field(default_factory=list)
    #: "exit", "line", "period", "signal", or "error" when the workload could not start
    ended_by: str = ""
    exit_status: int | None = None
    error: str | None = None
    overflows: int = 0


#: Called about once a second while the workload runs: (seconds left or None, files seen);
#: a last call with 0 seconds left ends the countdown.
Tick = Callable[[float | None, int], None]


def check_runtime() -> None:
    """Fail early, in one line, when runc (the runtime containerd's shim calls) is missing."""
    if shutil.which("runc") is None:
        raise SampleError(
            "runc is not installed (apt-get install runc): containerd needs it to run the "
            "sample container; to convert without running the workload, pass --record-in "
            "FILE, --prefetch-list FILE or --no-optimize"
        )


def run_sample(
    client: Client,
    image: SampleImage,
    opts: SamplerOptions,
    *,
    on_tick: Tick | None = None,
    output: BinaryIO | None = None,
) -> SampleResult:
    """Run the workload once under the file-access monitor; see the module docstring.

    The workload's stdout and stderr are copied to `output` (default: our stderr), so that
    our stdout keeps carrying only the digest or the JSON report.
    """
    opts.validate()
    check_runtime()
    if opts.gpus and find_gpu_hook() is None:
        raise SampleError(
            "--gpus needs the NVIDIA Container Toolkit (nvidia-container-runtime-hook was "
            "not found on PATH)"
        )
    out = output if output is not None else sys.stderr.buffer
    cid = f"{SAMPLE_PREFIX}{secrets.token_hex(8)}"
    reap_stale(client)
    with ExitStack() as stack:
        owner = this_process()
        lease = stack.enter_context(
            client.leases.hold(labels={SAMPLE_LABEL: cid, OWNER_LABEL: owner}, sync=True)
        )
        top = unpack(client, image.layers, image.diff_ids, lease=lease)
        tmp = os.path.join(tempfile.gettempdir(), cid)
        os.mkdir(tmp, 0o700)
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        _write(os.path.join(tmp, "owner"), this_process())
        target = os.path.join(tmp, "rootfs")
        os.mkdir(target)

        snapshots = client.snapshots()
        mounts = snapshots.prepare(cid, top, lease=lease)
        stack.callback(_quietly, "remove snapshot", snapshots.remove, cid, missing_ok=True)
        monitor = stack.enter_context(Monitor(mounts, target, os.path.join(tmp, "monitor.log")))

        etc_dir = None
        if not opts.net_host:
            etc_dir = os.path.join(tmp, "etc")
            os.mkdir(etc_dir)
            _write(os.path.join(etc_dir, "resolv.conf"), resolv_conf(opts))
            _write(os.path.join(etc_dir, "hosts"), hosts_file(opts))
        netns = None
        if opts.cni:
            netns = stack.enter_context(network.cni_namespace(cid, opts))

        spec = build_spec(
            image.config,
            opts,
            rootfs=target,
            hostname="",
            etc_dir=etc_dir,
            mount_ns_path=monitor.ns_path,
            netns_path=netns,
            container_id=cid,
            namespace=client.namespace,
            files_root=monitor.rootfs_view,
            gpu_hook=find_gpu_hook() if opts.gpus else None,
        )
        client.containers.create(
            Container(
                id=cid,
                spec=json.dumps(spec).encode(),
                image=image.name,
                labels={SAMPLE_LABEL: "1", OWNER_LABEL: this_process()},
            )
        )
        stack.callback(_quietly, "delete container", client.containers.delete, cid, missing_ok=True)

        stdio = stack.enter_context(_Stdio(os.path.join(tmp, "io"), opts, out))
        try:
            client.tasks.create(
                cid,
                stdin=stdio.stdin_path,
                stdout=stdio.stdout_path,
                stderr=stdio.stderr_path,
                terminal=opts.terminal,
            )
        except ContainerdError as exc:
            if '"runc": executable file not found' in str(exc):
                raise SampleError(f"containerd cannot find runc: {exc}") from None
            # Like a workload that fails at once: report it; the caller converts anyway.
            log.error("the workload could not start: %s", exc)
            return SampleResult(ended_by="error", error=str(exc))
        stack.callback(_end_task, client, cid)

        monitor.begin()
        stdio.start(client, cid)
        client.tasks.start(cid)
        result = _wait(client, cid, opts, stdio, monitor, on_tick)
        if result.ended_by != "exit":
            _kill(client, cid, stop_signal(image.config), result)
        gone = client.tasks.delete(cid, missing_ok=True)
        if gone is not None and result.exit_status is None:
            result.exit_status = gone.exit_status
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


def reap_stale(client: Client) -> None:
    """Remove what runs killed with SIGKILL left (they could not clean up themselves).

    Only sample containers whose owner process was on this host and is gone are touched:
    a concurrent run's container is left alone.
    """
    tmp = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(tmp):
            owner_file = os.path.join(tmp, name, "owner")
            if name.startswith(SAMPLE_PREFIX) and os.path.isfile(owner_file):
                with open(owner_file) as f:
                    if is_dead(f.read()):
                        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    try:
        stale = client.containers.list(f'labels."{SAMPLE_LABEL}"')
    except ContainerdError as exc:
        log.debug("cannot list sample containers: %s", exc)
        return
    for c in stale:
        if not is_dead(c.labels.get(OWNER_LABEL, "")):
            continue
        log.warning("removing sample container %s, left by a run that was killed", c.id)
        _end_task(client, c.id)
        _quietly("delete container", client.containers.delete, c.id, missing_ok=True)
        _quietly("remove snapshot", client.snapshots().remove, c.id, missing_ok=True)
        # Its lease carries the same owner: ContainerdStore deletes dead owners' leases.


def _wait(
    client: Client,
    cid: str,
    opts: SamplerOptions,
    stdio: _Stdio,
    monitor: Monitor,
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
            result.exit_status = client.tasks.wait(cid).exit_status
        except ContainerdError as exc:
            log.debug("waiting for the sample task: %s", exc)
        end("exit")

    threading.Thread(target=waiter, name="sample-wait", daemon=True).start()
    if opts.wait_on_line:
        # The line may have come already: the event stays set.
        def on_line() -> None:
            if stdio.line_seen.wait():
                end("line")

        threading.Thread(target=on_line, name="sample-line", daemon=True).start()

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


def _kill(client: Client, cid: str, signo: int, result: SampleResult) -> None:
    """Stop the workload with the image's stop signal; SIGKILL if it ignores it for 5 s."""
    for sig in dict.fromkeys((signo, signal.SIGKILL)):
        try:
            client.tasks.kill(cid, sig, all=True)
        except ContainerdError as exc:
            log.debug("kill %s: %s", cid, exc)
        try:
            result.exit_status = client.tasks.wait(cid, timeout=_KILL_WAIT).exit_status
            return
        except ContainerdError:
            log.warning("the workload did not exit %gs after signal %d", _KILL_WAIT, sig)


def _end_task(client: Client, cid: str) -> None:
    """Cleanup: a task still there (error paths) is killed and deleted."""
    try:
        state = client.tasks.get(cid)
    except ContainerdError:
        return
    if state.status not in ("stopped", "created"):
        _quietly("kill task", client.tasks.kill, cid, signal.SIGKILL, all=True)
        _quietly("wait task", client.tasks.wait, cid, timeout=_KILL_WAIT)
    _quietly("delete task", client.tasks.delete, cid, missing_ok=True)


def _quietly(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run one cleanup step; log a failure instead of hiding the error that got us here."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        log.warning("cleanup: could not %s: %s", what, exc)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)


class _Stdio:
    """The task's stdio FIFOs: stdout and stderr are copied to `out`, stdout is watched for
    the --wait-on-line text, and with -i our stdin is fed to the workload."""

    def __init__(self, directory: str, opts: SamplerOptions, out: BinaryIO) -> None:
        self.opts = opts
        self.out = out
        #: set once a stdout line contains the --wait-on-line text
        self.line_seen = threading.Event()
        os.mkdir(directory, 0o700)
        self.stdout_path = os.path.join(directory, "stdout")
        self.stderr_path = "" if opts.terminal else os.path.join(directory, "stderr")
        self.stdin_path = os.path.join(directory, "stdin") if opts.stdin else ""
        self._fds: dict[int, str] = {}
        for path, name in ((self.stdout_path, "stdout"), (self.stderr_path, "stderr")):
            if path:
                os.mkfifo(path, 0o600)
                # O_RDWR: opening never blocks, and the FIFO never reads EOF before the
                # shim has opened it.
                self._fds[os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)] = name
        self._stdin_fd = -1
        self._stdin_lock = threading.Lock()
        if self.stdin_path:
            os.mkfifo(self.stdin_path, 0o600)
            self._stdin_fd = os.open(self.stdin_path, os.O_RDWR | os.O_CLOEXEC)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._line = b""
        self._saved_tty: list[Any] | None = None

    def __enter__(self) -> _Stdio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
        for fd in list(self._fds):
            os.close(fd)
        self._fds.clear()
        self._close_stdin_fd()
        if self._saved_tty is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved_tty)
            self._saved_tty = None

    def start(self, client: Client, cid: str) -> None:
        pump = threading.Thread(target=self._pump, name="sample-output", daemon=True)
        pump.start()
        self._threads.append(pump)
        if self._stdin_fd >= 0:
            if self.opts.terminal and sys.stdin.isatty():
                self._saved_tty = termios.tcgetattr(sys.stdin.fileno())
                tty.setraw(sys.stdin.fileno())
                with contextlib.suppress(OSError, ContainerdError):
                    cols, rows = os.get_terminal_size(sys.stdin.fileno())
                    client.tasks.resize_pty(cid, cols, rows)
            feeder = threading.Thread(
                target=self._feed, args=(client, cid), name="sample-stdin", daemon=True
            )
            feeder.start()  # not joined: it may be blocked reading our stdin

    def finish(self) -> None:
        """Copy what is still buffered, then stop the output thread."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()

    def _pump(self) -> None:
        poller = select.poll()
        for fd in self._fds:
            poller.register(fd, select.POLLIN)
        while True:
            ready = poller.poll(100)
            if not ready and self._stop.is_set():
                return
            for fd, _ in ready:
                for chunk in _read_available(fd):
                    self.out.write(chunk)
                    if self._fds.get(fd) == "stdout":
                        self._watch(chunk)
            self.out.flush()

    def _watch(self, chunk: bytes) -> None:
        if not self.opts.wait_on_line or self.line_seen.is_set():
            return
        wanted = self.opts.wait_on_line.encode()
        self._line += chunk
        *lines, self._line = self._line.split(b"\n")
        # In terminal mode a line ends with \r\n; either way a complete line counts.
        for line in lines:
            if wanted in line:
                self.line_seen.set()
                return

    def _close_stdin_fd(self) -> None:
        with self._stdin_lock:
            fd, self._stdin_fd = self._stdin_fd, -1
        if fd >= 0:
            os.close(fd)

    def _feed(self, client: Client, cid: str) -> None:
        src = sys.stdin.fileno()
        while True:
            try:
                data = os.read(src, 65536)
            except OSError:
                data = b""
            if not data:
                # Our writer must go first: the shim's copy ends only once no writer is
                # left, and CloseIO then closes the workload's stdin.
                self._close_stdin_fd()
                with contextlib.suppress(ContainerdError):
                    client.tasks.close_stdin(cid)
                return
            try:
                os.write(self._stdin_fd, data)
            except OSError:  # closed by cleanup: the run is over
                return


def _read_available(fd: int) -> Iterator[bytes]:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            return
        yield chunk
