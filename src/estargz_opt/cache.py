"""A content-addressed cache of converted layers, shared by every run on a machine.

The format engine is deterministic: one source layer, one set of byte-changing options
and one prioritized file list always give the same blob. So a converted layer stored
under a key made of exactly those inputs (plus the engine's OUTPUT_VERSION) can be
reused by any later run, and a rebuilt image recompresses only the layers that changed.

Layout, under ``DIR/layers/`` (DIR also holds other tools' subdirectories):

* ``KEY.blob`` the converted blob, ``KEY.meta`` its LayerResult (JSON); the entry exists
  once its ``.meta`` does (both are renamed into place, the ``.meta`` last);
* ``KEY.lock`` a flock per key: a run filling an entry holds it, so a second run
  converting the same layer waits and then uses the entry;
* ``.fill-KEY@OWNER@….tmp`` blobs being written, named after their key and owner
  (stores/owner.py): a run killed mid-fill leaves one, which the next run deletes; a
  run waiting for the key watches it grow (and stops waiting for a stalled one);
* ``stats.json`` hits and misses, for ``cache info``.

A blob is served only if it hashes to its recorded digest while being copied; a damaged
entry is removed, logged and rebuilt. Any OSError of the cache (read-only, disk full)
turns the cache off for the rest of the run with one warning: a cache never fails a run.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from estargz_opt.atomic import atomic_output, atomic_write, temp_file
from estargz_opt.constants import DEFAULT_CACHE_MAX_SIZE, IO_CHUNK
from estargz_opt.digest import digest_of, hasher
from estargz_opt.format import OUTPUT_VERSION, LayerOptions, LayerResult, build_layer
from estargz_opt.format.codec import Output
from estargz_opt.format.source import open_tar
from estargz_opt.stores.owner import is_dead, temp_owner, temp_prefix

log = logging.getLogger("estargz_opt")

ENV_DIR = "ESTARGZ_OPT_CACHE_DIR"
SUBDIR = "layers"
_STATS = "stats.json"
#: a run waits for another one filling the same entry until that fill stops growing
STALL_SECONDS = 10
_POLL_SECONDS = 0.2


def _fill_kind(key: str) -> str:
    """The temporary name's kind of a fill of `key` (a waiting run watches it grow)."""
    return f"fill-{key}"


def default_dir(env: Mapping[str, str] = os.environ) -> Path:
    """$ESTARGZ_OPT_CACHE_DIR, else $XDG_CACHE_HOME/estargz-opt, else /var/cache/estargz-opt
    for root and ~/.cache/estargz-opt for anyone else."""
    if env.get(ENV_DIR):
        return Path(env[ENV_DIR])
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "estargz-opt"
    if os.geteuid() == 0:
        return Path("/var/cache/estargz-opt")
    return Path.home() / ".cache" / "estargz-opt"


def layer_key(source_digest: str, opts: LayerOptions, engine: int = OUTPUT_VERSION) -> str:
    """The key of a converted layer: every input that can change its bytes.

    `workers` is left out on purpose: the thread count never changes the output.
    """
    fields = {
        "engine": engine,
        "source": source_digest,
        "format": opts.format.value,
        "level": opts.level,
        "chunkSize": opts.chunk_size,
        "minChunkSize": opts.min_chunk_size,
        "prioritized": list(opts.prioritized),
    }
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(slots=True)
class Stats:
    hits: int = 0
    misses: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    """What `cache info` shows."""

    directory: Path
    entries: int
    bytes: int
    hits: int
    misses: int


def _result_to_json(r: LayerResult) -> bytes:
    raw = asdict(r)
    raw["toc_blob"] = None if r.toc_blob is None else base64.b64encode(r.toc_blob).decode()
    return json.dumps(raw, sort_keys=True).encode()


def _result_from_json(data: bytes) -> LayerResult:
    raw: dict[str, Any] = json.loads(data)
    toc = raw.pop("toc_blob")
    return LayerResult(**raw, toc_blob=None if toc is None else base64.b64decode(toc))


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

    # ------------------------------------------------------------------ state

    @property
    def usable(self) -> bool:
        return self.warning is None

    def turn_off(self, exc: OSError) -> None:
        """Stop using the cache for this run, with one warning line."""
        with self._lock:
            if self.warning is not None:
                return
            self.warning = (
                f"the layer cache {self.dir} cannot be used ({exc.strerror or exc}): "
                "converting without it"
            )
        log.warning("%s", self.warning)

    def _open(self) -> bool:
        """Create the directory and reap killed runs' fills, once; the layer threads
        all wait for it (one that went ahead would find no directory)."""
        with self._open_lock:
            if not self._opened:
                self._opened = True
                try:
                    self.dir.mkdir(parents=True, exist_ok=True)
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
        fd = self._wait_for_key(key) if self._open() else None
        try:
            yield Slot(self, key, locked=fd is not None)
        finally:
            if fd is not None:
                os.close(fd)

    def _wait_for_key(self, key: str) -> int | None:
        """The lock of `key`, waiting for the run that holds it while its fill grows.

        A holder whose fill has not grown for STALL_SECONDS (stopped, stuck on a slow
        disk) is not waited for: this run then converts the layer without the cache.
        """
        try:
            return self._lock_key(key, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        log.info("layer cache entry %s is being filled by another run: waiting for it", key)
        seen, since = -1, time.monotonic()
        while True:
            time.sleep(_POLL_SECONDS)
            try:
                return self._lock_key(key, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            grown = self._fill_size(key)
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

    def _fill_size(self, key: str) -> int:
        total = 0
        for path in self.dir.glob(f".{_fill_kind(key)}@*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def _lock_key(self, key: str, how: int = fcntl.LOCK_EX) -> int | None:
        """An fd holding flock `how` on KEY.lock; None if the cache failed (it is then off).
        A lock file removed (pruned) while we waited is taken again."""
        path = self.dir / f"{key}.lock"
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                self.turn_off(exc)
                return None
            try:
                fcntl.flock(fd, how)
                same = os.path.samestat(os.stat(path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                return fd
            os.close(fd)

    def finish(self) -> None:
        """After a run: record its hits and misses, then evict to the size limit."""
        if not self._opened or not self.usable:
            return
        try:
            self._add_stats(self.stats)
            self.evict(self.max_size)
        except OSError as exc:
            self.turn_off(exc)

    # ------------------------------------------------------------------ maintenance

    def _entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, key) of every entry."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.dir):
                if not entry.name.endswith(".meta"):
                    continue
                key = entry.name[: -len(".meta")]
                try:
                    meta = entry.stat()
                    blob = os.stat(self.dir / f"{key}.blob").st_size
                except FileNotFoundError:
                    continue
                found.append((meta.st_mtime, meta.st_size + blob, key))
        return found

    def evict(self, max_size: int) -> int:
        """Remove least recently used entries until the cache holds at most max_size
        bytes; entries another run holds are skipped. Returns the entries removed."""
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        removed = 0
        for _, size, key in entries:
            if total <= max_size:
                break
            try:
                fd = self._lock_key(key, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if fd is None:
                break
            try:
                self.remove(key)
                (self.dir / f"{key}.lock").unlink(missing_ok=True)
            finally:
                os.close(fd)
            total -= size
            removed += 1
        return removed

    def prune(self, everything: bool) -> int:
        """`cache prune`: down to the size limit, or (everything) empty."""
        if not self.dir.is_dir():
            return 0
        removed = self.evict(0 if everything else self.max_size)
        self._remove_dead_fills()
        if everything:
            (self.dir / _STATS).unlink(missing_ok=True)
        return removed

    def usage(self) -> Usage:
        entries = self._entries()
        stats = self._read_stats()
        return Usage(
            self.dir, len(entries), sum(s for _, s, _ in entries), stats.hits, stats.misses
        )

    def _read_stats(self) -> Stats:
        try:
            raw = json.loads((self.dir / _STATS).read_bytes())
            return Stats(int(raw["hits"]), int(raw["misses"]))
        except (OSError, ValueError, KeyError, TypeError):
            return Stats()

    def _add_stats(self, run: Stats) -> None:
        if not (run.hits or run.misses):
            return
        fd = self._lock_key("stats")
        if fd is None:
            return
        try:
            old = self._read_stats()
            total = Stats(old.hits + run.hits, old.misses + run.misses)
            atomic_write(
                self.dir / _STATS, json.dumps(asdict(total)).encode(), temp_prefix("stats")
            )
        finally:
            os.close(fd)

    def remove(self, key: str) -> None:
        """Remove the entry `key` (a damaged one, or an evicted one under its lock)."""
        for suffix in (".meta", ".blob"):  # the .meta first: the entry is gone at once
            (self.dir / f"{key}{suffix}").unlink(missing_ok=True)


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
            data = self._meta.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.cache.turn_off(exc)
            return None
        try:
            result = _result_from_json(data)
        except (ValueError, TypeError, KeyError, AttributeError):
            self.discard("its metadata cannot be read")
            return None
        with contextlib.suppress(OSError):
            os.utime(self._meta)  # the last use, for least-recently-used eviction
        return Hit(result, self._blob)

    def copy_to(self, hit: Hit, out: Output) -> bool:
        """Copy the cached blob to out, hashing it; whether it had its digest and size."""
        try:
            held = hit.blob.stat().st_size
        except FileNotFoundError:
            held = -1
        if held != hit.result.size:
            self.discard(f"its blob holds {held} bytes, not {hit.result.size}")
            return False
        h = hasher()
        size = 0
        with open(hit.blob, "rb") as f:
            while block := f.read(IO_CHUNK):
                h.update(block)
                size += len(block)
                out.write(block)
        ok = size == hit.result.size and digest_of(h) == hit.result.digest
        if ok:
            self.cache.count(hit=True)
        else:
            self.discard(f"its blob does not have its digest {hit.result.digest}")
        return ok

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
            f, tmp = temp_file(self.cache.dir, temp_prefix(_fill_kind(self.key)))
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
            atomic_write(self._meta, _result_to_json(result), temp_prefix("fill"))
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
