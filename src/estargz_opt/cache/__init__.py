"""A content-addressed cache of converted layers, shared by every run on a machine.

The format engine is deterministic: one source layer, one set of byte-changing options
and one prioritized file list always give the same blob. So a converted layer stored
under a key made of exactly those inputs (plus the engine's OUTPUT_VERSION) can be
reused by any later run, and a rebuilt image recompresses only the layers that changed.

Its jobs, one module each: `keys` (which conversion an entry holds; where the cache
lives), `files` (entry metadata and every file of the cache, trusted no further than
checked), `locks` (one flock per key; waiting for another run's fill), `eviction` (least
recently used entries beyond the size limit; the hit and miss counts). This module holds
the cache of one run (`LayerCache`), its entries (`Slot`), and the one path of a
conversion through it (`cached_build`), which optimize and `layer convert` share.

Layout, under ``DIR/layers/`` (DIR also holds other tools' subdirectories):

* ``KEY.blob`` the converted blob, ``KEY.meta`` its LayerResult (JSON); the entry exists
  once its ``.meta`` does (both are renamed into place, the ``.meta`` last);
* ``KEY.lock`` a flock per key: a run filling an entry holds it, so a second run
  converting the same layer waits and then uses the entry;
* ``.fill-KEY@OWNER@….tmp`` blobs being written, named after their key and owner
  (stores/owner.py): a run killed mid-fill leaves one, which the next run deletes; a
  run waiting for the key watches it grow (and stops waiting for a stalled one);
* ``stats.json`` hits and misses, for ``cache info``.

A hit is served only if its ``.meta`` names the requested key (entries swapped between
keys are each consistent in themselves) and its blob hashes to the recorded digest while
being copied; a damaged entry is removed, logged and rebuilt. Nothing in the cache is
trusted further than that: no symlink inside it is followed (every file is opened with
O_NOFOLLOW and its type checked on the open descriptor, so a blob linked to a host file
or to /dev/zero is never read), metadata and stats go through jsonlimits and are checked
field by field, and a cache directory not owned by the running user is not used at all
(as git's safe.directory: its owner could plant entries). Any OSError of the cache
(read-only, disk full) turns the cache off for the rest of the run with one warning: a
cache never fails a run.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from estargz_opt.atomic import atomic_output, temp_file
from estargz_opt.cache.eviction import STATS, Stats, Usage, add_stats, entries, evict, read_stats
from estargz_opt.cache.files import (
    MAX_META,
    Damaged,
    foreign,
    not_ours,
    open_regular,
    read_small,
    replace_file,
    result_from_json,
    result_to_json,
)
from estargz_opt.cache.keys import ENV_DIR, default_dir, fill_kind, layer_key
from estargz_opt.cache.locks import STALL_SECONDS, KeyLocks
from estargz_opt.constants import DEFAULT_CACHE_MAX_SIZE, IO_CHUNK
from estargz_opt.digest import digest_of, hasher
from estargz_opt.errors import ForeignCacheError
from estargz_opt.format import LayerOptions, LayerResult, build_layer
from estargz_opt.format.codec import Output
from estargz_opt.format.source import open_tar
from estargz_opt.stores.owner import is_dead, temp_owner, temp_prefix

__all__ = [
    "ENV_DIR",
    "STALL_SECONDS",
    "SUBDIR",
    "Fill",
    "Hit",
    "LayerCache",
    "Slot",
    "Stats",
    "Usage",
    "cached_build",
    "convert_file",
    "default_dir",
    "foreign",
    "layer_key",
]

log = logging.getLogger("estargz_opt")

SUBDIR = "layers"


class LayerCache:
    """One cache directory, for one run (several threads) or one `cache` command."""

    def __init__(self, root: Path, max_size: int = DEFAULT_CACHE_MAX_SIZE) -> None:
        self.root = root
        self.dir = root / SUBDIR
        self.max_size = max_size
        self.stats = Stats()
        #: why the cache was turned off for this run (its one warning), for the report
        self.warning: str | None = None
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._opened = False
        self.locks = KeyLocks(self.dir, self.turn_off)

    # ------------------------------------------------------------------ state

    @property
    def usable(self) -> bool:
        return self.warning is None

    def turn_off(self, exc: OSError | str) -> None:
        """Stop using the cache for this run, with one warning line."""
        why = exc if isinstance(exc, str) else exc.strerror or str(exc)
        with self._lock:
            if self.warning is not None:
                return
            self.warning = (
                f"the layer cache {self.dir} cannot be used ({why}): converting without it"
            )
        log.warning("%s", self.warning)

    def refusal(self) -> str | None:
        """Why this cache directory must not be used: see `foreign`; its layers/ must
        also be a real directory of this user's."""
        why = foreign(self.root)
        if why is not None:
            return why
        try:
            st = os.lstat(self.dir)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return f"{self.dir} is a symbolic link (never followed inside the cache)"
        if not stat.S_ISDIR(st.st_mode):
            return f"{self.dir} is not a directory"
        return not_ours(st)

    def _open(self) -> bool:
        """Create the directory and reap killed runs' fills, once; the layer threads
        all wait for it (one that went ahead would find no directory)."""
        with self._open_lock:
            if not self._opened:
                self._opened = True
                try:  # nothing is made inside another user's directory
                    why = foreign(self.root)
                    if why is None:
                        self.dir.mkdir(parents=True, exist_ok=True)
                        why = self.refusal()
                    if why is not None:
                        self.turn_off(why)
                    else:
                        self._remove_dead_fills()
                except OSError as exc:
                    self.turn_off(exc)
        return self.usable

    def _remove_dead_fills(self) -> None:
        for entry in os.scandir(self.dir):
            owner = temp_owner(entry.name)
            if owner is not None and is_dead(owner):
                log.info("deleting %s, left by a run that was killed", entry.path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def count(self, hit: bool) -> None:
        """One hit or miss of this run (a slot reports them; `finish` records them)."""
        with self._lock:
            if hit:
                self.stats.hits += 1
            else:
                self.stats.misses += 1

    # ------------------------------------------------------------------ entries

    @contextlib.contextmanager
    def slot(self, key: str) -> Iterator[Slot]:
        """The entry `key`, locked against other runs while the block runs."""
        fd = self.locks.wait(key) if self._open() else None
        try:
            yield Slot(self, key, locked=fd is not None)
        finally:
            if fd is not None:
                os.close(fd)

    def finish(self) -> None:
        """After a run: record its hits and misses, then evict to the size limit."""
        if not self._opened or not self.usable:
            return
        try:
            add_stats(self.dir, self.locks, self.stats)
            self.evict(self.max_size)
        except OSError as exc:
            self.turn_off(exc)

    # ------------------------------------------------------------------ maintenance

    def evict(self, max_size: int) -> int:
        """Remove least recently used entries beyond max_size bytes (see eviction.evict)."""
        return evict(self.dir, self.locks, self.remove, max_size)

    def prune(self, everything: bool) -> int:
        """`cache prune`: down to the size limit, or (everything) empty."""
        self._refuse_foreign()
        if not self.dir.is_dir():
            return 0
        removed = self.evict(0 if everything else self.max_size)
        self._remove_dead_fills()
        if everything:
            (self.dir / STATS).unlink(missing_ok=True)
        return removed

    def _refuse_foreign(self) -> None:
        why = self.refusal()
        if why is not None:
            raise ForeignCacheError(f"the layer cache {self.dir} is not used: {why}")

    def usage(self) -> Usage:
        self._refuse_foreign()
        found = entries(self.dir)
        stats = read_stats(self.dir)
        return Usage(self.dir, len(found), sum(s for _, s, _ in found), stats.hits, stats.misses)

    def remove(self, key: str) -> None:
        """Remove the entry `key` (a damaged one, or an evicted one under its lock)."""
        for suffix in (".meta", ".blob"):  # the .meta first: the entry is gone at once
            path = self.dir / f"{key}{suffix}"
            try:
                path.unlink(missing_ok=True)
            except IsADirectoryError:  # never made by us: planted, removed as damage
                with contextlib.suppress(RecursionError):
                    shutil.rmtree(path, ignore_errors=True)


@dataclass(slots=True)
class Hit:
    result: LayerResult
    blob: Path


@dataclass(slots=True)
class Fill:
    """A blob being written to the cache beside the destination (a tee)."""

    cache: LayerCache
    file: BinaryIO | None
    tmp: Path | None
    failed: bool = False
    out: Output | None = None  # the destination, set by tee

    def tee(self, out: Output) -> Output:
        """Write to `out`, and to the cache while the cache takes it."""
        self.out = out
        return self

    def write(self, data: bytes, /) -> int:
        assert self.out is not None, "tee() first"
        n = self.out.write(data)
        if self.file is not None and not self.failed:
            try:
                self.file.write(data)
            except OSError as exc:
                self.failed = True
                self.cache.turn_off(exc)
        return n


class Slot:
    """One key of the cache, locked (or not: the cache is off) for this run."""

    def __init__(self, cache: LayerCache, key: str, locked: bool) -> None:
        self.cache = cache
        self.key = key
        self.locked = locked
        self._blob = cache.dir / f"{key}.blob"
        self._meta = cache.dir / f"{key}.meta"

    def lookup(self) -> Hit | None:
        """The entry, if it exists; its blob is checked only when it is copied (a
        destination that holds the blob already needs none of its bytes)."""
        if not self.locked or not self.cache.usable:
            return None
        try:
            result = result_from_json(read_small(self._meta, MAX_META), self.key)
        except FileNotFoundError:
            return None
        except Damaged as exc:
            self.discard(str(exc))
            return None
        except OSError as exc:
            self.cache.turn_off(exc)
            return None
        with contextlib.suppress(OSError):
            os.utime(self._meta)  # the last use, for least-recently-used eviction
        return Hit(result, self._blob)

    def copy_to(self, hit: Hit, out: Output) -> bool:
        """Copy the cached blob to out, hashing it; whether it had its digest and size."""
        try:
            fd = open_regular(hit.blob)
        except FileNotFoundError:
            self.discard("its blob is missing")
            return False
        except Damaged as exc:
            self.discard(str(exc))
            return False
        except OSError as exc:
            self.cache.turn_off(exc)
            return False
        h = hasher()
        size = 0
        with os.fdopen(fd, "rb") as f:
            held = os.fstat(fd).st_size
            if held != hit.result.size:
                self.discard(f"its blob holds {held} bytes, not {hit.result.size}")
                return False
            # Never more than the recorded size: a file that grows is not read forever.
            while size <= hit.result.size and (block := f.read(IO_CHUNK)):
                h.update(block)
                size += len(block)
                out.write(block)
        ok = size == hit.result.size and digest_of(h) == hit.result.digest
        if ok:
            self.cache.count(hit=True)
        else:
            self.discard(f"its blob does not have its digest {hit.result.digest}")
        return ok

    def stored_blob(self) -> Path | None:
        """The entry's blob file once `store` made it (for publishing it elsewhere)."""
        if not self.locked or not self.cache.usable or not self._meta.exists():
            return None
        return self._blob

    def served_elsewhere(self) -> None:
        """A hit whose blob the destination already holds: counted, nothing copied."""
        self.cache.count(hit=True)

    def discard(self, why: str) -> None:
        log.warning(
            "layer cache entry %s is damaged (%s): removed, converting again", self.key, why
        )
        try:
            self.cache.remove(self.key)
        except OSError as exc:
            self.cache.turn_off(exc)

    @contextlib.contextmanager
    def fill(self) -> Iterator[Fill]:
        """A tee for the converted blob; `store` makes it an entry."""
        self.cache.count(hit=False)
        if not self.locked or not self.cache.usable:
            yield Fill(self.cache, None, None)
            return
        try:
            f, tmp = temp_file(self.cache.dir, temp_prefix(fill_kind(self.key)))
        except OSError as exc:
            self.cache.turn_off(exc)
            yield Fill(self.cache, None, None)
            return
        fill = Fill(self.cache, f, tmp)
        try:
            yield fill
        finally:
            try:
                f.close()  # flushes what is buffered: a full disk may show only here
            except OSError as exc:
                self.cache.turn_off(exc)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def store(self, fill: Fill, result: LayerResult) -> None:
        """Make the filled blob the entry for this key (called inside `fill`'s block)."""
        if fill.file is None or fill.tmp is None or fill.failed or not self.cache.usable:
            return
        try:
            fill.file.flush()
            os.fsync(fill.file.fileno())
            if fill.file.tell() != result.size:
                raise OSError(errno.EIO, "the cached blob is short")
            os.replace(fill.tmp, self._blob)
            replace_file(self._meta, result_to_json(self.key, result), temp_prefix("fill"))
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.cache.remove(self.key)
            self.cache.turn_off(exc)


def cached_build(
    cache: LayerCache | None,
    key: str,
    serve: Callable[[Slot], LayerResult | None],
    build: Callable[[Slot | None], LayerResult],
) -> tuple[LayerResult, str]:
    """The one path of a conversion through the cache, for optimize's layers and for
    `layer convert`: the entry `key`, locked against other runs; its hit if `serve`
    delivers it (None: it could not), else `build` (which fills the entry through the
    slot; no slot without a cache). Returns the result and "hit", "miss" or "off"."""
    if cache is None:
        return build(None), "off"
    with cache.slot(key) as slot:
        served = serve(slot)
        if served is not None:
            return served, "hit"
        result = build(slot)
        return result, "miss" if slot.locked and cache.usable else "off"


def convert_file(
    cache: LayerCache, src: Path, out: Path, opts: LayerOptions
) -> tuple[LayerResult, str]:
    """`layer convert --cache-dir`: convert_layer through the cache. Returns the result
    and "hit", "miss" or "off". The source is keyed by its file's digest."""
    opts.validate()
    h = hasher()
    with open(src, "rb") as f:
        while block := f.read(IO_CHUNK):
            h.update(block)

    def serve(slot: Slot) -> LayerResult | None:
        hit = slot.lookup()
        if hit is None:
            return None
        with contextlib.suppress(_NotServed), atomic_output(out) as dst:
            if not slot.copy_to(hit, dst):
                raise _NotServed  # out is not written
            return hit.result
        return None

    def build(slot: Slot | None) -> LayerResult:
        assert slot is not None  # a cache is given
        with open_tar(src) as tar, atomic_output(out) as dst, slot.fill() as fill:
            result = build_layer(tar, fill.tee(dst), opts)
            slot.store(fill, result)
        return result

    try:
        return cached_build(cache, layer_key(digest_of(h), opts), serve, build)
    finally:
        cache.finish()


class _NotServed(Exception):
    """A cached blob failed its check while being copied."""
