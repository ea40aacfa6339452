"""The eStargz table of contents: its entries, and its JSON exactly as Go marshals it.

The TOC digest is the sha256 of the JSON bytes, and readers check it against the layer's
annotation; to list the same entries as ctr-remote we must also write the same bytes for
the same entries: tab indent, Go's HTML escaping, omitempty, base64 xattrs.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any

from estargz_opt import jsonlimits
from estargz_opt.constants import MAX_TOC_SIZE
from estargz_opt.digest import sha256_digest
from estargz_opt.errors import BadInputError

ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})

# (python attribute, JSON key) in Go's declaration order; all but name/type are omitempty.
_FIELDS = (
    ("name", "name"),
    ("type", "type"),
    ("size", "size"),
    ("modtime", "modtime"),
    ("link_name", "linkName"),
    ("mode", "mode"),
    ("uid", "uid"),
    ("gid", "gid"),
    ("uname", "userName"),
    ("gname", "groupName"),
    ("offset", "offset"),
    ("inner_offset", "innerOffset"),
    ("dev_major", "devMajor"),
    ("dev_minor", "devMinor"),
    ("xattrs", "xattrs"),
    ("digest", "digest"),
    ("chunk_offset", "chunkOffset"),
    ("chunk_size", "chunkSize"),
    ("chunk_digest", "chunkDigest"),
)
_INT_KEYS = frozenset(
    {
        "size",
        "mode",
        "uid",
        "gid",
        "offset",
        "innerOffset",
        "devMajor",
        "devMinor",
        "chunkOffset",
        "chunkSize",
    }
)
_STR_KEYS = frozenset(
    {"name", "type", "modtime", "linkName", "userName", "groupName", "digest", "chunkDigest"}
)
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(slots=True)
class TOCEntry:
    """One TOC record: a tar entry, or one more chunk of a regular file."""

    name: str
    type: str
    size: int = 0
    modtime: str = ""
    link_name: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    offset: int = 0
    inner_offset: int = 0
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str = ""
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""

    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for attr, key in _FIELDS:
            value = getattr(self, attr)
            if key in ("name", "type"):
                out[key] = value
            elif key == "xattrs":
                if value:
                    out[key] = {
                        k: base64.b64encode(value[k]).decode()
                        for k in sorted(value, key=lambda s: s.encode("utf-8", "surrogateescape"))
                    }
            elif value:
                out[key] = value
        return out


@dataclass(slots=True)
class TOC:
    version: int = 1
    entries: list[TOCEntry] = field(default_factory=list)

    def to_json(self) -> bytes:
        """Go's json.MarshalIndent(toc, "", "\\t") with HTML-safe escaping."""
        writer = TOCWriter(self.version)
        for entry in self.entries:
            writer.add(entry)
        return writer.finish()


class TOCWriter:
    """Encodes TOC entries one at a time, so a big TOC never exists as a tree of objects."""

    def __init__(self, version: int = 1) -> None:
        self.version = version
        self._parts: list[bytes] = []

    def add(self, entry: TOCEntry) -> None:
        # json.dumps(indent=...) falls back to the slow pure-Python encoder; entries are flat
        # (xattrs aside), so lay them out by hand and let the C encoder quote the strings.
        lines = []
        for key, value in entry.to_json_dict().items():
            if isinstance(value, dict):
                inner = ",\n".join(f"\t\t\t\t{_quote(k)}: {_quote(v)}" for k, v in value.items())
                lines.append(f'\t\t\t"{key}": {{\n{inner}\n\t\t\t}}')
            else:
                lines.append(f'\t\t\t"{key}": {_quote(value) if isinstance(value, str) else value}')
        self._parts.append(_go_escape("\t\t{\n" + ",\n".join(lines) + "\n\t\t}"))

    def finish(self) -> bytes:
        head = f'{{\n\t"version": {self.version},\n\t"entries": '
        if not self._parts:
            return (head + "[]\n}").encode()
        body = b",\n".join(self._parts)
        self._parts = []
        return head.encode() + b"[\n" + body + b"\n\t]\n}"


def go_escape(text: str) -> str:
    """Go's HTML-safe JSON escapes; each invalid UTF-8 byte (a surrogate here) becomes \\ufffd."""
    text = _SURROGATES.sub(r"\\ufffd", text)
    for char, escaped in _GO_ESCAPES:
        if char in text:
            text = text.replace(char, escaped)
    return text


def as_decoded(text: str) -> str:
    """A tar string as it reads back from the TOC: Go wrote each invalid UTF-8 byte as U+FFFD."""
    return _SURROGATES.sub("\ufffd", text)


def _go_escape(text: str) -> bytes:
    return go_escape(text).encode("utf-8")


_GO_ESCAPES = (
    ("<", "\\u003c"),
    (">", "\\u003e"),
    ("&", "\\u0026"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
)
_SURROGATES = re.compile("[\udc80-\udcff]")
_quote = json.encoder.encode_basestring


def format_modtime(sec: int, nsec: int) -> str:
    """RFC3339 UTC rounded to the second; empty for the Unix epoch, as upstream.

    Any int64 second is formatted as Go's Time.Format does, years beyond 0-9999
    included (more digits, or a minus sign): Go's tar reader accepts such headers and
    upstream's TOC writer formats them, so refusing them would refuse real layers.
    """
    if sec == 0:
        return ""
    if nsec >= 500_000_000:
        sec += 1
    days, rest = divmod(sec, 86400)
    year, month, day = _civil_from_days(days)
    hour, rest = divmod(rest, 3600)
    minute, second = divmod(rest, 60)
    sign = "-" if year < 0 else ""
    return f"{sign}{abs(year):04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}Z"


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """Proleptic Gregorian (year, month, day) of a day count from 1970-01-01, for any integer.

    datetime stops at years 1-9999; this is the classic era arithmetic (400-year cycles),
    exact for Python's unbounded integers.
    """
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return year, month, day


def toc_digest(toc_json: bytes) -> str:
    return sha256_digest(toc_json)


def parse_toc(data: bytes) -> TOC:
    """Decode TOC JSON strictly enough that a malformed TOC is named, not crashed on."""
    doc = jsonlimits.loads(data, "TOC", max_size=MAX_TOC_SIZE)
    if not isinstance(doc, dict) or not isinstance(doc.get("entries", []), list):
        raise BadInputError("malformed TOC JSON: expected an object with an entries list")
    version = doc.get("version", 0)
    if not isinstance(version, int):
        raise BadInputError("malformed TOC JSON: version is not a number")
    toc = TOC(version=version)
    keys = {key: attr for attr, key in _FIELDS}
    for i, raw in enumerate(doc.get("entries") or []):
        if not isinstance(raw, dict):
            raise BadInputError(f"malformed TOC JSON: entry {i} is not an object")
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            attr = keys.get(key)
            if attr is None:
                continue
            if key in _INT_KEYS:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise BadInputError(f"malformed TOC JSON: entry {i} has a bad {key}")
            elif key in _STR_KEYS:
                if not isinstance(value, str):
                    raise BadInputError(f"malformed TOC JSON: entry {i} has a bad {key}")
            elif key == "xattrs":
                value = _parse_xattrs(value, i)
            kwargs[attr] = value
        entry = TOCEntry(**{"name": "", "type": "", **kwargs})
        if entry.type not in ENTRY_TYPES:
            raise BadInputError(f"malformed TOC JSON: entry {i} has unknown type {entry.type!r}")
        for what in ("digest", "chunk_digest"):
            value = getattr(entry, what)
            if value and not _DIGEST_RE.match(value):
                raise BadInputError(f"malformed TOC JSON: entry {i} has a bad {what}")
        toc.entries.append(entry)
    return toc


def _parse_xattrs(value: Any, i: int) -> dict[str, bytes]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInputError(f"malformed TOC JSON: entry {i} has bad xattrs")
    try:
        return {k: base64.b64decode(v, validate=True) for k, v in value.items()}
    except (ValueError, TypeError):  # binascii.Error, non-ASCII text, a non-string value
        raise BadInputError(f"malformed TOC JSON: entry {i} has bad xattrs") from None
