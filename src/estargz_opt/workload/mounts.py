"""Mount a snapshot's mounts on a directory, and take them down again (mount(2) via ctypes).

The sample container's rootfs is mounted by the file-access monitor inside its private
mount namespace. Runners describe that rootfs as `estargz_opt.mount.Mount`s in mount(8)
terms (type, source, comma options), as containerd's snapshotters do; this turns the
flag words into mount(2) flags and passes the rest as filesystem data, as containerd's
`mount.All` does. This module imports nothing of grpc: the privileged monitor helper
runs it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

from estargz_opt.errors import MountError
from estargz_opt.mount import Mount

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2

_FLAGS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "bind": MS_BIND,
    "rbind": MS_BIND | MS_REC,
}
_IGNORED = {"rw", "suid", "dev", "exec", "defaults"}


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    libc = _libc()
    rc = libc.mount(
        os.fsencode(source),
        os.fsencode(target),
        os.fsencode(fstype) if fstype else None,
        flags,
        os.fsencode(data) if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise MountError(
            f"cannot mount {fstype or 'bind'} {source} on {target}: {os.strerror(err)}"
        )


def mount_all(mounts: Sequence[Mount], target: str) -> None:
    """Mount each of `mounts` on `target`, in order (a snapshot usually has just one)."""
    for m in mounts:
        flags = 0
        data: list[str] = []
        for opt in m.options:
            if opt in _FLAGS:
                flags |= _FLAGS[opt]
            elif opt not in _IGNORED:
                data.append(opt)
        if flags & MS_BIND:
            _mount(m.source, target, "", flags & (MS_BIND | MS_REC), "")
            if flags & ~(MS_BIND | MS_REC):  # a bind mount takes ro etc. only on remount
                _mount("", target, "", flags | MS_REMOUNT, "")
        else:
            _mount(m.source, target, m.type, flags, ",".join(data))


def unmount(target: str) -> None:
    """Unmount `target`; lazily if it is busy, so that cleanup never leaves a mount."""
    libc = _libc()
    path = os.fsencode(target)
    while True:
        if libc.umount2(path, 0) == 0:
            continue  # a stacked mount may be under it
        err = ctypes.get_errno()
        if err == 16:  # EBUSY: detach it now; the kernel finishes when it is unused
            if libc.umount2(path, MNT_DETACH) == 0:
                continue
            err = ctypes.get_errno()
        if err == 22:  # EINVAL: not a mount point (any more)
            return
        raise MountError(f"cannot unmount {target}: {os.strerror(err)}")


def remount(target: str, data: str) -> None:
    """Change the filesystem options of the mount on `target` (e.g. a tmpfs's size)."""
    _mount("", target, "", MS_REMOUNT, data)


def make_rslave(path: str = "/") -> None:
    """Stop mounts made below `path` in this namespace from reaching the host's."""
    _mount("", path, "", MS_REC | MS_SLAVE, "")


def is_mounted(target: str) -> bool:
    """Whether `target` is a mount point in this process's mount namespace."""
    real = os.path.realpath(target)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == real:
                return True
    return False


def _unescape(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return (
        text.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )
