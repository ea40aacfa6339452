"""Tar headers read the way Go's archive/tar reads them, and written back as Go writes them.

Upstream parses every header with Go's archive/tar and re-writes it with tar.Writer,
carrying the reader's format guess (Header.Format) to the writer. The TOC comes from the
parsed fields (raw mode, joined USTAR prefix, PAX overrides, GNU long names) and the
payload bytes from Go's writer, so both halves here follow Go: the reader records the
same format guess, and encode_header applies Go's format choice and field encodings.
That is what makes our uncompressed payload, and so the zstd:chunked DiffID, equal
ctr-remote's.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

from estargz_opt.errors import BadInputError

BLOCK = 512
EOF_BLOCKS = bytes(2 * BLOCK)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1  # Go's header fields are int64
MAX_SPECIAL_SIZE = 1 << 20  # PAX and GNU long-name payloads above this are refused, as in Go

REG, LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO = "0", "1", "2", "3", "4", "5", "6"
SUPPORTED_TYPES = frozenset({REG, LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO})
HEADER_ONLY_TYPES = frozenset({LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO})
TYPE_NAMES = {
    REG: "reg",
    LINK: "hardlink",
    SYMLINK: "symlink",
    CHAR: "char",
    BLOCKDEV: "block",
    DIR: "dir",
    FIFO: "fifo",
}
# Go's archive/tar Format bits; an entry's format is the set its headers allow.
FORMAT_UNKNOWN, FORMAT_USTAR, FORMAT_PAX, FORMAT_GNU = 0, 2, 4, 8
_ANY_FORMAT = FORMAT_USTAR | FORMAT_PAX | FORMAT_GNU
# PAX keys Go's writer derives from header fields; other records are carried as they are.
_BASIC_PAX = frozenset(
    {"path", "linkpath", "size", "uid", "gid", "uname", "gname", "mtime", "atime", "ctime"}
)


def decode(raw: bytes) -> str:
    """Tar strings are bytes; surrogateescape keeps invalid UTF-8 lossless."""
    return raw.decode("utf-8", "surrogateescape")


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def clean_name(name: str) -> str:
    """Go's path.Clean("/"+name) without the leading slash: the identity of an entry."""
    cleaned = posixpath.normpath("/" + name)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned.lstrip("/")


def climbs_out(name: str) -> bool:
    """True when a relative name's '..' components leave the layer root."""
    depth = 0
    for part in name.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


@dataclass(slots=True)
class TarEntry:
    """One tar member, with the fields Go's reader would report."""

    name: str
    typeflag: str
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: int = 0  # seconds, floor
    mtime_nsec: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)
    format: int = FORMAT_UNKNOWN  # Go's guess, carried to the writer as upstream does
    atime: tuple[int, int] | None = None  # (seconds, nanoseconds), from PAX or GNU headers
    ctime: tuple[int, int] | None = None
    data_offset: int = 0  # where the content starts in the source file
    header_offset: int = 0  # where this member's first header block (PAX/GNU included) starts

    @property
    def data_size(self) -> int:
        return 0 if self.typeflag in HEADER_ONLY_TYPES else self.size

    @property
    def xattrs(self) -> dict[str, bytes]:
        prefix = "SCHILY.xattr."
        return {k[len(prefix) :]: encode(v) for k, v in self.pax.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- reading


def _parse_string(raw: bytes) -> str:
    end = raw.find(b"\0")
    return decode(raw if end < 0 else raw[:end])


def parse_number(raw: bytes, what: str, offset: int) -> int:
    """A numeric header field, octal or base-256; beyond int64 is invalid, as in Go's reader."""
    if raw and raw[0] & 0x80:  # base-256 (GNU extension), two's complement
        value = int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
        if raw[0] & 0x40:
            value -= 1 << (8 * len(raw) - 1)
    else:
        text = raw.split(b"\0", 1)[0].strip(b" \0")
        if not text:
            return 0
        try:
            value = int(text, 8)
        except ValueError:
            raise BadInputError(f"invalid {what} field in tar header at offset {offset}") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise BadInputError(f"out-of-range {what} field in tar header at offset {offset}")
    return value


def _checksum_ok(block: bytes) -> bool:
    stored = block[148:156].split(b"\0", 1)[0].strip(b" ")
    try:
        want = int(stored, 8)
    except ValueError:
        return False
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if want == unsigned:
        return True
    high = sum(1 for b in block[:148] + block[156:] if b > 127)  # old tars summed signed bytes
    return want == unsigned - 256 * high


_USTAR_NUMERIC_ENDS = (107, 115, 123, 135, 147, 336, 344)  # last byte of each numeric field


def _magic_kind(block: bytes) -> str:
    """Go's getFormat by magic: 'star', 'ustar' (USTAR or PAX), 'gnu' or 'v7'."""
    magic, version = block[257:263], block[263:265]
    if magic == b"ustar\x00":
        return "star" if block[508:512] == b"tar\0" else "ustar"
    if magic == b"ustar " and version == b" \x00":
        return "gnu"
    return "v7"


def _block_format(block: bytes, kind: str) -> int:
    """The format Go's reader sets on one header block (before the PAX/GNU special cases)."""
    if kind == "ustar":
        if not block.isascii():
            return FORMAT_UNKNOWN  # non-ASCII bytes: not strictly USTAR
        if any(block[i] != 0 for i in _USTAR_NUMERIC_ENDS):
            return FORMAT_UNKNOWN  # numeric fields must end in NUL
        return FORMAT_USTAR | FORMAT_PAX
    return FORMAT_GNU if kind == "gnu" else FORMAT_UNKNOWN


def _gnu_times(block: bytes) -> tuple[tuple[int, int] | None, tuple[int, int] | None] | None:
    """A GNU header's atime and ctime (each None when unset); None when one is unparsable,
    which makes Go take the header for a pre-Go-1.8 one and drop its GNU guess."""
    times: list[tuple[int, int] | None] = []
    for raw in (block[345:357], block[357:369]):
        if not raw[0]:
            times.append(None)
            continue
        try:
            times.append((parse_number(raw, "time", 0), 0))
        except BadInputError:
            return None
    return times[0], times[1]


def _parse_pax(data: bytes, offset: int) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            raise BadInputError(f"malformed PAX record in tar header at offset {offset}")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise BadInputError(f"malformed PAX record in tar header at offset {offset}") from None
        if length <= space - pos + 1 or pos + length > len(data) or data[pos + length - 1] != 10:
            raise BadInputError(f"malformed PAX record length in tar header at offset {offset}")
        key, sep, value = data[space + 1 : pos + length - 1].partition(b"=")
        if not sep or not key:
            raise BadInputError(f"malformed PAX record in tar header at offset {offset}")
        records[decode(key)] = decode(value)
        pos += length
    return records


def _pax_int(records: dict[str, str], key: str, offset: int) -> int | None:
    if key not in records:
        return None
    try:
        value = int(records[key], 10)
    except ValueError:
        raise BadInputError(f"invalid PAX {key} record in tar header at offset {offset}") from None
    if value < 0 or value >= 1 << 63:
        raise BadInputError(f"oversized PAX {key} record in tar header at offset {offset}")
    return value


def _pax_time(text: str, offset: int, key: str = "mtime") -> tuple[int, int]:
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise BadInputError(f"invalid PAX {key} record in tar header at offset {offset}")
    nsec = int((frac + "000000000")[:9]) if frac else 0
    sec = int(whole) if len(whole) <= 19 else INT64_MAX + 1
    if sec > INT64_MAX:  # Go's ParseInt fails: the header is invalid
        raise BadInputError(f"out-of-range PAX mtime record in tar header at offset {offset}")
    if sign < 0 and nsec:
        return -sec - 1, 1_000_000_000 - nsec
    return sign * sec, nsec


class Readable(Protocol):
    """What the parser needs of a file: a real one, or a forward-only decompressed stream."""

    def read(self, n: int, /) -> bytes: ...

    def seek(self, offset: int, /) -> int: ...


class _BlockReader:
    """Reads 512-byte blocks from a seekable binary file, tracking the offset."""

    def __init__(self, f: Readable, start: int) -> None:
        self.f = f
        self.pos = start
        f.seek(start)

    def read_exact(self, n: int, what: str) -> bytes:
        self.f.seek(self.pos)  # the caller may have moved the shared file position
        data = self.f.read(n)
        if len(data) != n:
            raise BadInputError(f"truncated tar: {what} at offset {self.pos} ends early")
        self.pos += n
        return data

    def next_block(self) -> bytes | None:
        """The next header block of a stream of unknown length; None at a clean end."""
        reached = self.f.seek(self.pos)
        if reached != self.pos:
            raise BadInputError(f"truncated tar: the data ends at offset {reached}, in an entry")
        data = self.f.read(BLOCK)
        if not data:
            return None
        if len(data) != BLOCK:
            raise BadInputError(f"truncated tar: header at offset {self.pos} ends early")
        self.pos += BLOCK
        return data

    def skip(self, n: int, what: str, end: int | None) -> None:
        if end is not None and self.pos + n > end:
            raise BadInputError(f"truncated tar: {what} at offset {self.pos} ends early")
        self.pos += n


def iter_entries(f: Readable, end: int | None, start: int = 0) -> Iterator[TarEntry]:
    """Yield every member of the tar in f[start:end], with data offsets, as Go would parse it.

    Raises BadInputError for anything Go's reader or the eStargz builder would refuse.
    A stream that stops at a block boundary without EOF blocks is accepted, like Go.
    With end None, f is read as a stream until it ends (f.seek only ever moves forward,
    and a consumer may read each entry's content before asking for the next entry).
    """
    r = _BlockReader(f, start)
    pax: dict[str, str] = {}
    long_name = long_link = ""
    first_header = start
    fmt = _ANY_FORMAT
    while True:
        at = r.pos
        if end is None:
            block = r.next_block()
            if block is None:
                return
        elif at == end:
            return
        elif at + BLOCK <= end:
            block = r.read_exact(BLOCK, "header")
        else:
            raise BadInputError(f"truncated tar: header at offset {at} ends early")
        if block == bytes(BLOCK):
            if r.pos == end:
                return
            if end is None:
                nxt = r.next_block()
                if nxt is None:
                    return
            else:
                nxt = r.read_exact(BLOCK, "end-of-archive block") if r.pos + BLOCK <= end else None
            if nxt is None or nxt != bytes(BLOCK):
                raise BadInputError(f"not a tar archive: lone zero block at offset {at}")
            return
        if not _checksum_ok(block):
            what = "not a tar archive" if at == start else "corrupt tar header"
            raise BadInputError(f"{what}: bad header checksum at offset {at}")
        kind = _magic_kind(block)
        block_fmt = _block_format(block, kind)
        gnu_times = _gnu_times(block) if kind == "gnu" else (None, None)
        if gnu_times is None:
            block_fmt, gnu_times = FORMAT_UNKNOWN, (None, None)
        fmt &= block_fmt
        typeflag = chr(block[156]) if block[156] else "\0"
        size = parse_number(block[124:136], "size", at)
        if size < 0:
            raise BadInputError(f"negative size in tar header at offset {at}")
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if typeflag in ("x", "g", "L", "K"):
            if size > MAX_SPECIAL_SIZE:
                raise BadInputError(
                    f"oversized tar header field: {size}-byte extended header at offset {at}"
                )
            data = r.read_exact(padded, "extended header")[:size]
            if typeflag == "x":
                fmt &= FORMAT_PAX
                pax = _parse_pax(data, at)  # Go keeps only the last extended header's records
            elif typeflag == "g":
                raise BadInputError(
                    f"unsupported tar entry: global PAX header at offset {at} "
                    "(upstream eStargz refuses them too)"
                )
            elif typeflag == "L":
                fmt &= FORMAT_GNU
                long_name = _parse_string(data)
            else:
                fmt &= FORMAT_GNU
                long_link = _parse_string(data)
            continue
        if typeflag == "S" or any(k.startswith("GNU.sparse.") for k in pax):
            raise BadInputError(f"unsupported tar entry: GNU sparse file at offset {at}")

        name = _parse_string(block[0:100])
        if kind in ("ustar", "star"):
            prefix = _parse_string(block[345:476] if kind == "star" else block[345:500])
            if prefix:
                name = prefix + "/" + name
        entry = TarEntry(
            name=name,
            typeflag=typeflag,
            size=size,
            mode=parse_number(block[100:108], "mode", at),
            uid=parse_number(block[108:116], "uid", at),
            gid=parse_number(block[116:124], "gid", at),
            mtime=parse_number(block[136:148], "mtime", at),
            linkname=_parse_string(block[157:257]),
            atime=gnu_times[0],
            ctime=gnu_times[1],
        )
        if kind != "v7":
            entry.uname = _parse_string(block[265:297])
            entry.gname = _parse_string(block[297:329])
            entry.devmajor = parse_number(block[329:337], "devmajor", at)
            entry.devminor = parse_number(block[337:345], "devminor", at)
        if pax:
            _merge_pax(entry, pax, at)
        if long_name:
            entry.name = long_name
        if long_link:
            entry.linkname = long_link
        if entry.typeflag == "\0":
            entry.typeflag = DIR if entry.name.endswith("/") else REG
        if entry.typeflag not in SUPPORTED_TYPES:
            raise BadInputError(
                f"unsupported tar entry type {entry.typeflag!r} for {entry.name!r} at offset {at}"
            )
        if fmt & FORMAT_USTAR and fmt & FORMAT_PAX:
            fmt = FORMAT_USTAR
        entry.format = fmt
        padded = (entry.data_size + BLOCK - 1) // BLOCK * BLOCK
        entry.data_offset = r.pos
        entry.header_offset = first_header
        r.skip(padded, f"content of {entry.name!r}", end)
        if end is not None and r.pos > end:
            raise BadInputError(f"truncated tar: content of {entry.name!r} ends early")
        pax, long_name, long_link, fmt = {}, "", "", _ANY_FORMAT
        first_header = r.pos
        yield entry


def _merge_pax(entry: TarEntry, pax: dict[str, str], at: int) -> None:
    """Go's mergePAX: an empty record keeps the header's own value."""
    entry.pax = dict(pax)
    for key, attr in (
        ("path", "name"),
        ("linkpath", "linkname"),
        ("uname", "uname"),
        ("gname", "gname"),
    ):
        if pax.get(key):
            setattr(entry, attr, pax[key])
    for key in ("uid", "gid", "size"):
        value = _pax_int(pax, key, at) if pax.get(key) else None
        if value is not None:
            setattr(entry, key, value)
    if pax.get("mtime"):
        entry.mtime, entry.mtime_nsec = _pax_time(pax["mtime"], at)
    if pax.get("atime"):
        entry.atime = _pax_time(pax["atime"], at, "atime")
    if pax.get("ctime"):
        entry.ctime = _pax_time(pax["ctime"], at, "ctime")


# ----------------------------------------------------------------------------- writing
# Go's archive/tar Writer.WriteHeader, rule for rule: the same format choice (USTAR, then
# PAX, then GNU, within the format the reader guessed), the same PAX records in the same
# order, the same octal/base-256 and string encodings. Strings are handled as bytes here.


def _fits_octal(width: int, value: int) -> bool:
    return value >= 0 and (width >= 22 or value < 1 << (3 * (width - 1)))


def _fits_base256(width: int, value: int) -> bool:
    bits = 8 * (width - 1)
    return width >= 9 or -(1 << bits) <= value < 1 << bits


def _is_ascii(raw: bytes) -> bool:
    """Go's isASCII: a C string of 7-bit characters."""
    return raw.isascii() and b"\0" not in raw


#: the bytes Go's toASCII drops: NUL and every non-ASCII byte
_NOT_ASCII = bytes([0, *range(0x80, 0x100)])


def _to_ascii(raw: bytes) -> bytes:
    """Go's toASCII: drop every non-ASCII character (and NUL). bytes.translate, not a
    loop in Python: PAX values run to megabytes (a long xattr), each header goes here."""
    return raw if _is_ascii(raw) else raw.translate(None, _NOT_ASCII)


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """Go's splitUSTARPath: (prefix, suffix) when a long ASCII name fits USTAR's two fields."""
    length = len(name)
    if length <= 100 or not _is_ascii(name):
        return None
    if length > 156:
        length = 156
    elif name.endswith(b"/"):
        length -= 1
    i = name.rfind(b"/", 0, length)
    suffix_len = len(name) - i - 1
    if i <= 0 or suffix_len > 100 or suffix_len == 0 or i > 155:
        return None
    return name[:i], name[i + 1 :]


def _pax_time_text(sec: int, nsec: int) -> str:
    """Go's formatPAXTime: seconds, and the fraction without trailing zeros."""
    if nsec == 0:
        return str(sec)
    sign = ""
    if sec < 0:
        sign, sec, nsec = "-", -(sec + 1), 1_000_000_000 - nsec
    return f"{sign}{sec}.{nsec:09d}".rstrip("0")


def _pax_record(key: bytes, value: bytes) -> bytes:
    """'%d %s=%s\n' where the length counts the whole record, its own digits included."""
    body = b" " + key + b"=" + value + b"\n"
    size = len(body) + len(str(len(body)))
    if len(str(size)) + len(body) != size:  # counting the digits added a digit (9, 98, 997...)
        size = len(str(size)) + len(body)
    return str(size).encode() + body


def _valid_pax_record(key: bytes, value: bytes) -> bool:
    if not key or b"=" in key:
        return False
    if key in (b"path", b"linkpath", b"uname", b"gname"):
        return b"\0" not in value
    return b"\0" not in key


def _go_path_join(*parts: bytes) -> bytes:
    """Go's path.Join: the non-empty parts joined by '/', then path.Clean."""
    joined = b"/".join(p for p in parts if p)
    if not joined:
        return b""
    cleaned = posixpath.normpath(joined)
    return b"/" + cleaned.lstrip(b"/") if cleaned.startswith(b"//") else cleaned


class _Block:
    """One 512-byte header block, filled through Go's formatters."""

    def __init__(self) -> None:
        self.b = bytearray(BLOCK)

    def string(self, start: int, width: int, value: bytes) -> None:
        """Go's formatString: truncate; a truncated name loses its trailing slashes."""
        self.b[start : start + min(len(value), width)] = value[:width]
        if len(value) > width and value[width - 1 : width] == b"/":
            self.b[start + len(value[:width].rstrip(b"/"))] = 0

    def octal(self, start: int, width: int, value: int) -> None:
        """Go's formatOctal: zero-padded, NUL-terminated; 0 when it does not fit."""
        if not _fits_octal(width, value):
            value = 0
        self.string(start, width, f"{value:o}".rjust(width - 1, "0").encode())

    def numeric(self, start: int, width: int, value: int) -> None:
        """Go's formatNumeric: octal, else base-256 (GNU), else 0."""
        if _fits_octal(width, value) or not _fits_base256(width, value):
            self.octal(start, width, value)
            return
        raw = bytearray((value & ((1 << (8 * width)) - 1)).to_bytes(width, "big"))
        raw[0] |= 0x80
        self.b[start : start + width] = raw

    def finish(self, magic: bytes) -> bytes:
        """Set the magic and version, then the checksum (6 octal digits, NUL, space)."""
        self.b[257:265] = magic
        self.b[148:156] = b" " * 8
        self.b[148:156] = f"{sum(self.b):06o}".encode() + b"\0 "
        return bytes(self.b)


_MAGIC_USTAR = b"ustar\x0000"
_MAGIC_GNU = b"ustar  \x00"


def _raw_file(name: bytes, data: bytes, typeflag: str, magic: bytes) -> bytes:
    """Go's writeRawFile: a bare header (all else zero or NUL) for PAX and GNU long names."""
    blk = _Block()
    blk.b[156] = ord(typeflag)
    blk.string(0, 100, _to_ascii(name)[:100].rstrip(b"/"))
    for start, width in ((100, 8), (108, 8), (116, 8), (136, 12)):
        blk.octal(start, width, 0)
    blk.octal(124, 12, len(data))
    return blk.finish(magic) + pad(data)


@dataclass(slots=True)
class _Fields:
    """The header as Go's writer sees it, strings as bytes."""

    name: bytes
    linkname: bytes
    uname: bytes
    gname: bytes
    mtime: tuple[int, int]
    atime: tuple[int, int] | None
    ctime: tuple[int, int] | None


def _template(
    blk: _Block,
    e: TarEntry,
    f: _Fields,
    text: Callable[[int, int, bytes], None],
    number: Callable[[int, int, int], None],
) -> None:
    """Go's templateV7Plus: the fields USTAR, PAX and GNU headers share."""
    blk.b[156] = ord(e.typeflag)
    text(0, 100, f.name)
    text(157, 100, f.linkname)
    number(100, 8, e.mode)
    number(108, 8, e.uid)
    number(116, 8, e.gid)
    number(124, 12, e.size)
    number(136, 12, f.mtime[0])
    text(265, 32, f.uname)
    text(297, 32, f.gname)
    number(329, 8, e.devmajor)
    number(337, 8, e.devminor)


def _refuse(e: TarEntry, why: str) -> BadInputError:
    return BadInputError(f"cannot re-encode tar entry {e.name!r}: {why}")


def encode_header(e: TarEntry) -> bytes:
    """The header blocks Go's tar.Writer writes for the header Go's reader made of e.

    Raises BadInputError where Go's writer fails (so ctr-remote cannot convert the layer
    either) and for negative ids, modes and device numbers, which Go would encode in
    base-256 or PAX but which no unpacker can apply.
    """
    for what, value in (
        ("uid", e.uid),
        ("gid", e.gid),
        ("mode", e.mode),
        ("device major", e.devmajor),
        ("device minor", e.devminor),
    ):
        if value < 0:
            raise _refuse(e, f"negative {what} {value}")
    f = _Fields(
        encode(e.name),
        encode(e.linkname),
        encode(e.uname),
        encode(e.gname),
        (e.mtime, e.mtime_nsec),
        e.atime,
        e.ctime,
    )
    if e.format == FORMAT_UNKNOWN:  # Go rounds the time and drops atime/ctime
        sec, nsec = f.mtime
        f.mtime, f.atime, f.ctime = (sec + (nsec >= 500_000_000), 0), None, None
    allowed, records = _allowed_formats(e, f)
    if allowed & FORMAT_USTAR:
        return _write_ustar(e, f)
    if allowed & FORMAT_PAX:
        return _write_pax(e, f, records)
    if allowed & FORMAT_GNU:
        return _write_gnu(e, f)
    raise _refuse(e, "no tar format can hold its header (Go's tar writer fails here too)")


def _allowed_formats(e: TarEntry, f: _Fields) -> tuple[int, dict[bytes, bytes]]:
    """Go's Header.allowedFormats: the formats that can hold e, and the PAX records."""
    fmt = _ANY_FORMAT
    pax: dict[bytes, bytes] = {}
    given = {encode(k): encode(v) for k, v in e.pax.items()}
    prefer_pax = False

    def keep_given(key: bytes, value: bytes) -> None:
        if given.get(key) == value:
            pax[key] = value

    for value, width, key in (
        (f.name, 100, b"path"),
        (f.linkname, 100, b"linkpath"),
        (f.uname, 32, b"uname"),
        (f.gname, 32, b"gname"),
    ):
        too_long = len(value) > width
        if b"\0" in value or (too_long and key not in (b"path", b"linkpath")):
            fmt &= ~FORMAT_GNU
        if not _is_ascii(value) or too_long:
            if key != b"path" or _split_ustar(value) is None:
                fmt &= ~FORMAT_USTAR
            pax[key] = value
        keep_given(key, value)
    numbers: tuple[tuple[int, int, bytes | None], ...] = (
        (e.mode, 8, None),
        (e.uid, 8, b"uid"),
        (e.gid, 8, b"gid"),
        (e.size, 12, b"size"),
        (e.devmajor, 8, None),
        (e.devminor, 8, None),
    )
    for number, width, nkey in numbers:
        if not _fits_base256(width, number):
            fmt &= ~FORMAT_GNU
        if not _fits_octal(width, number):
            fmt &= ~FORMAT_USTAR
            if nkey is None:
                fmt &= ~FORMAT_PAX
            else:
                pax[nkey] = str(number).encode()
        if nkey is not None and given:
            keep_given(nkey, str(number).encode())
    for stamp, tkey in ((f.mtime, b"mtime"), (f.atime, b"atime"), (f.ctime, b"ctime")):
        if stamp is None:
            continue
        sec, nsec = stamp
        text = _pax_time_text(sec, nsec).encode()
        if not _fits_base256(12, sec):
            fmt &= ~FORMAT_GNU
        is_mtime, fits = tkey == b"mtime", _fits_octal(12, sec)
        if not is_mtime or not fits:
            fmt &= ~FORMAT_USTAR
        if not is_mtime or not fits or nsec:
            prefer_pax = True
            pax[tkey] = text
        keep_given(tkey, text)

    if e.typeflag in (REG, CHAR, BLOCKDEV, FIFO) and e.name.endswith("/"):
        raise _refuse(e, "a non-directory name may not end in '/' (Go's tar writer refuses it)")
    prefix = b"SCHILY.xattr."
    xattrs = {k: v for k, v in given.items() if k.startswith(prefix) and v}
    if xattrs:
        pax.update(xattrs)
        fmt &= FORMAT_PAX
    if given:
        for key, value in given.items():
            if (
                key not in pax
                and decode(key) not in _BASIC_PAX
                and not key.startswith(b"GNU.sparse")
            ):
                pax[key] = value
        fmt &= FORMAT_PAX
    for key, value in pax.items():
        if not _valid_pax_record(key, value):
            raise _refuse(e, f"invalid PAX record {decode(key)!r}")
    if e.format != FORMAT_UNKNOWN:
        want = e.format
        if want & FORMAT_PAX and not prefer_pax:
            want |= FORMAT_USTAR
        fmt &= want
    return fmt, pax


def _write_ustar(e: TarEntry, f: _Fields) -> bytes:
    blk = _Block()
    split = _split_ustar(f.name)
    prefix, name = split if split else (b"", f.name)
    _template(blk, e, replace(f, name=name), blk.string, blk.octal)
    blk.string(345, 155, prefix)
    return blk.finish(_MAGIC_USTAR)


def _write_pax(e: TarEntry, f: _Fields, records: dict[bytes, bytes]) -> bytes:
    out = b""
    if records:
        data = b"".join(_pax_record(k, records[k]) for k in sorted(records))
        if len(data) > MAX_SPECIAL_SIZE:
            raise _refuse(e, f"its PAX header would be {len(data)} bytes, over Go's 1 MiB limit")
        head, tail = posixpath.split(f.name)
        out = _raw_file(_go_path_join(head, b"PaxHeaders.0", tail), data, "x", _MAGIC_USTAR)
    blk = _Block()

    def text(start: int, width: int, value: bytes) -> None:
        blk.string(start, width, _to_ascii(value))

    _template(blk, e, f, text, blk.octal)
    return out + blk.finish(_MAGIC_USTAR)


def _write_gnu(e: TarEntry, f: _Fields) -> bytes:
    out = b""
    if len(f.name) > 100:
        out += _raw_file(b"././@LongLink", f.name + b"\0", "L", _MAGIC_GNU)
    if len(f.linkname) > 100:
        out += _raw_file(b"././@LongLink", f.linkname + b"\0", "K", _MAGIC_GNU)
    blk = _Block()
    _template(blk, e, f, blk.string, blk.numeric)
    if f.atime is not None:
        blk.numeric(345, 12, f.atime[0])
    if f.ctime is not None:
        blk.numeric(357, 12, f.ctime[0])
    return out + blk.finish(_MAGIC_GNU)


def pad(data: bytes) -> bytes:
    return data + padding(len(data))


def padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def simple_reg_header(name: str, size: int) -> bytes:
    """What Go writes for a bare Header{Typeflag: '0', Name, Size} (landmarks, the TOC)."""
    return encode_header(TarEntry(name=name, typeflag=REG, size=size))
