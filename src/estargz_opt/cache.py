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

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from estargz_opt import jsonlimits
from estargz_opt.atomic import atomic_output, temp_file
from estargz_opt.digest import digest_of, hasher
from estargz_opt.errors import BadInputError, EstargzOptError
from estargz_opt.format import OUTPUT_VERSION, LayerOptions, LayerResult, build_layer
from estargz_opt.format.codec import MAX_TOC_SIZE, Output
from estargz_opt.format.source import open_tar
from estargz_opt.stores.owner import is_dead, temp_owner, temp_prefix

log = logging.getLogger("estargz_opt")

ENV_DIR = "ESTARGZ_OPT_CACHE_DIR"
SUBDIR = "layers"
DEFAULT_MAX_SIZE = 10 << 30
_READ = 1 << 20
_STATS = "stats.json"
#: the largest .meta read: it may hold an external TOC (at most MAX_TOC_SIZE), base64
_MAX_META = MAX_TOC_SIZE * 4 // 3 + (1 << 20)
_MAX_STATS = 1 << 16
_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
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
    if opts.containers:  # stargz-flavour keys stay what they were
        fields["zstdFlavor"] = opts.zstd_flavor.value
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


def _result_to_json(key: str, r: LayerResult) -> bytes:
    raw = asdict(r)
    raw["toc_blob"] = None if r.toc_blob is None else base64.b64encode(r.toc_blob).decode()
    raw["key"] = key  # binds the entry to its key: a .meta moved to another key is refused
    return json.dumps(raw, sort_keys=True).encode()


class _Damaged(Exception):
    """A cache file that is not what this version writes; the message says why."""


def _field(raw: Mapping[str, Any], name: str, kind: type) -> Any:
    value: Any = raw.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Damaged(f"its metadata field {name!r} is not a {kind.__name__}")
    if isinstance(value, int) and value < 0:
        raise _Damaged(f"its metadata field {name!r} is negative")
    return value


def _digest_field(raw: Mapping[str, Any], name: str) -> str:
    value: str = _field(raw, name, str)
    if not _DIGEST.fullmatch(value):
        raise _Damaged(f"its metadata field {name!r} is not a sha256 digest")
    return value


def _str_list(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise _Damaged(f"its metadata field {name!r} is not a list of strings")
    return value


def _result_from_json(data: bytes, key: str) -> LayerResult:
    """The LayerResult recorded for `key`, every field checked by type; _Damaged if not."""
    try:
        raw = jsonlimits.loads_object(data, "layer cache metadata", max_size=_MAX_META)
    except BadInputError as exc:
        raise _Damaged(str(exc)) from None
    if "key" not in raw:
        raise _Damaged("its metadata names no key (an older version wrote it)")
    if raw["key"] != key:
        raise _Damaged("its metadata was written for another key")
    annotations = raw.get("annotations")
    if not isinstance(annotations, dict) or not all(
        isinstance(v, str) for v in annotations.values()
    ):
        raise _Damaged("its metadata field 'annotations' is not a map of strings")
    toc = raw.get("toc_blob")
    if toc is not None and not isinstance(toc, str):
        raise _Damaged("its metadata field 'toc_blob' is not a string")
    try:
        toc_blob = None if toc is None else base64.b64decode(toc, validate=True)
    except ValueError:
        raise _Damaged("its metadata field 'toc_blob' is not base64") from None
    return LayerResult(
        digest=_digest_field(raw, "digest"),
        size=_field(raw, "size", int),
        diff_id=_digest_field(raw, "diff_id"),
        uncompressed_size=_field(raw, "uncompressed_size", int),
        toc_digest=_digest_field(raw, "toc_digest"),
        annotations=annotations,
        toc_blob=toc_blob,
        missing_prioritized=_str_list(raw.get("missing_prioritized"), "missing_prioritized"),
        prioritized_entries=_field(raw, "prioritized_entries", int),
        prioritized_files=_field(raw, "prioritized_files", int),
        prefetch_size=_field(raw, "prefetch_size", int),
    )


def _open_regular(path: Path) -> int:
    """An fd on `path` if it is a regular file of one link (as the cache writes them);
    never follows a symlink, never blocks on a FIFO. Raises _Damaged for anything else,
    FileNotFoundError if it is not there."""
    try:
        fd = os.open(path, _NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Damaged(f"{path.name} is a symbolic link") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)  # a hardlink may share a host file's inode: never read either
        kind = "not a regular file" if st.st_nlink == 1 else "a file with other hard links"
        raise _Damaged(f"{path.name} is {kind}")
    return fd


def _read_small(path: Path, limit: int) -> bytes:
    """A regular file's bytes (at most `limit`; more is _Damaged)."""
    fd = _open_regular(path)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _Damaged(f"{path.name} is larger than {limit} bytes")
    return data


def _replace(path: Path, data: bytes, prefix: str) -> None:
    """Write `path` whole by renaming a new file over it. Unlike atomic_write this never
    writes in place: a symlink or device planted at `path` is replaced, not written to."""
    f, tmp = temp_file(path.parent, prefix)
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def foreign(path: Path) -> str | None:
    """Why the cache directory `path` must not be used, or None: it is not a directory,
    or another user owns it (who could then plant entries, as git's safe.directory)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(path)  # a symlink the user set up is followed, once, for the root
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    return _not_ours(st)


def _not_ours(st: os.stat_result) -> str | None:
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by this user, uid {os.geteuid()}"
    return None


class ForeignCacheError(EstargzOptError):
    """`cache info`/`prune` on a directory the cache refuses to use."""


class LayerCache:
    """One cache directory, for one run (several threads) or one `cache` command."""

    def __init__(self, root: Path, max_size: int = DEFAULT_MAX_SIZE) -> None:
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
        return _not_ours(st)

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

    def _count(self, hit: bool) -> None:
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
                total += path.lstat().st_size
        return total

    def _lock_key(self, key: str, how: int = fcntl.LOCK_EX) -> int | None:
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
                    self.turn_off(exc)
                    return None
                # A symlink (or FIFO…) planted as the lock: never followed, replaced.
                log.warning("layer cache lock %s is not a regular file: removed", path)
                try:
                    path.unlink()
                except OSError as gone:
                    self.turn_off(gone)
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
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(self.dir):
                if not entry.name.endswith(".meta"):
                    continue
                key = entry.name[: -len(".meta")]
                try:  # lstat: a symlink's target is never looked at, nor counted
                    meta = entry.stat(follow_symlinks=False)
                    blob = os.lstat(self.dir / f"{key}.blob")
                except FileNotFoundError:
                    blob = meta
                found.append((meta.st_mtime, meta.st_size + blob.st_size, key))
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
                self._remove(key)
                (self.dir / f"{key}.lock").unlink(missing_ok=True)
            finally:
                os.close(fd)
            total -= size
            removed += 1
        return removed

    def prune(self, everything: bool) -> int:
        """`cache prune`: down to the size limit, or (everything) empty."""
        self._refuse_foreign()
        if not self.dir.is_dir():
            return 0
        removed = self.evict(0 if everything else self.max_size)
        self._remove_dead_fills()
        if everything:
            (self.dir / _STATS).unlink(missing_ok=True)
        return removed

    def _refuse_foreign(self) -> None:
        why = self.refusal()
        if why is not None:
            raise ForeignCacheError(f"the layer cache {self.dir} is not used: {why}")

    def usage(self) -> Usage:
        self._refuse_foreign()
        entries = self._entries()
        stats = self._read_stats()
        return Usage(
            self.dir, len(entries), sum(s for _, s, _ in entries), stats.hits, stats.misses
        )

    def _read_stats(self) -> Stats:
        """The recorded hits and misses; none if the file is missing or damaged (it is
        rewritten whole after the next run)."""
        path = self.dir / _STATS
        try:
            raw = jsonlimits.loads_object(_read_small(path, _MAX_STATS), str(path))
            return Stats(_field(raw, "hits", int), _field(raw, "misses", int))
        except FileNotFoundError:
            return Stats()
        except (OSError, BadInputError, _Damaged) as exc:
            log.info("ignoring the layer cache's damaged %s: %s", path, exc)
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
            _replace(self.dir / _STATS, json.dumps(asdict(total)).encode(), temp_prefix("stats"))
        finally:
            os.close(fd)

    def _remove(self, key: str) -> None:
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
            result = _result_from_json(_read_small(self._meta, _MAX_META), self.key)
        except FileNotFoundError:
            return None
        except _Damaged as exc:
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
            fd = _open_regular(hit.blob)
        except FileNotFoundError:
            self.discard("its blob is missing")
            return False
        except _Damaged as exc:
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
            while size <= hit.result.size and (block := f.read(_READ)):
                h.update(block)
                size += len(block)
                out.write(block)
        ok = size == hit.result.size and digest_of(h) == hit.result.digest
        if ok:
            self.cache._count(hit=True)
        else:
            self.discard(f"its blob does not have its digest {hit.result.digest}")
        return ok

    def served_elsewhere(self) -> None:
        """A hit whose blob the destination already holds: counted, nothing copied."""
        self.cache._count(hit=True)

    def discard(self, why: str) -> None:
        log.warning(
            "layer cache entry %s is damaged (%s): removed, converting again", self.key, why
        )
        try:
            self.cache._remove(self.key)
        except OSError as exc:
            self.cache.turn_off(exc)

    @contextlib.contextmanager
    def fill(self) -> Iterator[Fill]:
        """A tee for the converted blob; `store` makes it an entry."""
        self.cache._count(hit=False)
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
            _replace(self._meta, _result_to_json(self.key, result), temp_prefix("fill"))
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.cache._remove(self.key)
            self.cache.turn_off(exc)


def convert_file(
    cache: LayerCache, src: Path, out: Path, opts: LayerOptions
) -> tuple[LayerResult, str]:
    """`layer convert --cache-dir`: convert_layer through the cache. Returns the result
    and "hit", "miss" or "off". The source is keyed by its file's digest."""
    opts.validate()
    h = hasher()
    with open(src, "rb") as f:
        while block := f.read(_READ):
            h.update(block)
    try:
        with cache.slot(layer_key(digest_of(h), opts)) as slot:
            hit = slot.lookup()
            if hit is not None:
                with contextlib.suppress(_NotServed), atomic_output(out) as dst:
                    if not slot.copy_to(hit, dst):
                        raise _NotServed  # out is not written
                    return hit.result, "hit"
            with open_tar(src) as tar, atomic_output(out) as dst, slot.fill() as fill:
                result = build_layer(tar, fill.tee(dst), opts)
                slot.store(fill, result)
            return result, "miss" if slot.locked and cache.usable else "off"
    finally:
        cache.finish()


class _NotServed(Exception):
    """A cached blob failed its check while being copied."""
