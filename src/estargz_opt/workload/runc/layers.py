"""Unpacked layers kept between runs, one directory per diff ID, stacked with overlayfs.

containerd keeps each unpacked layer as a snapshot, so its runner unpacks an image once;
this is the same for the runc runner. A layer is unpacked (`unpack_overlay_layer`) into
`<cache>/unpacked/<diff id hex>` once, then every run of any image holding that layer
stacks it as an overlayfs lowerdir under its own upper directory (the workload's writes
never reach the shared layers).

The directory is root's only (0700, and refused when someone else owns it): layers keep
their setuid/setgid files and file capabilities, as the workload may need them (an
image's `su`, `ping`), so no other user may reach them, as containerd keeps its
snapshots under a 0700 root. Trees are walked and removed without recursion
(`fstree`), whatever their depth; a fill that cannot be removed is logged and left, and
never stops a run.

Concurrency and crashes, as the converted-layer cache handles them: a layer is filled
into a temporary directory named after its owner process and renamed into place (a
concurrent fill of the same layer keeps the first); a run holds a shared flock on each
layer it stacks, and eviction (least recently used first, above `max_size`) takes an
exclusive one without waiting, so a layer in use is never removed; fills left by a run
killed with SIGKILL are removed by the next run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from estargz_opt.constants import DEFAULT_CACHE_MAX_SIZE
from estargz_opt.fstree import remove_tree, tree_size
from estargz_opt.stores.owner import is_dead, temp_owner, temp_prefix
from estargz_opt.workload.unpack import Layer, UnpackOptions, unpack_overlay_layer

log = logging.getLogger("estargz_opt")

SUBDIR = "unpacked"
_FILL = "unpack"


class UnpackedLayers:
    """The unpacked-layer directory under a cache root (see the module docstring)."""

    def __init__(self, root: Path, max_size: int = DEFAULT_CACHE_MAX_SIZE) -> None:
        self.dir = root / SUBDIR
        self.max_size = max_size

    def paths(self, layers: Sequence[Layer]) -> list[str]:
        """Where each layer's directory is (or will be), bottom first."""
        return [str(self.dir / layer.diff_id.removeprefix("sha256:")) for layer in layers]

    @contextlib.contextmanager
    def hold(self, layers: Sequence[Layer], options: UnpackOptions) -> Iterator[list[str]]:
        """The directory of each layer (bottom first), unpacked if needed, kept from
        eviction until the context ends."""
        _private_dir(self.dir)
        self._reap_dead_fills()
        with contextlib.ExitStack() as stack:
            paths = []
            for layer in layers:
                key = layer.diff_id.removeprefix("sha256:")
                stack.enter_context(_lock_file(self.dir / f"{key}.lock"))
                path = self.dir / key
                if not path.is_dir():
                    # one fill at a time; a concurrent run of the same layer waits for it
                    with _lock_file(self.dir / f"{key}.fill", fcntl.LOCK_EX):
                        if not path.is_dir():
                            self._fill(path, layer, options)
                else:
                    log.debug("layer %s is unpacked already", layer.name)
                os.utime(self.dir / f"{key}.lock")  # its last use, for eviction
                paths.append(str(path))
            yield paths
        self.evict()

    def _fill(self, path: Path, layer: Layer, options: UnpackOptions) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(_FILL), suffix=".tmp", dir=self.dir))
        try:
            stats = unpack_overlay_layer(str(tmp), layer, options)
            size = tree_size(str(tmp))
            (self.dir / f"{path.name}.size").write_text(str(size))
            os.chmod(tmp, 0o755)
            os.rename(tmp, path)
            log.debug("unpacked layer %s: %d entries, %d MB", layer.name, stats.entries, size >> 20)
        except BaseException:
            _remove(tmp, "a partial unpack")
            raise

    def _reap_dead_fills(self) -> None:
        for entry in os.scandir(self.dir):
            owner = temp_owner(entry.name)
            if owner is not None and is_dead(owner):
                log.info("deleting %s, left by a run that was killed", entry.path)
                _remove(Path(entry.path), "a partial unpack")

    def evict(self) -> None:
        """Remove least recently used layers until at most `max_size` bytes are kept;
        layers another run holds are skipped."""
        entries = []
        for lock in self.dir.glob("*.lock"):
            key = lock.name[: -len(".lock")]
            try:
                size = int((self.dir / f"{key}.size").read_text())
                entries.append((lock.stat().st_mtime, size, key))
            except (OSError, ValueError):
                continue
        total = sum(size for _, size, _ in entries)
        for _, size, key in sorted(entries):
            if total <= self.max_size:
                return
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(
                        _lock_file(self.dir / f"{key}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
                    )
                except BlockingIOError:
                    continue  # in use
                log.debug("evicting unpacked layer %s (%d MB)", key, size >> 20)
                if not _remove(self.dir / key, "an evicted layer"):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dir / f"{key}.size")
                total -= size


@contextlib.contextmanager
def _lock_file(path: Path, how: int = fcntl.LOCK_SH) -> Iterator[int]:
    """A lock file, flocked `how` (shared: in use) while the context lasts."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, how)
        yield fd
    finally:
        os.close(fd)


def _private_dir(path: Path) -> None:
    """Make `path` (and its parents) and check that it is ours and no one else's: a
    directory, not a symlink, owned by us, mode 0700 (set if an older run left it 0755),
    in a directory that only we (or root) can change, so that no one can swap it.
    PermissionError otherwise: the runner then unpacks into the run directory."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st, parent = os.lstat(path), os.stat(path.parent)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise PermissionError(errno.EPERM, f"{path} is not a directory owned by uid {os.geteuid()}")
    if parent.st_uid not in (0, os.geteuid()) or parent.st_mode & 0o022:
        raise PermissionError(
            errno.EPERM, f"{path.parent} can be changed by another user than uid {os.geteuid()}"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700, follow_symlinks=False)


def _remove(path: Path, what: str) -> bool:
    """Remove a tree; a failure is logged (the next run tries again) and never raised."""
    try:
        remove_tree(str(path))
        return True
    except OSError as exc:
        log.warning("cannot remove %s %s: %s", what, path, exc)
        return False
