"""The workload's stdio without a shim: the FIFO ends the runtime hands to the workload,
and with -t the terminal the runtime passes back on a console socket, relayed to the
FIFOs by threads."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

from estargz_opt.errors import WorkloadStartError
from estargz_opt.workload.runc.runtime import COMMAND_TIMEOUT
from estargz_opt.workload.runner import StdioPaths


@contextlib.contextmanager
def stdio_fds(stdio: StdioPaths) -> Iterator[Fds]:
    """The ends of the stdio FIFOs the runtime hands to the workload (/dev/null for a
    stream it does not get, and for all three with -t: the terminal carries them)."""
    fds = Fds()
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        fds.add(null)
        if stdio.terminal:
            fds.std = [null, null, null]
        else:
            # The sampler holds each FIFO open, so neither open blocks.
            stdin = open_fifo(stdio.stdin, os.O_RDONLY) if stdio.stdin else null
            stdout = open_fifo(stdio.stdout, os.O_WRONLY) if stdio.stdout else null
            stderr = open_fifo(stdio.stderr, os.O_WRONLY) if stdio.stderr else null
            fds.add(stdin, stdout, stderr)
            fds.std = [stdin, stdout, stderr]
        yield fds
    finally:
        fds.close()


class Fds:
    def __init__(self) -> None:
        self._owned: set[int] = set()
        self.std: list[int] = []

    def __getitem__(self, i: int) -> int:
        return self.std[i]

    def add(self, *fds: int) -> None:
        self._owned.update(fds)

    def close(self) -> None:
        for fd in self._owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owned.clear()


def open_fifo(path: str, mode: int) -> int:
    fd = os.open(path, mode | os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(fd, True)
    return fd


class Console:
    """The socket on which the runtime hands over the terminal's master end (-t).

    Bound through a descriptor of the run directory (`/proc/self/fd/N/console`) and given
    to the runtime the same way (N is passed to it), so that no path can be too long
    for a socket address, however deep $TMPDIR is.
    """

    def __init__(self, directory: str) -> None:
        self._dir = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.address = f"/proc/self/fd/{self._dir}/console"
        self.pass_fds = (self._dir,)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind(self.address)
        self._sock.listen(1)

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
        os.close(self._dir)

    def receive(self) -> int:
        self._sock.settimeout(COMMAND_TIMEOUT)
        try:
            conn, _ = self._sock.accept()
            with conn:
                _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        except OSError as exc:
            raise WorkloadStartError(f"the runtime did not hand over the terminal: {exc}") from None
        if not fds:
            raise WorkloadStartError("the runtime did not hand over the terminal")
        os.set_inheritable(fds[0], False)
        return fds[0]


def relay(
    src: int, dst: int, name: str, *, close_src: bool = False, close_dst: bool = False
) -> threading.Thread:
    """Copy src to dst until either end is done (the terminal relay)."""

    def copy() -> None:
        try:
            while True:
                try:
                    data = os.read(src, 65536)
                except OSError:  # EIO: the terminal's last holder exited
                    return
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(dst, view) :]
        except OSError:
            return
        finally:
            if close_src:
                with contextlib.suppress(OSError):
                    os.close(src)
            if close_dst:
                with contextlib.suppress(OSError):
                    os.close(dst)

    t = threading.Thread(target=copy, name=name, daemon=True)
    t.start()
    return t
