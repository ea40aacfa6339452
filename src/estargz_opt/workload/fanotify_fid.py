"""fanotify in file-handle mode, for the rootless runner: events name files by handle.

Inside an unprivileged user namespace the kernel refuses fanotify groups that hand out
file descriptors (EPERM); only `FAN_REPORT_FID` groups are allowed, and since Linux 6.16
they may put a `FAN_MARK_FILESYSTEM` mark on a filesystem that namespace mounted (a
tmpfs; not overlayfs, which gives no handles there, nor a host bind mount). Each event
then carries a `fanotify_event_info_fid` record: the filesystem id and a `file_handle`.

A handle is turned back into a path with `HandleMap`: the unpacked rootfs is walked once,
right after unpacking, with `name_to_handle_at` (no privilege needed), mapping each
regular file's handle to its path. Files the workload creates later are in no image
layer, so they need no path: their events are dropped. Only paths from that walk can
come out, so nothing outside the rootfs can ever be recorded, whatever the image holds.
A file with several hard links is reported under the name the walk met first (sorted).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct
from collections.abc import Iterator

from estargz_opt.errors import FanotifyError
from estargz_opt.fstree import walk
from estargz_opt.workload.fanotify import (
    FAN_ACCESS,
    FAN_MARK_ADD,
    FAN_OPEN,
    FAN_Q_OVERFLOW,
    FANOTIFY_METADATA_VERSION,
    Group,
    _permission_error,
    init_group,
)

log = logging.getLogger("estargz_opt")

FAN_REPORT_FID = 0x00000200
FAN_MARK_FILESYSTEM = 0x00000100
FAN_EVENT_INFO_TYPE_FID = 1
MAX_HANDLE_SZ = 128

_METADATA = struct.Struct("<IBBHQii")
# struct fanotify_event_info_header: u8 info_type, u8 pad, u16 len; then
# __kernel_fsid_t (2 x s32) and struct file_handle (u32 handle_bytes, s32 handle_type).
_INFO_HEADER = struct.Struct("<BBH")
_FSID = struct.Struct("<ii")
_HANDLE_HEAD = struct.Struct("<Ii")
_READ_SIZE = 64 * 1024

#: A file handle as the kernel reports it: (handle_type, f_handle bytes).
Handle = tuple[int, bytes]


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


class HandleMap:
    """Handle → rootfs-relative path of every regular file under `root`, walked once."""

    def __init__(self, root: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.name_to_handle_at
        fn.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.POINTER(_FileHandle),
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
        ]
        fn.restype = ctypes.c_int
        self._fn = fn
        self.paths: dict[Handle, str] = {}
        # Sorted, so that of several hard links the same one always wins; iterative, as
        # an image's tree may be deeper than the recursion limit.
        for e in walk(root, sort=True):
            if stat.S_ISREG(e.st.st_mode):
                handle = self._handle(e.dir_fd, e.name)
                if handle is not None:
                    self.paths.setdefault(handle, e.path)

    def _handle(self, dir_fd: int, name: str) -> Handle | None:
        fh = _FileHandle()
        fh.handle_bytes = MAX_HANDLE_SZ
        mount_id = ctypes.c_int()
        if self._fn(dir_fd, os.fsencode(name), ctypes.byref(fh), ctypes.byref(mount_id), 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EOPNOTSUPP:
                raise FanotifyError(
                    "cannot map file handles to paths: the rootfs filesystem has no file "
                    "handles (EOPNOTSUPP)"
                )
            log.debug("name_to_handle_at %s: %s", name, os.strerror(err))
            return None
        return fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes])


def parse_fid_events(buf: bytes) -> Iterator[Handle | None]:
    """The handle of each event in `buf` (a read of a FAN_REPORT_FID group), or None for
    a queue overflow."""
    off = 0
    while off + _METADATA.size <= len(buf):
        event_len, vers, _, metadata_len, mask, _fd, _pid = _METADATA.unpack_from(buf, off)
        if vers != FANOTIFY_METADATA_VERSION or event_len < _METADATA.size:
            raise FanotifyError(
                f"unsupported fanotify event metadata version {vers} "
                f"(expected {FANOTIFY_METADATA_VERSION})"
            )
        end = off + event_len
        if mask & FAN_Q_OVERFLOW:
            yield None
        info = off + metadata_len
        while info + _INFO_HEADER.size <= end:
            info_type, _, length = _INFO_HEADER.unpack_from(buf, info)
            if length < _INFO_HEADER.size:
                raise FanotifyError(f"bad fanotify info record length {length}")
            if info_type == FAN_EVENT_INFO_TYPE_FID:
                head = info + _INFO_HEADER.size + _FSID.size
                size, htype = _HANDLE_HEAD.unpack_from(buf, head)
                start = head + _HANDLE_HEAD.size
                yield htype, bytes(buf[start : start + size])
            info += length
        off = end


class FidMonitor(Group):
    """Records regular files opened or read on the filesystem of `root` (FID mode).

    The group is created at construction (so that a refusal is known before anything
    runs) and the filesystem is marked by `mark()`; `events()` yields "/"-rooted paths
    from `handles`, in the order the kernel queued them.
    """

    def __init__(self, root: str, handles: HandleMap) -> None:
        self.root = root
        self.handles = handles
        self.overflows = 0
        self.unknown = 0
        self._fd, self._libc = init_group(
            FAN_REPORT_FID, os.O_RDONLY | os.O_CLOEXEC, "fanotify_init(FAN_REPORT_FID)"
        )
        # Held from now on: once the container pivots into the rootfs, `root` no longer
        # names it in this process (whose root moved with it).
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def mark(self) -> None:
        """Start reporting opens and reads anywhere on the filesystem of `root`."""
        rc = self._libc.fanotify_mark(
            self._fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_ACCESS | FAN_OPEN, self._root_fd, None
        )
        if rc < 0:
            err = ctypes.get_errno()
            self.close()
            if err == errno.EPERM:
                raise _permission_error(f"fanotify_mark(FAN_MARK_FILESYSTEM) on {self.root}")
            raise FanotifyError(
                f"cannot watch {self.root} with a fanotify filesystem mark: {os.strerror(err)}"
            )

    def events(self) -> Iterator[str]:
        """Yield the path of every event queued now, without waiting for more."""
        if self._fd < 0:
            raise FanotifyError("the fanotify monitor is closed")
        while True:
            try:
                buf = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return
            if not buf:
                return
            for handle in parse_fid_events(buf):
                if handle is None:
                    self.overflows += 1
                    log.warning("fanotify queue overflow: some file accesses were not recorded")
                    continue
                path = self.handles.paths.get(handle)
                if path is None:
                    self.unknown += 1  # a file the workload made: in no layer
                    continue
                yield "/" + path

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            os.close(self._root_fd)
            self._fd = -1
