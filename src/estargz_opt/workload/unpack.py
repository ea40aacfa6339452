"""Apply an image's layers into one private directory tree, as containerd's applier does.

The runners that do without containerd need the image's root filesystem as a plain
tree: the runc runner binds it as the rootfs, the rootless runner builds it on a tmpfs
(fanotify cannot watch an overlayfs inside a user namespace). Layers are applied bottom
to top into the same tree, each streamed and decompressed as it is read (no temporary
copy), and checked against its diff ID once read to its end.

What an applied layer does, as containerd's `archive.Apply`: `.wh.NAME` removes NAME
from below; `.wh..wh..opq` empties its directory of what lower layers put there; an
entry replaces what was at its path (a directory over a directory is kept and updated);
missing parent directories are made 0755; hardlinks, symlinks, devices, FIFOs, modes,
ownership, mtimes and xattrs are applied; directory times are set once the layer is
done (children would change them).

Nothing is ever written or followed outside the root. Names are cleaned with '..'
clamped at the root (`../../etc/x` lands on `<root>/etc/x`, as in containerd). Every
parent directory is resolved one component at a time from a descriptor of the root,
with O_NOFOLLOW, never by the kernel. A symlink on the way that a lower layer made is
replaced by a new directory (as containerd's overlayfs applier, which writes each layer
into its own upper directory, ends up); one this layer made is resolved by this code
inside the root (an absolute target starts again at the root, '..' stops at it). The
last component is never followed. Hardlink targets are resolved the same way.

`UnpackOptions.privileged` off is for a caller without privileges (the rootless
runner): devices are skipped, and ownership, xattrs or modes the kernel refuses are
left as they come out, as containerd does in a user namespace.

Standard library, `errors`, `descriptor` and the format engine's tar reader only: no
containerd.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from estargz_opt.constants import IO_CHUNK
from estargz_opt.descriptor import Descriptor
from estargz_opt.errors import BadInputError, UnmappedOwnerError, UnpackError
from estargz_opt.format import tarfmt
from estargz_opt.format.source import plain_pieces
from estargz_opt.fstree import remove_tree

log = logging.getLogger("estargz_opt")

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
OVERLAY_OPAQUE = "trusted.overlay.opaque"
#: as Linux: more symlinks than this on one path is ELOOP
MAX_LINKS = 40
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class UnpackOptions:
    """What the caller may do. privileged: mknod, chown to any id, trusted.* xattrs.

    ids: the caller can own files only as ids 0..ids-1 (a user namespace's map); an
    entry owned by another is an UnmappedOwnerError instead of an owner left as it
    comes out, so that a rootless run does not give the workload wrong owners."""

    privileged: bool = True
    ids: int | None = None


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer to apply: its blob as a stream, and the diff ID its tar must have."""

    chunks: Iterable[bytes]
    diff_id: str
    name: str


@dataclass(slots=True)
class UnpackStats:
    """What was applied (for the log, and for tests)."""

    entries: int = 0
    skipped_devices: int = 0
    plain_bytes: int = 0
    #: the clean names each layer holds, bottom first (the recorder's layer index)
    names: list[frozenset[str]] = field(default_factory=list)


def unpack_layers(
    root: str, layers: Sequence[Layer], options: UnpackOptions | None = None
) -> UnpackStats:
    """Apply `layers`, bottom first, into the existing empty directory `root`."""
    opts = options or UnpackOptions()
    stats = UnpackStats()
    with _Tree(root, opts) as tree:
        for layer in layers:
            stats.names.append(tree.apply(layer, stats))
    return stats


def unpack_overlay_layer(
    directory: str, layer: Layer, options: UnpackOptions | None = None
) -> UnpackStats:
    """Apply one layer into the existing empty `directory` as an overlayfs layer, as
    containerd's overlayfs snapshotter holds it: a whiteout is a 0/0 character device, an
    opaque directory has `trusted.overlay.opaque=y`. Stacked as lowerdirs, such layers
    show what `unpack_layers` makes (needs root: mknod and trusted.* xattrs)."""
    stats = UnpackStats()
    with _Tree(directory, options or UnpackOptions(), overlay=True) as tree:
        stats.names.append(tree.apply(layer, stats))
    return stats


class _Forward:
    """A forward-only file over the plain tar, hashing every byte for the diff ID."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._buf = memoryview(b"")
        self.pos = 0
        self.hash = hashlib.sha256()

    def read(self, n: int, /) -> bytes:
        parts: list[bytes] = []
        while n > 0:
            if not self._buf:
                piece = next(self._pieces, None)
                if piece is None:
                    break
                self.hash.update(piece)
                self._buf = memoryview(piece)
            take = self._buf[:n]
            self._buf = self._buf[len(take) :]
            n -= len(take)
            parts.append(bytes(take))
        data = b"".join(parts)
        self.pos += len(data)
        return data

    def seek(self, offset: int, /) -> int:
        if offset < self.pos:
            raise ValueError("a layer stream cannot seek back")
        while self.pos < offset and self.read(min(offset - self.pos, IO_CHUNK)):
            pass
        return self.pos

    def drain(self) -> None:
        while self.read(IO_CHUNK):
            pass


class _Tree:
    """The root being unpacked into, with the descriptors of resolved parent directories."""

    def __init__(self, root: str, opts: UnpackOptions, *, overlay: bool = False) -> None:
        self._opts = opts
        self._overlay = overlay
        self._root_fd = os.open(root, _DIR_FLAGS)
        #: resolved parent paths: clean name -> (descriptor, resolved clean name)
        self._dirs: dict[str, tuple[int, str]] = {}
        #: real clean names the layer being applied made (see `parent`, `_empty`)
        self.made: set[str] = set()
        #: descriptors dropped from the cache, closed once the current entry is done
        self._stale: list[int] = []

    def __enter__(self) -> _Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self._forget()
        self._close_stale()
        os.close(self._root_fd)

    def _forget(self) -> None:
        """Drop the cached parents: a removal or replacement may have changed them."""
        self._stale += [fd for fd, _ in self._dirs.values()]
        self._dirs.clear()

    def _close_stale(self) -> None:
        for fd in self._stale:
            os.close(fd)
        self._stale.clear()

    # ------------------------------------------------------------ path resolution

    def parent(self, name: str, *, create: bool) -> tuple[int, str]:
        """The directory `name` (a clean name, "" for the root), resolved inside the
        root: its descriptor (owned by the cache) and its real clean name.

        A symlink on the way that this layer made is resolved inside the root; one from
        a lower layer is replaced by a new directory (with `create`). That is what
        containerd's overlayfs applier gives: it writes each layer into its own upper
        directory, where a lower layer's symlink does not exist, and the new directory
        hides it in the merged view."""
        if not name:
            return self._root_fd, ""
        hit = self._dirs.get(name)
        if hit is not None:
            return hit
        if len(self._dirs) > 256:
            self._forget()
        fd, real = self._walk(name, create)
        self._dirs[name] = (fd, real)
        return fd, real

    def _walk(self, name: str, create: bool) -> tuple[int, str]:
        todo = deque(name.split("/"))
        stack: list[tuple[int, str]] = []  # opened directories below the root
        links = 0

        def top() -> int:
            return stack[-1][0] if stack else self._root_fd

        try:
            while todo:
                part = todo.popleft()
                if part in ("", "."):
                    continue
                if part == "..":
                    if stack:
                        os.close(stack.pop()[0])
                    continue
                try:
                    fd = os.open(part, _DIR_FLAGS, dir_fd=top())
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=top())
                    os.chmod(part, 0o755, dir_fd=top(), follow_symlinks=False)
                    fd = os.open(part, _DIR_FLAGS, dir_fd=top())
                except (NotADirectoryError, OSError) as exc:
                    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    st = os.stat(part, dir_fd=top(), follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        raise UnpackError(f"{name!r}: {part!r} is not a directory") from None
                    here = stack[-1][1] + "/" + part if stack else part
                    if here not in self.made:
                        if not create:
                            raise FileNotFoundError(errno.ENOENT, "no directory", name) from None
                        os.unlink(part, dir_fd=top())
                        self._forget()
                        todo.appendleft(part)  # made as a missing directory next time
                        continue
                    links += 1
                    if links > MAX_LINKS:
                        raise UnpackError(f"{name!r}: too many levels of symbolic links") from None
                    target = os.readlink(part, dir_fd=top())
                    if target.startswith("/"):
                        while stack:
                            os.close(stack.pop()[0])
                    todo.extendleft(reversed(target.split("/")))
                    continue
                prefix = stack[-1][1] + "/" if stack else ""
                stack.append((fd, prefix + part))
        except BaseException:
            for fd, _ in stack:
                os.close(fd)
            raise
        if not stack:
            return os.dup(self._root_fd), ""
        for fd, _ in stack[:-1]:
            os.close(fd)
        return stack[-1]

    # ------------------------------------------------------------ applying a layer

    def apply(self, layer: Layer, stats: UnpackStats) -> frozenset[str]:
        """Apply one layer; the clean names it holds."""
        plain = _Forward(plain_pieces(layer.chunks, f"layer {layer.name}"))
        made = self.made = set()
        self._forget()  # resolutions through this layer's symlinks are not the next one's
        names: set[str] = set()
        dir_times: list[tuple[str, tarfmt.TarEntry]] = []
        try:
            for e in tarfmt.iter_entries(plain, None):
                name = tarfmt.clean_name(e.name)
                if not name:
                    continue  # the root itself: containerd ignores it too
                names.add(name)
                stats.entries += 1
                self._entry(e, name, plain, made, dir_times, stats)
                self._close_stale()
            plain.drain()
        except OSError as exc:
            raise UnpackError(f"cannot apply layer {layer.name}: {exc}") from None
        except UnmappedOwnerError:
            raise
        except UnpackError as exc:
            raise UnpackError(f"cannot apply layer {layer.name}: {exc}") from None
        stats.plain_bytes += plain.pos
        applied = "sha256:" + plain.hash.hexdigest()
        if applied != layer.diff_id:
            raise UnpackError(
                f"layer {layer.name} unpacks to {applied}, but the image config says its "
                f"diff ID is {layer.diff_id}"
            )
        for real, e in dir_times:
            with contextlib.suppress(FileNotFoundError, UnpackError):
                pfd, base = self._at(real, create=False)
                self._times(e, base, pfd)
            self._close_stale()
        return frozenset(names)

    def _at(self, name: str, *, create: bool) -> tuple[int, str]:
        parent, base = _split(name)
        pfd, _ = self.parent(parent, create=create)
        return pfd, base

    def _entry(
        self,
        e: tarfmt.TarEntry,
        name: str,
        plain: _Forward,
        made: set[str],
        dir_times: list[tuple[str, tarfmt.TarEntry]],
        stats: UnpackStats,
    ) -> None:
        parent, base = _split(name)
        pfd, real_parent = self.parent(parent, create=True)
        real = f"{real_parent}/{base}" if real_parent else base
        if base == OPAQUE:
            if self._overlay:
                os.setxattr(_proc_path(pfd, ""), OVERLAY_OPAQUE, b"y")
            else:
                self._empty(pfd, real_parent, made)
            return
        if base.startswith(WHITEOUT_PREFIX):
            gone = base[len(WHITEOUT_PREFIX) :]
            if gone not in ("", ".", ".."):  # ".wh..." must not remove the parent
                self._remove(pfd, gone)
                if self._overlay:
                    os.mknod(gone, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
                    made.add(f"{real_parent}/{gone}" if real_parent else gone)
            return
        try:
            old = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            old = None
        keep_dir = old is not None and stat.S_ISDIR(old.st_mode) and e.typeflag == tarfmt.DIR
        if old is not None and not keep_dir:
            self._remove(pfd, base)
        made.add(real)
        made.update(_ancestors(real))  # parents made on the way are this layer's too
        kind = e.typeflag
        if kind == tarfmt.REG:
            self._file(e, base, pfd, plain)
            return
        if kind == tarfmt.DIR:
            if not keep_dir:
                os.mkdir(base, 0o700, dir_fd=pfd)
            dir_times.append((real, e))
        elif kind == tarfmt.SYMLINK:
            os.symlink(e.linkname, base, dir_fd=pfd)
            self._forget()  # a cached parent path may now resolve through it
        elif kind == tarfmt.LINK:
            if self._hardlink(e, base, pfd):
                self._chown(e, base=base, pfd=pfd)
                return  # a link to a symlink: lchown only, as containerd does
            # else containerd applies the link entry's owner, mode and times to the
            # inode it shares with its target
        elif kind in (tarfmt.CHAR, tarfmt.BLOCKDEV):
            if not self._opts.privileged:
                log.debug("skipping device %s: mknod needs privileges", name)
                stats.skipped_devices += 1
                made.discard(real)
                return
            ftype = stat.S_IFCHR if kind == tarfmt.CHAR else stat.S_IFBLK
            os.mknod(base, 0o600 | ftype, os.makedev(e.devmajor, e.devminor), dir_fd=pfd)
        elif kind == tarfmt.FIFO:
            os.mkfifo(base, 0o600, dir_fd=pfd)
        self._metadata(e, base, pfd)
        if kind != tarfmt.DIR:
            self._times(e, base, pfd)

    def _file(self, e: tarfmt.TarEntry, base: str, pfd: int, plain: _Forward) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(base, flags, 0o600, dir_fd=pfd)
        try:
            plain.seek(e.data_offset)
            left = e.size
            while left:
                data = plain.read(min(left, IO_CHUNK))
                if not data:
                    raise UnpackError(f"truncated tar: content of {e.name!r} ends early")
                _write_all(fd, data)
                left -= len(data)
            self._chown(e, fd=fd)
            self._xattrs(e, fd=fd)
            self._chmod(e, fd=fd)
            os.utime(fd, ns=_times_ns(e))
        finally:
            os.close(fd)

    def _hardlink(self, e: tarfmt.TarEntry, base: str, pfd: int) -> bool:
        """Link `base` to the entry's target; whether the target is a symlink."""
        target = tarfmt.clean_name(e.linkname)
        if not target:
            raise UnpackError(f"hardlink {e.name!r} points at the root")
        try:
            tfd, tbase = self._at(target, create=False)
            os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            return stat.S_ISLNK(os.stat(base, dir_fd=pfd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            raise UnpackError(
                f"hardlink {e.name!r} points at {e.linkname!r}, which is not in the image"
            ) from None
        except PermissionError:
            raise UnpackError(f"hardlink {e.name!r} points at a directory") from None

    def _metadata(self, e: tarfmt.TarEntry, base: str, pfd: int) -> None:
        """Owner, xattrs and mode (in that order: chown clears set-id bits)."""
        if e.typeflag == tarfmt.SYMLINK:
            self._chown(e, base=base, pfd=pfd)
            self._xattrs(e, path=_proc_path(pfd, base))
            return
        if e.typeflag == tarfmt.DIR:
            fd = os.open(
                base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd
            )
            try:
                self._chown(e, fd=fd)
                self._xattrs(e, fd=fd)
                self._chmod(e, fd=fd)
            finally:
                os.close(fd)
            return
        # devices and FIFOs: never opened (that could block or touch hardware)
        self._chown(e, base=base, pfd=pfd)
        self._xattrs(e, path=_proc_path(pfd, base))
        try:
            os.chmod(base, e.mode & 0o7777, dir_fd=pfd, follow_symlinks=False)
        except OSError as exc:
            self._refused("chmod", e, exc)

    def _chown(
        self, e: tarfmt.TarEntry, *, fd: int | None = None, base: str = "", pfd: int = -1
    ) -> None:
        ids = self._opts.ids
        if ids is not None and (e.uid >= ids or e.gid >= ids):
            raise UnmappedOwnerError(tarfmt.clean_name(e.name), e.uid, e.gid)
        try:
            if fd is not None:
                os.fchown(fd, e.uid, e.gid)
            else:
                os.chown(base, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        except OSError as exc:
            self._refused("chown", e, exc)

    def _chmod(self, e: tarfmt.TarEntry, *, fd: int) -> None:
        try:
            os.fchmod(fd, e.mode & 0o7777)
        except OSError as exc:
            self._refused("chmod", e, exc)

    def _xattrs(self, e: tarfmt.TarEntry, *, fd: int | None = None, path: str = "") -> None:
        for key, value in e.xattrs.items():
            try:
                if fd is not None:
                    os.setxattr(fd, key, value)
                else:
                    os.setxattr(path, key, value, follow_symlinks=False)
            except OSError as exc:
                # containerd skips what the filesystem does not support, e.g. user.* on
                # a symlink, or trusted.* without privileges
                if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                log.debug("xattr %s of %s not set: %s", key, e.name, exc.strerror)

    def _refused(self, what: str, e: tarfmt.TarEntry, exc: OSError) -> None:
        if self._opts.privileged or exc.errno not in (errno.EPERM, errno.EINVAL):
            raise exc
        log.debug("%s of %s not applied without privileges: %s", what, e.name, exc.strerror)

    def _times(self, e: tarfmt.TarEntry, base: str, pfd: int) -> None:
        os.utime(base, ns=_times_ns(e), dir_fd=pfd, follow_symlinks=False)

    def _remove(self, pfd: int, base: str) -> None:
        """Remove `base` in the directory `pfd`, whatever it is (a missing one is fine)."""
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self._forget()
            remove_tree(base, dir_fd=pfd)
        else:
            os.unlink(base, dir_fd=pfd)

    def _empty(self, pfd: int, real: str, made: set[str]) -> None:
        """An opaque directory: remove what lower layers put in it (not this layer's)."""
        prefix = f"{real}/" if real else ""
        with os.scandir(_proc_path(pfd, "")) as it:
            children = [c.name for c in it]
        for child in children:
            if prefix + child not in made:
                self._remove(pfd, child)


def _ancestors(name: str) -> Iterator[str]:
    while "/" in name:
        name = name.rpartition("/")[0]
        yield name


def _split(name: str) -> tuple[str, str]:
    parent, _, base = name.rpartition("/")
    return parent, base


def _proc_path(fd: int, base: str) -> str:
    """The path of `base` in the directory `fd`, through the descriptor (no lookup of
    any parent by name)."""
    return f"/proc/self/fd/{fd}/{base}" if base else f"/proc/self/fd/{fd}"


def _times_ns(e: tarfmt.TarEntry) -> tuple[int, int]:
    """(atime, mtime) as containerd sets them: atime is the later of the two."""
    mtime = e.mtime * 1_000_000_000 + e.mtime_nsec
    atime = e.atime[0] * 1_000_000_000 + e.atime[1] if e.atime else mtime
    return max(atime, mtime), mtime


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def image_layers(
    layers: Sequence[Descriptor],
    diff_ids: Sequence[str],
    stream: Callable[[Descriptor], Iterable[bytes]],
) -> list[Layer]:
    """`Layer`s from a manifest's layer descriptors, the config's diff IDs and a way to
    stream a blob (`Store.stream`, `Runner.layer_chunks`)."""
    if len(layers) != len(diff_ids):
        raise BadInputError(
            f"the image has {len(layers)} layers but its config lists {len(diff_ids)} diff IDs"
        )
    return [
        Layer(stream(desc), diff_id, desc.digest)
        for desc, diff_id in zip(layers, diff_ids, strict=True)
    ]
