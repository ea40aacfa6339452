"""The file-access monitor: a helper process whose private mount namespace the sample
container joins, so that fanotify on its root mount sees exactly the container's file
accesses. Every runner uses it; the helper runs privileged and imports only the standard
library, `fanotify`, `mounts` and `errors` (no grpc, no store).

How it works, in order:
1. The helper (`python -m estargz_opt.workload.monitor`) unshares a mount namespace,
   makes it a slave of the host's and mounts the rootfs snapshot on the target directory
   *inside that namespace only*: the host never sees the mount, and the kernel removes
   it when the helper dies, however it dies.
2. It opens the host's /proc and a fanotify group, then says `ready`.
3. The container is created with `linux.namespaces[mount].path = /proc/<helper>/ns/mnt`.
   runc joins the namespace and pivots into the rootfs, which also moves the helper's
   root there, so `/` is now the container's root mount.
4. On `start` the helper marks `/` (FAN_MARK_MOUNT, FAN_OPEN|FAN_ACCESS) and streams the
   path of every event as it happens. Paths are resolved from outside the container:
   through the host /proc opened in step 2 (`/proc/self/fd/N` there), never through
   anything the image provides, and they come out relative to the container's root.
5. On `stop` (or when its stdin closes) it drains the queue and exits.

Messages are JSON lines on the helper's stdout; commands are lines on its stdin.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import IO, Any, ClassVar, Protocol

from estargz_opt.errors import (
    EstargzOptError,
    FanotifyError,
    FanotifyPermissionError,
    FanotifyUnavailableError,
    MonitorError,
    MountError,
)
from estargz_opt.mount import Mount
from estargz_opt.workload.fanotify import EventSource, FanotifyMonitor, drain
from estargz_opt.workload.mounts import make_rslave, mount_all

CLONE_NEWNS = 0x00020000
PR_SET_PDEATHSIG = 1
_REPLY_TIMEOUT = 15.0


_ERRORS: dict[str, type[EstargzOptError]] = {
    "permission": FanotifyPermissionError,
    "unavailable": FanotifyUnavailableError,
    "fanotify": FanotifyError,
    "mount": MountError,
}


class Monitor:
    """The parent's handle on the monitor process; a context manager that always kills it."""

    #: the helper's error kinds and the exceptions they become here
    errors: ClassVar[dict[str, type[EstargzOptError]]] = _ERRORS

    def __init__(self, mounts: Sequence[Mount], target: str, log_path: str) -> None:
        setup = json.dumps({"target": target, "mounts": [asdict(m) for m in mounts]})
        self._launch("estargz_opt.workload.monitor", setup, target, log_path)
        try:
            self._expect("ready")
        except BaseException:
            self.close()
            raise

    def _launch(
        self, module: str, setup: str, target: str, log_path: str, pass_fds: Sequence[int] = ()
    ) -> None:
        """Start the helper `python -m module setup` and the thread that reads its lines."""
        self.target = target
        self.paths: list[str] = []
        self.overflows = 0
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", module, setup],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            close_fds=True,
            pass_fds=pass_fds,
            # Its own session: a Ctrl-C at the terminal is ours to handle (--wait-on-signal
            # ends the run with it); the helper stops when told, or dies with us.
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="monitor-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def ns_path(self) -> str:
        """The mount namespace the sample container must join."""
        return f"/proc/{self._proc.pid}/ns/mnt"

    @property
    def rootfs_view(self) -> str:
        """The mounted rootfs as the host can read it (through the helper's root)."""
        return f"/proc/{self._proc.pid}/root{self.target}"

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def begin(self) -> None:
        """Start watching: from now on every open or read in the rootfs is reported."""
        self._send("start")
        self._expect("started")

    def stop(self) -> list[str]:
        """Stop watching; every path reported, in first-access order (with repeats)."""
        self._send("stop")
        reply = self._expect("stopped")
        self.overflows = int(reply.get("overflows", 0))
        self._reader.join(timeout=_REPLY_TIMEOUT)
        return list(self.paths)

    def close(self) -> None:
        """Kill the helper if it still runs; its namespace and rootfs mount go with it."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for f in (self._proc.stdin, self._proc.stdout):
            if f is not None:
                f.close()
        self._log.close()

    def _send(self, command: str) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(command.encode() + b"\n")
            stdin.flush()
        except BrokenPipeError:
            raise self._died() from None

    def _expect(self, kind: str, timeout: float = _REPLY_TIMEOUT) -> dict[str, Any]:
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise MonitorError(f"the file-access monitor did not answer {kind!r} in time") from None
        if "error" in reply:
            cls = self.errors.get(reply.get("kind", ""), MonitorError)
            raise cls(reply["error"])
        if reply.get("type") == "eof":
            raise self._died()
        if reply.get("type") != kind:
            raise MonitorError(f"the file-access monitor said {reply!r}, expected {kind!r}")
        return reply

    def _died(self) -> MonitorError:
        code = self._proc.wait()
        self._log.flush()
        try:
            with open(self._log.name, "rb") as f:
                tail = f.read()[-400:].decode(errors="replace").strip().splitlines()
        except OSError:
            tail = []
        last = f": {tail[-1]}" if tail else ""
        return MonitorError(f"the file-access monitor exited with status {code}{last}")

    def _read(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        for line in stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "path" in msg:
                self.paths.append(msg["path"])
            else:
                self._replies.put(msg)
        self._replies.put({"type": "eof"})


# ----------------------------------------------------------------- the helper process


def say(out: IO[bytes], **msg: Any) -> None:
    out.write(json.dumps(msg).encode() + b"\n")
    out.flush()


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, FanotifyPermissionError):
        return "permission"
    if isinstance(exc, FanotifyUnavailableError):
        return "unavailable"
    if isinstance(exc, FanotifyError):
        return "fanotify"
    if isinstance(exc, MountError):
        return "mount"
    return "other"


def _helper(setup: dict[str, Any], cmd_in: IO[bytes], out: IO[bytes]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    # Die with the parent: a killed estargz-opt must not leave the namespace alive.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        return 1
    # fanotify first: without CAP_SYS_ADMIN it fails with the message that names the
    # daemonless alternatives.
    proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    monitor = FanotifyMonitor("/", mark=False, proc_dir_fd=proc_fd)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise _Failure(
            "other", f"cannot create a mount namespace for the monitor: {os.strerror(err)}"
        )
    make_rslave("/")
    mount_all([Mount(**m) for m in setup["mounts"]], setup["target"])
    say(out, type="ready", pid=os.getpid())
    return serve(monitor, cmd_in, out)


class _Watcher(EventSource, Protocol):
    overflows: int

    def mark(self) -> None: ...

    def close(self) -> None: ...


def serve(monitor: _Watcher, cmd_in: IO[bytes], out: IO[bytes]) -> int:
    """The helper's loop once it is ready: `start` marks, paths stream, `stop` drains."""
    fd_in = cmd_in.fileno()
    pending = b""
    watching = False
    poller = select.poll()
    poller.register(fd_in, select.POLLIN)
    poller.register(monitor.fileno(), select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == monitor.fileno():
                for path in monitor.events():
                    say(out, path=path)
                continue
            data = os.read(fd_in, 4096)
            if not data:  # the parent is gone or closed our stdin: finish as on stop
                data = b"stop\n"
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                command = line.strip().decode()
                if command == "start" and not watching:
                    monitor.mark()
                    watching = True
                    say(out, type="started")
                elif command == "stop":
                    if watching:
                        for path in drain(monitor, 0.2):
                            say(out, path=path)
                    say(out, type="stopped", overflows=monitor.overflows)
                    monitor.close()
                    return 0


class _Failure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def main(helper: Callable[[dict[str, Any], IO[bytes], IO[bytes]], int] | None = None) -> int:
    """Run `helper` (this module's by default) with the setup in argv[1]; report an error
    as one JSON line that the parent raises as the matching exception."""
    out = sys.stdout.buffer
    try:
        return (helper or _helper)(json.loads(sys.argv[1]), sys.stdin.buffer, out)
    except _Failure as exc:
        say(out, error=str(exc), kind=exc.kind)
    except (EstargzOptError, OSError) as exc:
        say(out, error=str(exc), kind=_error_kind(exc))
    return 1


if __name__ == "__main__":
    sys.exit(main())
