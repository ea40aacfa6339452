"""Watch which files a workload opens or reads on one mount, with Linux fanotify.

The prioritized-file profile of `optimize` is the list of files the sample workload
touches, in first-access order. fanotify reports every open/read on a whole mount, from
any process, without ptrace or an LD_PRELOAD shim, which is what ctr-remote uses too. It
is reached through ctypes on libc so that no new dependency is needed.

Each event carries an open fd on the accessed file; the file's path is what
`/proc/self/fd/N` points to, i.e. the path after symlinks were followed. That is why
`paths_under` must drop anything outside the rootfs: a hostile image's symlink to
`/etc/shadow` is reported as `/etc/shadow`, and recording it would leak a host path.
"""

from __future__ import annotations

import abc
import ctypes
import errno
import logging
import os
import posixpath
import select
import struct
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Protocol, Self

from estargz_opt.errors import (
    FanotifyError,
    FanotifyPermissionError,
    FanotifyUnavailableError,
)

log = logging.getLogger("estargz_opt")

# <linux/fanotify.h>
FAN_CLASS_NOTIF = 0x00000000
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_MARK_ADD = 0x00000001
FAN_MARK_MOUNT = 0x00000010
FAN_ACCESS = 0x00000001
FAN_OPEN = 0x00000020
FAN_Q_OVERFLOW = 0x00004000
FANOTIFY_METADATA_VERSION = 3
AT_FDCWD = -100

# struct fanotify_event_metadata: u32 event_len, u8 vers, u8 reserved,
# u16 metadata_len, u64 mask, s32 fd, s32 pid (little-endian on every supported arch).
_METADATA = struct.Struct("<IBBHQii")
_READ_SIZE = 64 * 1024

DAEMONLESS_HINT = (
    "to optimize without running the workload, pass a saved record with --record-in FILE "
    "(made by `estargz-opt analyze --record-out` on a machine where that works) or a "
    "list of files with --prefetch-list FILE"
)


def _permission_error(what: str) -> FanotifyPermissionError:
    return FanotifyPermissionError(
        f"cannot watch file accesses: {what} was refused (EPERM); fanotify needs root "
        f"or CAP_SYS_ADMIN; run as root, or {DAEMONLESS_HINT}"
    )


def _unavailable_error(what: str, err: int) -> FanotifyUnavailableError:
    return FanotifyUnavailableError(
        f"cannot watch file accesses: fanotify is unavailable on this kernel "
        f"({what}: {os.strerror(err)}); {DAEMONLESS_HINT}"
    )


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        init = libc.fanotify_init
        mark = libc.fanotify_mark
    except AttributeError as exc:
        raise _unavailable_error("libc has no fanotify_init", errno.ENOSYS) from exc
    init.argtypes = [ctypes.c_uint, ctypes.c_uint]
    init.restype = ctypes.c_int
    mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
    mark.restype = ctypes.c_int
    return libc


def paths_under(paths: Iterable[str], root: str) -> list[str]:
    """Return `paths` relative to `root`, in first-seen order without duplicates.

    Anything that is not strictly inside `root` is dropped: the files a symlink in a
    hostile image points to, `anon_inode:`/`pipe:` pseudo-paths and `root` itself. Only
    paths inside the rootfs may end up in a record.
    """
    base = posixpath.normpath(root)
    prefix = base if base.endswith("/") else base + "/"
    seen: dict[str, None] = {}
    for path in paths:
        if not path.startswith("/"):
            continue
        clean = posixpath.normpath(path)
        # normpath keeps a leading "//"; such a path is never under a normal root.
        if not clean.startswith(prefix) or clean == base:
            continue
        rel = clean[len(prefix) :]
        if rel and rel not in seen:
            seen[rel] = None
    return list(seen)


class EventSource(Protocol):
    """A fanotify group that yields paths: `FanotifyMonitor` or the FID-mode one."""

    def fileno(self) -> int: ...

    def events(self) -> Iterator[str]: ...


def drain(source: EventSource, timeout: float = 0.0) -> list[str]:
    """Wait up to `timeout` seconds for events of `source`, then read until its queue is
    empty (a stopping monitor must not lose what the workload did last)."""
    if source.fileno() < 0:
        raise FanotifyError("the fanotify monitor is closed")
    poller = select.poll()
    poller.register(source.fileno(), select.POLLIN)
    deadline = time.monotonic() + max(timeout, 0.0)
    out: list[str] = []
    while True:
        left = max(deadline - time.monotonic(), 0.0)
        if not poller.poll(int(left * 1000)):
            return out
        got = list(source.events())
        out.extend(got)
        if not got:
            return out
        # Events arrived: keep reading what is already queued, but do not wait longer.
        deadline = time.monotonic()


def init_group(flags: int, event_f_flags: int, what: str) -> tuple[int, ctypes.CDLL]:
    """A new non-blocking, close-on-exec notification group's fd (with `flags` added),
    and the libc that marks it; `what` names the call in errors."""
    libc = _libc()
    fd = libc.fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | flags, event_f_flags)
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise _permission_error(what)
        if err in (errno.ENOSYS, errno.EINVAL):
            raise _unavailable_error(what, err)
        raise FanotifyError(f"fanotify_init failed: {os.strerror(err)}")
    return fd, libc


class Group(abc.ABC):
    """What both monitors share: a context manager that closes the group, and its fd."""

    _fd: int

    @abc.abstractmethod
    def close(self) -> None:
        """Close the group (and whatever else the monitor holds)."""

    def fileno(self) -> int:
        return self._fd

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class FanotifyMonitor(Group):
    """Records files opened or read on the mount that holds `mount_path`, by any process.

    Use as a context manager; the fanotify group exists from construction until close.
    `events()` and `drain()` return absolute paths as this process sees them;
    `paths_under()` turns everything seen so far into rootfs-relative paths.
    """

    def __init__(
        self,
        mount_path: str | os.PathLike[str],
        *,
        mark: bool = True,
        proc_dir_fd: int | None = None,
    ) -> None:
        """Create the fanotify group; mark the mount of `mount_path` now unless mark=False.

        proc_dir_fd: an fd of a /proc directory to resolve event fds through (its
        `self/fd/N`), for a process whose own root no longer shows the host's /proc.
        """
        self.mount_path = os.fspath(mount_path)
        self.overflows = 0
        self._proc_dir_fd = proc_dir_fd
        self._seen: dict[str, None] = {}
        self._fd, self._libc = init_group(
            0, os.O_RDONLY | getattr(os, "O_LARGEFILE", 0) | os.O_CLOEXEC, "fanotify_init"
        )
        if mark:
            self.mark()

    def mark(self) -> None:
        """Start reporting opens and reads on the mount that holds `mount_path`."""
        fd, libc = self._fd, self._libc
        rc = libc.fanotify_mark(
            fd,
            FAN_MARK_ADD | FAN_MARK_MOUNT,
            FAN_ACCESS | FAN_OPEN,
            AT_FDCWD,
            os.fsencode(self.mount_path),
        )
        if rc < 0:
            err = ctypes.get_errno()
            self.close()
            if err == errno.EPERM:
                raise _permission_error(f"fanotify_mark on {self.mount_path}")
            if err in (errno.ENOSYS, errno.EINVAL):
                raise _unavailable_error(f"fanotify_mark on {self.mount_path}", err)
            raise FanotifyError(f"cannot watch {self.mount_path} with fanotify: {os.strerror(err)}")

    def close(self) -> None:
        """Close the fanotify group; the kernel drops its marks and queued events."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def events(self) -> Iterator[str]:
        """Yield the path of every event queued now, without waiting for more.

        Each event's fd is closed as soon as its path is read, so a long workload cannot
        exhaust our fd limit. A queue overflow is counted and logged, since it means the
        profile is incomplete.
        """
        if self._fd < 0:
            raise FanotifyError("the fanotify monitor is closed")
        while True:
            try:
                buf = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return
            if not buf:
                return
            yield from self._parse(buf)

    def _parse(self, buf: bytes) -> Iterator[str]:
        fds: list[int] = []
        off = 0
        while off + _METADATA.size <= len(buf):
            event_len, vers, _, _, mask, fd, _pid = _METADATA.unpack_from(buf, off)
            if vers != FANOTIFY_METADATA_VERSION or event_len < _METADATA.size:
                # The layout is unknown: later fds in this buffer cannot be found safely.
                for done in fds:
                    os.close(done)
                raise FanotifyError(
                    f"unsupported fanotify event metadata version {vers} "
                    f"(expected {FANOTIFY_METADATA_VERSION})"
                )
            off += event_len
            if fd < 0 or mask & FAN_Q_OVERFLOW:
                self.overflows += 1
                log.warning("fanotify queue overflow: some file accesses were not recorded")
                continue
            fds.append(fd)
        paths: list[str] = []
        for fd in fds:
            try:
                if self._proc_dir_fd is None:
                    paths.append(os.readlink(f"/proc/self/fd/{fd}"))
                else:
                    paths.append(os.readlink(f"self/fd/{fd}", dir_fd=self._proc_dir_fd))
            except OSError as exc:
                log.debug("cannot resolve fanotify fd %d: %s", fd, exc)
            finally:
                os.close(fd)
        for path in paths:
            self._seen.setdefault(path, None)
            yield path

    def drain(self, timeout: float = 0.0) -> list[str]:
        """Wait up to `timeout` seconds for events, then read until the queue is empty."""
        return drain(self, timeout)

    def paths_under(self, root: str | os.PathLike[str] | None = None) -> list[str]:
        """Everything seen so far, relative to `root` (default: the marked mount path)."""
        return paths_under(self._seen, os.fspath(root) if root is not None else self.mount_path)
