"""A command on a terminal of its own, as a user at a shell runs it: Ctrl-C typed there
reaches the whole foreground process group, as a terminal's does (not a signal sent by
the test to one pid)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import subprocess
import termios
import time
from collections.abc import Sequence


def _take_terminal() -> None:
    """In the child, after setsid: the pty on stdin becomes its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyRun:
    """`argv` on a new pty (its controlling terminal, stdin, stdout and stderr)."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.output = b""
        self.ended = 0.0
        self.proc = subprocess.Popen(list(argv), stdin=slave, stdout=slave, stderr=slave,
                                     env=env, start_new_session=True,
                                     preexec_fn=_take_terminal)
        os.close(slave)

    def _read(self, timeout: float) -> bool:
        """Read what is there within `timeout`; False once the terminal is closed."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: no process holds the terminal any more
            return False
        self.output += data
        return bool(data)

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace").replace("\r\n", "\n")

    def wait_for(self, text: str, timeout: float = 60) -> float:
        """Read until `text` is printed; the time it was seen."""
        deadline = time.monotonic() + timeout
        while text not in self.text:
            assert time.monotonic() < deadline, f"no {text!r} in {timeout}s:\n{self.text}"
            assert self._read(0.05), f"the terminal closed before {text!r}:\n{self.text}"
        return time.monotonic()

    def type(self, keys: bytes) -> float:
        os.write(self.master, keys)
        return time.monotonic()

    def finish(self, timeout: float = 60) -> int:
        """Read to the end; the exit status (`ended`: when it was known)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if not self._read(0.05):
                break
        code = self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        self.ended = time.monotonic()
        while self._read(0):
            pass
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
        os.close(self.master)
