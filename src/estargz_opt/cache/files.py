"""The cache's files, trusted no further than checked: entry metadata parsed with limits
and checked field by field, files opened without following symlinks and type-checked on
the open descriptor, written by renaming over (never in place), and a directory used
only if this user owns it (as git's safe.directory: its owner could plant entries).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from estargz_opt import jsonlimits
from estargz_opt.atomic import atomic_write
from estargz_opt.constants import MAX_TOC_SIZE
from estargz_opt.errors import BadInputError
from estargz_opt.format import LayerResult

#: the largest .meta read: it may hold an external TOC (at most MAX_TOC_SIZE), base64
MAX_META = MAX_TOC_SIZE * 4 // 3 + (1 << 20)
_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def result_to_json(key: str, r: LayerResult) -> bytes:
    raw = asdict(r)
    raw["toc_blob"] = None if r.toc_blob is None else base64.b64encode(r.toc_blob).decode()
    raw["key"] = key  # binds the entry to its key: a .meta moved to another key is refused
    return json.dumps(raw, sort_keys=True).encode()


class Damaged(Exception):
    """A cache file that is not what this version writes; the message says why."""


def typed_field(raw: Mapping[str, Any], name: str, kind: type) -> Any:
    value: Any = raw.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Damaged(f"its metadata field {name!r} is not a {kind.__name__}")
    if isinstance(value, int) and value < 0:
        raise Damaged(f"its metadata field {name!r} is negative")
    return value


def _digest_field(raw: Mapping[str, Any], name: str) -> str:
    value: str = typed_field(raw, name, str)
    if not _DIGEST.fullmatch(value):
        raise Damaged(f"its metadata field {name!r} is not a sha256 digest")
    return value


def _str_list(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise Damaged(f"its metadata field {name!r} is not a list of strings")
    return value


def result_from_json(data: bytes, key: str) -> LayerResult:
    """The LayerResult recorded for `key`, every field checked by type; Damaged if not."""
    try:
        raw = jsonlimits.loads_object(data, "layer cache metadata", max_size=MAX_META)
    except BadInputError as exc:
        raise Damaged(str(exc)) from None
    if "key" not in raw:
        raise Damaged("its metadata names no key (an older version wrote it)")
    if raw["key"] != key:
        raise Damaged("its metadata was written for another key")
    annotations = raw.get("annotations")
    if not isinstance(annotations, dict) or not all(
        isinstance(v, str) for v in annotations.values()
    ):
        raise Damaged("its metadata field 'annotations' is not a map of strings")
    toc = raw.get("toc_blob")
    if toc is not None and not isinstance(toc, str):
        raise Damaged("its metadata field 'toc_blob' is not a string")
    try:
        toc_blob = None if toc is None else base64.b64decode(toc, validate=True)
    except ValueError:
        raise Damaged("its metadata field 'toc_blob' is not base64") from None
    return LayerResult(
        digest=_digest_field(raw, "digest"),
        size=typed_field(raw, "size", int),
        diff_id=_digest_field(raw, "diff_id"),
        uncompressed_size=typed_field(raw, "uncompressed_size", int),
        toc_digest=_digest_field(raw, "toc_digest"),
        annotations=annotations,
        toc_blob=toc_blob,
        missing_prioritized=_str_list(raw.get("missing_prioritized"), "missing_prioritized"),
        prioritized_entries=typed_field(raw, "prioritized_entries", int),
        prioritized_files=typed_field(raw, "prioritized_files", int),
        prefetch_size=typed_field(raw, "prefetch_size", int),
    )


def open_regular(path: Path) -> int:
    """An fd on `path` if it is a regular file of one link (as the cache writes them);
    never follows a symlink, never blocks on a FIFO. Raises Damaged for anything else,
    FileNotFoundError if it is not there."""
    try:
        fd = os.open(path, _NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Damaged(f"{path.name} is a symbolic link") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)  # a hardlink may share a host file's inode: never read either
        kind = "not a regular file" if st.st_nlink == 1 else "a file with other hard links"
        raise Damaged(f"{path.name} is {kind}")
    return fd


def read_small(path: Path, limit: int) -> bytes:
    """A regular file's bytes (at most `limit`; more is Damaged)."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise Damaged(f"{path.name} is larger than {limit} bytes")
    return data


def replace_file(path: Path, data: bytes, prefix: str) -> None:
    """Write `path` whole by renaming a new file over it, never in place: a symlink or
    device planted at `path` is replaced, not written to."""
    atomic_write(path, data, prefix, into_special=False)


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
    return not_ours(st)


def not_ours(st: os.stat_result) -> str | None:
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by this user, uid {os.geteuid()}"
    return None
