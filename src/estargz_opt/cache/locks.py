"""Locking: one flock per key, so a run filling an entry excludes every other run from
it; a second run converting the same layer waits while the first one's fill grows, then
uses the entry (a stalled holder is not waited for)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from estargz_opt.cache.keys import fill_kind

log = logging.getLogger("estargz_opt")

#: a run waits for another one filling the same entry until that fill stops growing
STALL_SECONDS = 10
_POLL_SECONDS = 0.2


class KeyLocks:
    """The lock files KEY.lock of one cache directory. A lock that cannot be taken for
    an OSError turns the cache off (`turn_off`) and is None."""

    def __init__(self, directory: Path, turn_off: Callable[[OSError], None]) -> None:
        self.dir = directory
        self._turn_off = turn_off

    def wait(self, key: str) -> int | None:
        """The lock of `key`, waiting for the run that holds it while its fill grows.

        A holder whose fill has not grown for STALL_SECONDS (stopped, stuck on a slow
        disk) is not waited for: this run then converts the layer without the cache.
        """
        try:
            return self.lock(key, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        log.info("layer cache entry %s is being filled by another run: waiting for it", key)
        seen, since = -1, time.monotonic()
        while True:
            time.sleep(_POLL_SECONDS)
            try:
                return self.lock(key, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            grown = self.fill_size(key)
            if grown != seen:
                seen, since = grown, time.monotonic()
            elif time.monotonic() - since > STALL_SECONDS:
                log.warning(
                    "the run filling layer cache entry %s made no progress for %d s: "
                    "converting without the cache",
                    key,
                    STALL_SECONDS,
                )
                return None

    def fill_size(self, key: str) -> int:
        total = 0
        for path in self.dir.glob(f".{fill_kind(key)}@*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                total += path.lstat().st_size
        return total

    def lock(self, key: str, how: int = fcntl.LOCK_EX) -> int | None:
        """An fd holding flock `how` on KEY.lock; None if the cache failed (it is then off).
        A lock file removed (pruned) while we waited is taken again."""
        path = self.dir / f"{key}.lock"
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        while True:
            try:
                fd = os.open(path, flags, 0o644)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise OSError(errno.ELOOP, "not a regular file")
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    self._turn_off(exc)
                    return None
                # A symlink (or FIFO…) planted as the lock: never followed, replaced.
                log.warning("layer cache lock %s is not a regular file: removed", path)
                try:
                    path.unlink()
                except OSError as gone:
                    self._turn_off(gone)
                    return None
                continue
            try:
                fcntl.flock(fd, how)
                same = os.path.samestat(os.lstat(path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                return fd
            os.close(fd)
