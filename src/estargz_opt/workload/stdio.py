"""The sample task's stdio: FIFOs the runner connects the workload to.

stdout and stderr are copied to our stderr (or the caller's stream), so that our stdout
keeps carrying only the digest or the JSON report; stdout is watched for the
--wait-on-line text; with -i our stdin is fed to the workload (raw, with -t on a tty).
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from typing import Any, BinaryIO

from estargz_opt.workload.options import SamplerOptions
from estargz_opt.workload.runner import StdioPaths, Task


class Stdio:
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

    def __enter__(self) -> Stdio:
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

    @property
    def paths(self) -> StdioPaths:
        """What the runner connects the workload to."""
        return StdioPaths(self.stdin_path, self.stdout_path, self.stderr_path, self.opts.terminal)

    def start(self, task: Task) -> None:
        pump = threading.Thread(target=self._pump, name="sample-output", daemon=True)
        pump.start()
        self._threads.append(pump)
        if self._stdin_fd >= 0:
            if self.opts.terminal and sys.stdin.isatty():
                self._saved_tty = termios.tcgetattr(sys.stdin.fileno())
                tty.setraw(sys.stdin.fileno())
                with contextlib.suppress(OSError):
                    cols, rows = os.get_terminal_size(sys.stdin.fileno())
                    task.resize(cols, rows)
            feeder = threading.Thread(
                target=self._feed, args=(task,), name="sample-stdin", daemon=True
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

    def _feed(self, task: Task) -> None:
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
                task.close_stdin()
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
