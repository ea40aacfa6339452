"""Reading files inside the image rootfs without ever leaving it.

The image's /etc/passwd and /etc/group are read before the container runs, from the host:
a hostile image may make them symlinks to host files, so every component is resolved by
hand, confined to the rootfs.
"""

from __future__ import annotations

import errno
import os
import stat

from estargz_opt.errors import BadInputError

_MAX_SYMLINKS = 40
_MAX_DB_SIZE = 8 << 20  # /etc/passwd or /etc/group larger than this is refused


def _open_in_root(root: str, path: str) -> int | None:
    """Open `path` inside the directory `root` as if `root` were '/'.

    Each component is opened relative to its parent's fd with O_NOFOLLOW; symlinks are
    read with readlinkat and resolved by hand, with absolute targets and '..' clamped at
    `root`. Nothing outside `root` can be reached, whatever the image contains (a
    symlink swapped in between the readlink and the open makes the open fail with
    ELOOP). Returns an fd of a regular file, or None when there is no such file.
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    dirs = [root_fd]
    pending = [p for p in path.split("/") if p not in ("", ".")]
    pending.reverse()  # a stack: the next component is at the end
    links = 0
    try:
        while pending:
            name = pending.pop()
            if name == "..":
                if len(dirs) > 1:
                    os.close(dirs.pop())
                continue
            try:
                target = os.readlink(name, dir_fd=dirs[-1])
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    return None
                if e.errno != errno.EINVAL:  # EINVAL: not a symlink
                    raise
            else:
                links += 1
                if links > _MAX_SYMLINKS:
                    return None
                if target.startswith("/"):
                    while len(dirs) > 1:
                        os.close(dirs.pop())
                parts = [p for p in target.split("/") if p not in ("", ".")]
                pending.extend(reversed(parts))
                continue
            last = not pending
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            if not last:
                flags |= os.O_DIRECTORY
            try:
                fd = os.open(name, flags, dir_fd=dirs[-1])
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EISDIR):
                    return None
                raise
            if last:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    return None
                return fd
            dirs.append(fd)
        return None
    finally:
        for d in dirs:
            os.close(d)


def read_rootfs_file(rootfs: str, path: str, limit: int = _MAX_DB_SIZE) -> str | None:
    """Text of the regular file `path` inside `rootfs` (see _open_in_root), or None."""
    try:
        fd = _open_in_root(rootfs, path)
    except OSError as e:
        raise BadInputError(f"cannot read {path} in the image rootfs: {e.strerror}") from None
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BadInputError(f"{path} in the image rootfs is larger than {limit} bytes")
    return data.decode("utf-8", errors="replace")
