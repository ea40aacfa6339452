"""Eviction: least recently used entries go beyond the size limit, after each run and on
`cache prune`; the hits and misses of every run are added up for `cache info`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from estargz_opt import jsonlimits
from estargz_opt.cache.files import Damaged, read_small, replace_file, typed_field
from estargz_opt.cache.locks import KeyLocks
from estargz_opt.errors import BadInputError
from estargz_opt.stores.owner import temp_prefix

log = logging.getLogger("estargz_opt")

STATS = "stats.json"
MAX_STATS = 1 << 16


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


def entries(directory: Path) -> list[tuple[float, int, str]]:
    """(last use, bytes, key) of every entry."""
    found = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            if not entry.name.endswith(".meta"):
                continue
            key = entry.name[: -len(".meta")]
            try:  # lstat: a symlink's target is never looked at, nor counted
                meta = entry.stat(follow_symlinks=False)
                blob = os.lstat(directory / f"{key}.blob")
            except FileNotFoundError:
                blob = meta
            found.append((meta.st_mtime, meta.st_size + blob.st_size, key))
    return found


def evict(directory: Path, locks: KeyLocks, remove: Callable[[str], None], max_size: int) -> int:
    """Remove least recently used entries until the cache holds at most max_size
    bytes; entries another run holds are skipped. Returns the entries removed."""
    found = sorted(entries(directory))
    total = sum(size for _, size, _ in found)
    removed = 0
    for _, size, key in found:
        if total <= max_size:
            break
        try:
            fd = locks.lock(key, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        if fd is None:
            break
        try:
            remove(key)
            (directory / f"{key}.lock").unlink(missing_ok=True)
        finally:
            os.close(fd)
        total -= size
        removed += 1
    return removed


def read_stats(directory: Path) -> Stats:
    """The recorded hits and misses; none if the file is missing or damaged (it is
    rewritten whole after the next run)."""
    path = directory / STATS
    try:
        raw = jsonlimits.loads_object(read_small(path, MAX_STATS), str(path))
        return Stats(typed_field(raw, "hits", int), typed_field(raw, "misses", int))
    except FileNotFoundError:
        return Stats()
    except (OSError, BadInputError, Damaged) as exc:
        log.info("ignoring the layer cache's damaged %s: %s", path, exc)
        return Stats()


def add_stats(directory: Path, locks: KeyLocks, run: Stats) -> None:
    if not (run.hits or run.misses):
        return
    fd = locks.lock("stats")
    if fd is None:
        return
    try:
        old = read_stats(directory)
        total = Stats(old.hits + run.hits, old.misses + run.misses)
        replace_file(directory / STATS, json.dumps(asdict(total)).encode(), temp_prefix("stats"))
    finally:
        os.close(fd)
