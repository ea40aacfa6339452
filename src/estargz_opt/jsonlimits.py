"""The one JSON parser for everything estargz-opt reads: bounded in size and depth.

Manifests, indexes, configs, TOCs, records, cache metadata, auth files and flag values
may all come from someone else. Python's ``json`` accepts any size and recurses once per
nesting level, so a few kilobytes of ``[[[[…`` end in a RecursionError deep inside a
run. Every document therefore goes through `loads`, which refuses oversized input and
nesting deeper than any of our schemas needs, with a `BadInputError` that names it.

The depth is measured before decoding, on the bytes outside strings, so the check costs a
few C-level passes and never recurses.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from estargz_opt.errors import BadInputError

#: deeper than any document we read needs (a TOC or an OCI index nests 4-6 levels;
#: an image config's history and labels a few more); far below Python's recursion limit
MAX_DEPTH = 64
#: the largest document read whole when the caller names no tighter limit (a TOC may
#: reach format.codec.MAX_TOC_SIZE and passes that limit explicitly)
MAX_DOCUMENT = 16 << 20

_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[{]}")
_DELTA = [0] * 256
_DELTA[1], _DELTA[0xFF] = 1, -1


def nesting_depth(data: bytes) -> int:
    """The deepest bracket nesting outside strings (0 for a scalar)."""
    opens = data.count(b"[") + data.count(b"{")
    if opens <= 1:
        return opens
    if b"\\" in data:  # blank escapes first, so that an escaped quote ends no string
        data = data.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    outside = b"".join(data.split(b'"')[::2])  # strings are every other piece
    brackets = outside.translate(None, _NOT_BRACKETS).translate(_STEP)
    return max(itertools.accumulate(map(_DELTA.__getitem__, brackets)), default=0)


def loads(
    data: bytes | str, what: str, *, max_size: int = MAX_DOCUMENT, max_depth: int = MAX_DEPTH
) -> Any:
    """Decode one JSON document named `what` in errors, or raise BadInputError."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > max_size:
        raise BadInputError(
            f"{what}: JSON document too large ({len(raw)} bytes, the limit is {max_size})"
        )
    if nesting_depth(raw) > max_depth:
        raise BadInputError(f"{what}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{what}: malformed JSON ({exc})") from None
    except RecursionError:  # unreachable after the depth check; kept as a last guard
        raise BadInputError(f"{what}: JSON nested too deeply") from None


def loads_object(
    data: bytes | str, what: str, *, max_size: int = MAX_DOCUMENT, max_depth: int = MAX_DEPTH
) -> dict[str, Any]:
    """`loads` for documents whose top level must be an object."""
    doc = loads(data, what, max_size=max_size, max_depth=max_depth)
    if not isinstance(doc, dict):
        raise BadInputError(f"{what}: malformed JSON (not an object)")
    return doc
