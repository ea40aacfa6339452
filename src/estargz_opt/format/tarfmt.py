"""Tar headers read the way Go's archive/tar reads them, and written back as USTAR/PAX.

Upstream builds its TOC from Go's parsed headers, so the fields here (raw mode, joined
USTAR prefix, PAX overrides, GNU long names) follow Go's reader; that is what makes our
TOC entries equal ctr-remote's. The writer only has to produce a valid tar that round
trips those fields: its bytes need not equal Go's.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
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
# PAX keys that we derive from header fields when writing; every other record is carried.
_DERIVED_PAX = frozenset({"path", "linkpath", "size", "uid", "gid", "uname", "gname"})


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


def _pax_time(text: str, offset: int) -> tuple[int, int]:
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise BadInputError(f"invalid PAX mtime record in tar header at offset {offset}")
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
    long_name: str | None = None
    long_link: str | None = None
    first_header = start
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
        typeflag = chr(block[156]) if block[156] else "\0"
        size = parse_number(block[124:136], "size", at)
        if size < 0:
            raise BadInputError(f"negative size in tar header at offset {at}")
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        magic = block[257:265]
        if typeflag in ("x", "g", "L", "K"):
            if size > MAX_SPECIAL_SIZE:
                raise BadInputError(
                    f"oversized tar header field: {size}-byte extended header at offset {at}"
                )
            data = r.read_exact(padded, "extended header")[:size]
            if typeflag == "x":
                pax.update(_parse_pax(data, at))
            elif typeflag == "g":
                raise BadInputError(
                    f"unsupported tar entry: global PAX header at offset {at} "
                    "(upstream eStargz refuses them too)"
                )
            elif typeflag == "L":
                long_name = _parse_string(data)
            else:
                long_link = _parse_string(data)
            continue
        if typeflag == "S" or any(k.startswith("GNU.sparse.") for k in pax):
            raise BadInputError(f"unsupported tar entry: GNU sparse file at offset {at}")

        name = _parse_string(block[0:100])
        if magic[:6] == b"ustar\x00":  # USTAR/PAX, or star with its 131-byte prefix
            star = block[508:512] == b"tar\0"
            prefix = _parse_string(block[345:476] if star else block[345:500])
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
        )
        if magic[:5] == b"ustar":
            entry.uname = _parse_string(block[265:297])
            entry.gname = _parse_string(block[297:329])
            if typeflag in (CHAR, BLOCKDEV):
                entry.devmajor = parse_number(block[329:337], "devmajor", at)
                entry.devminor = parse_number(block[337:345], "devminor", at)
        if long_name is not None:
            entry.name = long_name
        if long_link is not None:
            entry.linkname = long_link
        if pax:
            _merge_pax(entry, pax, at)
        if entry.typeflag == "\0":
            entry.typeflag = DIR if entry.name.endswith("/") else REG
        if entry.typeflag not in SUPPORTED_TYPES:
            raise BadInputError(
                f"unsupported tar entry type {entry.typeflag!r} for {entry.name!r} at offset {at}"
            )
        padded = (entry.data_size + BLOCK - 1) // BLOCK * BLOCK
        entry.data_offset = r.pos
        entry.header_offset = first_header
        r.skip(padded, f"content of {entry.name!r}", end)
        if end is not None and r.pos > end:
            raise BadInputError(f"truncated tar: content of {entry.name!r} ends early")
        pax, long_name, long_link = {}, None, None
        first_header = r.pos
        yield entry


def _merge_pax(entry: TarEntry, pax: dict[str, str], at: int) -> None:
    entry.pax = dict(pax)
    if "path" in pax:
        entry.name = pax["path"]
    if "linkpath" in pax:
        entry.linkname = pax["linkpath"]
    if "uname" in pax:
        entry.uname = pax["uname"]
    if "gname" in pax:
        entry.gname = pax["gname"]
    for key in ("uid", "gid", "size"):
        value = _pax_int(pax, key, at)
        if value is not None:
            setattr(entry, key, value)
    if "mtime" in pax:
        entry.mtime, entry.mtime_nsec = _pax_time(pax["mtime"], at)


# ----------------------------------------------------------------------------- writing


def _octal(value: int, width: int) -> bytes | None:
    """Go's formatOctal: zero padded, NUL terminated; None when it does not fit."""
    if value < 0:
        return None
    digits = f"{value:o}"
    if len(digits) > width - 1:
        return None
    return digits.rjust(width - 1, "0").encode() + b"\0"


def _base256(value: int, width: int) -> bytes:
    return bytes([0x80]) + (value & ((1 << (8 * (width - 1))) - 1)).to_bytes(width - 1, "big")


def _fits_ascii(text: str, width: int) -> bool:
    raw = encode(text)
    return len(raw) <= width and raw.isascii() and b"\0" not in raw


def _split_ustar(name: str) -> tuple[str, str] | None:
    """USTAR prefix/name split for long ASCII names, as Go's writer does."""
    raw = encode(name)
    if len(raw) <= 100 or not raw.isascii():
        return None
    limit = len(raw)
    if limit > 156:
        limit = 156
    elif raw.endswith(b"/"):
        limit -= 1
    i = raw.rfind(b"/", 0, limit)
    if i <= 0 or len(raw) - i - 1 > 100 or len(raw) - i - 1 == 0 or i > 155:
        return None
    return name[:i], name[i + 1 :]


def _put(block: bytearray, start: int, width: int, value: bytes) -> None:
    block[start : start + len(value[:width])] = value[:width]


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode("utf-8", "surrogateescape")
    length = len(body)
    while len(str(length + len(str(length)))) != len(str(length)):
        length += 1
    length += len(str(length))
    return str(length).encode() + body


def _ustar_block(
    name: str,
    typeflag: str,
    *,
    size: int = 0,
    mode: int = 0,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 0,
    linkname: str = "",
    uname: str = "",
    gname: str = "",
    devmajor: int = 0,
    devminor: int = 0,
    prefix: str = "",
) -> bytes:
    block = bytearray(BLOCK)
    _put(block, 0, 100, encode(name))
    for start, width, value in (
        (100, 8, mode),
        (108, 8, uid),
        (116, 8, gid),
        (124, 12, size),
        (136, 12, mtime),
        (329, 8, devmajor),
        (337, 8, devminor),
    ):
        _put(block, start, width, _octal(value, width) or _base256(value, width))
    block[156] = ord(typeflag)
    _put(block, 157, 100, encode(linkname))
    block[257:265] = b"ustar\x0000"
    _put(block, 265, 32, encode(uname))
    _put(block, 297, 32, encode(gname))
    _put(block, 345, 155, encode(prefix))
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}".encode() + b"\0 "
    return bytes(block)


def encode_header(e: TarEntry) -> bytes:
    """Header blocks (a PAX header first when needed) that round-trip e's fields."""
    size = e.data_size
    records = {k: v for k, v in e.pax.items() if k not in _DERIVED_PAX}
    name, prefix = e.name, ""
    if not _fits_ascii(name, 100):
        split = _split_ustar(name)
        if split:
            prefix, name = split
        else:
            records["path"] = e.name
    if not _fits_ascii(e.linkname, 100):
        records["linkpath"] = e.linkname
    if not _fits_ascii(e.uname, 32):
        records["uname"] = e.uname
    if not _fits_ascii(e.gname, 32):
        records["gname"] = e.gname
    for key, value, width in (("uid", e.uid, 8), ("gid", e.gid, 8), ("size", size, 12)):
        if _octal(value, width) is None:
            records[key] = str(value)
    if _octal(e.mtime, 12) is None and "mtime" not in records:
        records["mtime"] = str(e.mtime)
    main = _ustar_block(
        name if "path" not in records else _ascii_stub(e.name),
        e.typeflag,
        size=size if "size" not in records else 0,
        mode=e.mode,
        uid=e.uid if "uid" not in records else 0,
        gid=e.gid if "gid" not in records else 0,
        mtime=e.mtime if _octal(e.mtime, 12) else 0,
        linkname=e.linkname if "linkpath" not in records else _ascii_stub(e.linkname),
        uname=e.uname if "uname" not in records else "",
        gname=e.gname if "gname" not in records else "",
        devmajor=e.devmajor,
        devminor=e.devminor,
        prefix=prefix,
    )
    if not records:
        return main
    payload = b"".join(_pax_record(k, records[k]) for k in sorted(records))
    head, tail = posixpath.split(e.name.rstrip("/"))
    pax_name = posixpath.join(head, "PaxHeaders.0", tail)
    pax_header = _ustar_block(_ascii_stub(pax_name), "x", size=len(payload))
    return pax_header + pad(payload) + main


def _ascii_stub(text: str) -> str:
    raw = encode(text)
    return bytes(b if 32 <= b < 127 else 95 for b in raw[:100]).decode()


def pad(data: bytes) -> bytes:
    return data + padding(len(data))


def padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def simple_reg_header(name: str, size: int) -> bytes:
    """A bare USTAR regular-file header: all of mode, owner and mtime zero (landmarks, TOC)."""
    return _ustar_block(name, REG, size=size)
