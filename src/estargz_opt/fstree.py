"""Walking and removing directory trees of any depth, without recursion.

Image trees come from someone else: a layer may nest directories deeper than Python's
recursion limit (3.11's `os.walk` and `shutil.rmtree` recurse once per level) and
deeper than PATH_MAX. So these walks hold one directory descriptor at a time, step down
by name (`O_NOFOLLOW`: a symlink is never followed) and back up through "..", checked
against the device and inode the parent had on the way down, so that a directory moved
meanwhile stops the walk with an error instead of leading it elsewhere. What a walk
remembers per level is the names still to visit there, never an open descriptor, so no
depth runs out of descriptors either.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry met by `walk`: `dir_fd` (its directory, open until the walk moves on),
    its `name` there, its path relative to the top, and its `lstat`."""

    dir_fd: int
    name: str
    path: str
    st: os.stat_result


@dataclass(slots=True)
class _Level:
    ident: tuple[int, int]  # (st_dev, st_ino) of the directory
    prefix: str  # its path relative to the top, "" or ending in "/"
    names: list[str] = field(default_factory=list)  # still to visit, last first


class _Cursor:
    """The one open directory of a walk, moved down by name and up through ".."."""

    def __init__(self, top: str, dir_fd: int | None = None) -> None:
        self.fd = os.open(top, _DIR_FLAGS, dir_fd=dir_fd)
        st = os.fstat(self.fd)
        self.levels = [_Level((st.st_dev, st.st_ino), "")]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def down(self, name: str) -> None:
        fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        st = os.fstat(fd)
        os.close(self.fd)
        self.fd = fd
        self.levels.append(_Level((st.st_dev, st.st_ino), f"{self.levels[-1].prefix}{name}/"))

    def up(self) -> None:
        self.levels.pop()
        fd = os.open("..", _DIR_FLAGS, dir_fd=self.fd)
        st = os.fstat(fd)
        os.close(self.fd)
        self.fd = fd
        if (st.st_dev, st.st_ino) != self.levels[-1].ident:
            raise OSError(f"{self.levels[-1].prefix or '.'} was moved during the walk")


def walk(top: str, *, sort: bool = False) -> Iterator[Entry]:
    """Every entry under `top` (not `top` itself), each directory before what it holds
    (pre-order; by name with `sort`); symlinks are reported, never followed."""
    cur = _Cursor(top)
    try:
        cur.levels[-1].names = _names(cur.fd, sort)
        while True:
            level = cur.levels[-1]
            if not level.names:
                if len(cur.levels) == 1:
                    return
                cur.up()
                continue
            name = level.names.pop()
            try:
                st = os.stat(name, dir_fd=cur.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield Entry(cur.fd, name, level.prefix + name, st)
            if stat.S_ISDIR(st.st_mode):
                cur.down(name)
                cur.levels[-1].names = _names(cur.fd, sort)
    finally:
        cur.close()


def tree_size(top: str) -> int:
    """The bytes the files under `top` take on disk (what `du` counts, hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for e in walk(top):
        if (e.st.st_dev, e.st.st_ino) not in seen:
            seen.add((e.st.st_dev, e.st.st_ino))
            total += e.st.st_blocks * 512
    return total


def remove_tree(top: str, *, dir_fd: int | None = None) -> None:
    """Remove `top` (relative to `dir_fd` if given) and everything under it, at any
    depth (a missing `top` is fine). OSError if something cannot be removed; what could
    be is gone."""
    try:
        cur = _Cursor(top, dir_fd)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        os.unlink(top, dir_fd=dir_fd)
        return
    try:
        cur.levels[-1].names = _names(cur.fd, False)
        while True:
            level = cur.levels[-1]
            if not level.names:
                if len(cur.levels) == 1:
                    break
                name = level.prefix.rstrip("/").rpartition("/")[2]
                cur.up()
                os.rmdir(name, dir_fd=cur.fd)
                continue
            name = level.names.pop()
            try:
                st = os.stat(name, dir_fd=cur.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                cur.down(name)
                cur.levels[-1].names = _names(cur.fd, False)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=cur.fd)
    finally:
        cur.close()
    os.rmdir(top, dir_fd=dir_fd)


def _names(fd: int, sort: bool) -> list[str]:
    """The names in the directory `fd`, in the order a stack pops them."""
    with os.scandir(fd) as it:
        names = [e.name for e in it]
    if sort:
        names.sort(reverse=True)
    else:
        names.reverse()
    return names
