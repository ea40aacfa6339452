"""eStargz with gzip: members compressed by libdeflate, the TOC in its own member, 51-byte footer.

Every member is a plain gzip member (no name, no mtime, OS 255, as Go writes them), so
each chunk decompresses on its own and members compress in parallel.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import deflate
from isal import isal_zlib

from estargz_opt.constants import MAX_TOC_SIZE, TOC_TAR_NAME
from estargz_opt.format import tarfmt
from estargz_opt.format.codec import PIECE, Footer, TOCTail

DEFAULT_LEVEL = 9
# Go's compress/gzip levels below 0, which ctr-remote passes through: DefaultCompression
# is flate level 6; HuffmanOnly has no LZ77 matches, which libdeflate cannot do, so zlib's
# Z_HUFFMAN_ONLY strategy (the same encoding idea) writes those members.
DEFAULT_COMPRESSION = -1
HUFFMAN_ONLY = -2
MIN_LEVEL, MAX_LEVEL = HUFFMAN_ONLY, 9
FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
_HEADER_EXTRA = bytes.fromhex("1f8b08040000000000ff")
_FINAL_EMPTY_BLOCK = bytes.fromhex("010000ffff") + bytes(8)


def gzip_header(level: int) -> bytes:
    xfl = 2 if level == 9 else 4 if level == 1 else 0
    return bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, xfl, 0xFF])


def _zlib_compressor(level: int) -> zlib._Compress:
    if level == HUFFMAN_ONLY:
        return zlib.compressobj(
            zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15, 8, zlib.Z_HUFFMAN_ONLY
        )
    return zlib.compressobj(level, zlib.DEFLATED, -15)


def gzip_member(data: bytes, level: int) -> bytes:
    """A complete gzip member: libdeflate's raw deflate (zlib's when Huffman-only) inside a
    Go-style header."""
    body: bytes | bytearray
    if level == HUFFMAN_ONLY:
        z = _zlib_compressor(level)
        body = z.compress(data) + z.flush()
    else:
        body = deflate.deflate_compress(data, 6 if level == DEFAULT_COMPRESSION else level)
    trailer = struct.pack("<II", deflate.crc32(data), len(data) & 0xFFFFFFFF)
    return gzip_header(level) + body + trailer


def toc_tar(toc_json: bytes) -> bytes:
    """The tar that carries the TOC: its header, the JSON, padding and two EOF blocks."""
    header = tarfmt.simple_reg_header(TOC_TAR_NAME, len(toc_json))
    return header + tarfmt.pad(toc_json) + tarfmt.EOF_BLOCKS


def footer(toc_offset: int) -> bytes:
    extra = b"SG" + struct.pack("<H", 22) + f"{toc_offset:016x}STARGZ".encode()
    return _HEADER_EXTRA + struct.pack("<H", len(extra)) + extra + _FINAL_EMPTY_BLOCK


class StreamingMember:
    """A gzip member written piece by piece, for min-chunk-size where cuts depend on output size.

    zlib is used here because the cut decision needs the compressed size so far (after a
    sync flush, as upstream measures it); libdeflate has no streaming mode.
    """

    def __init__(self, level: int) -> None:
        self._z = _zlib_compressor(level)
        self._crc = 0
        self._size = 0
        self.level = level
        self.parts: list[bytes] = [gzip_header(level)]
        self.compressed = len(self.parts[0])

    def write(self, data: bytes) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        out = self._z.compress(data)
        if out:
            self.parts.append(out)
            self.compressed += len(out)

    def flush(self) -> None:
        out = self._z.flush(zlib.Z_SYNC_FLUSH)
        self.parts.append(out)
        self.compressed += len(out)

    def close(self) -> bytes:
        self.parts.append(self._z.flush(zlib.Z_FINISH))
        self.parts.append(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        return b"".join(self.parts)


class GzipCompressor:
    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = level

    def compress_member(self, data: bytes) -> bytes:
        return gzip_member(data, self.level)

    def streaming_member(self) -> StreamingMember:
        return StreamingMember(self.level)

    def write_toc_and_footer(self, toc_json: bytes, payload_size: int) -> TOCTail:
        plain = toc_tar(toc_json)
        member = gzip_member(plain, self.level)
        return TOCTail(blob_tail=member + footer(payload_size), diff_tail=plain)


# isal's stub declares its error class as an instance (`error: Exception`); it is a class.
_ISAL_ERROR: type[Exception] = isal_zlib.error  # type: ignore[assignment]  # see above
_DECODE_ERRORS = (_ISAL_ERROR, zlib.error)


class GzipStream:
    """Decompresses consecutive gzip members (ISA-L); CRC and length are checked.

    The one gzip decoder: the layer reader, the source unpacker and the layer-name
    index all decode through it, in pieces of at most PIECE bytes.
    """

    def __init__(self, start: int = 0) -> None:
        self._d = isal_zlib.decompressobj(31)
        self._fresh = True
        self.member_start = start
        self._pos = start  # blob offset of the next byte fed

    def feed(self, data: bytes) -> Iterator[bytes]:
        at = self._pos
        self._pos += len(data)
        while True:
            if self._fresh:
                if not data:
                    return
                self.member_start = at
                self._fresh = False
            try:
                out = self._d.decompress(data, PIECE)
            except _DECODE_ERRORS as exc:
                raise ValueError(f"corrupt gzip data ({exc})") from None
            if self._d.eof:
                rest = self._d.unused_data
                self._d = isal_zlib.decompressobj(31)
                self._fresh = True
            else:
                rest = self._d.unconsumed_tail
            at += len(data) - len(rest)
            data = rest
            if out:
                yield out
            if not data and len(out) < PIECE and not self._fresh:
                return  # everything fed is used and no output is held back

    def at_member_end(self) -> bool:
        return self._fresh


def _parse_gzip_extra(tail: bytes, xlen: int) -> bytes:
    """The FEXTRA field of a bare gzip header at the start of tail (a minimal header parser)."""
    if tail[:3] != b"\x1f\x8b\x08" or not tail[3] & 0x04:
        raise ValueError("no gzip header with an extra field")
    (got,) = struct.unpack_from("<H", tail, 10)
    if got != xlen:
        raise ValueError("unexpected gzip extra field length")
    return tail[12 : 12 + xlen]


def _parse_toc_member(raw: bytes) -> bytes:
    """JSON from the gzip member holding tar(stargz.index.json), decoded only as far as needed.

    The tar header states the JSON's size, so a member that inflates beyond it (or beyond
    the TOC cap) is refused after at most one piece more than the TOC needs.
    """
    stream = GzipStream()
    plain = bytearray()
    limit = MAX_TOC_SIZE + _TOC_TAR_SLACK
    try:
        for piece in stream.feed(raw):
            plain += piece
            if len(plain) >= tarfmt.BLOCK and limit > MAX_TOC_SIZE:
                limit = _toc_tar_limit(bytes(plain[: tarfmt.BLOCK]), limit)
            if len(plain) > limit:
                raise ValueError(f"TOC member inflates beyond {limit} bytes, more than its TOC")
    except ValueError as exc:
        raise ValueError(f"TOC member: {exc}") from None
    if not stream.at_member_end():
        raise ValueError("truncated TOC gzip member")
    entries = tarfmt.iter_entries(io.BytesIO(plain), len(plain))
    try:
        first = next(entries)
    except StopIteration:
        raise ValueError("TOC member holds no tar entry") from None
    except Exception as exc:
        raise ValueError(f"TOC member is not a tar ({exc})") from None
    if first.name != TOC_TAR_NAME:
        raise ValueError(f"first entry of the TOC member is {first.name!r}, not {TOC_TAR_NAME}")
    if first.size > MAX_TOC_SIZE:
        raise ValueError(f"the TOC is {first.size} bytes, over the {MAX_TOC_SIZE} limit")
    return bytes(plain[first.data_offset : first.data_offset + first.size])


_TOC_TAR_SLACK = 1 << 20  # room for the TOC tar's own headers, padding and EOF blocks


def _toc_tar_limit(block: bytes, limit: int) -> int:
    """The TOC tar's whole size when its first header is a plain file header, else limit."""
    if block == bytes(tarfmt.BLOCK):
        raise ValueError("TOC member holds no tar entry")
    if block[156:157] not in (b"0", b"\0"):
        return limit  # an extended header first: only the cap bounds it
    try:
        size = tarfmt.parse_number(block[124:136], "size", 0)
    except Exception as exc:
        raise ValueError(f"TOC member is not a tar ({exc})") from None
    if size > MAX_TOC_SIZE:
        raise ValueError(f"the TOC is {size} bytes, over the {MAX_TOC_SIZE} limit")
    return tarfmt.BLOCK + size + len(tarfmt.padding(size)) + len(tarfmt.EOF_BLOCKS)


class GzipDecompressor:
    name = "estargz"
    footer_size = FOOTER_SIZE

    def parse_footer(self, tail: bytes, blob_size: int) -> Footer:
        extra = _footer_extra(tail, FOOTER_SIZE, 26, "an eStargz")
        if extra[:2] != b"SG" or struct.unpack_from("<H", extra, 2)[0] != 22:
            raise ValueError("gzip extra field is not an eStargz footer")
        if extra[-6:] != b"STARGZ":
            raise ValueError("footer lacks the STARGZ magic")
        toc_offset = _hex_offset(extra[4:20])
        return _checked_footer(toc_offset, blob_size, FOOTER_SIZE)

    def parse_toc(self, raw: bytes, footer: Footer) -> bytes:
        return _parse_toc_member(raw)

    def stream(self, start: int = 0) -> GzipStream:
        return GzipStream(start)


class LegacyGzipDecompressor(GzipDecompressor):
    """The original stargz footer (47 bytes, bare extra field); read-only."""

    name = "stargz"
    footer_size = LEGACY_FOOTER_SIZE

    def parse_footer(self, tail: bytes, blob_size: int) -> Footer:
        extra = _footer_extra(tail, LEGACY_FOOTER_SIZE, 22, "a stargz")
        if extra[-6:] != b"STARGZ":
            raise ValueError("footer lacks the STARGZ magic")
        return _checked_footer(_hex_offset(extra[:16]), blob_size, LEGACY_FOOTER_SIZE)


def _footer_extra(tail: bytes, footer_size: int, xlen: int, what: str) -> bytes:
    """The extra field of the footer (the last `footer_size` bytes of the blob)."""
    tail = tail[-footer_size:]
    if len(tail) < footer_size:
        raise ValueError(f"blob too small for {what} footer")
    return _parse_gzip_extra(tail, xlen)


def _hex_offset(raw: bytes) -> int:
    try:
        return int(raw.decode("ascii"), 16)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("footer TOC offset is not hexadecimal") from None


def _checked_footer(toc_offset: int, blob_size: int, footer_size: int) -> Footer:
    toc_size = blob_size - toc_offset - footer_size
    if toc_size <= 0:
        raise ValueError(f"footer TOC offset {toc_offset} lies outside the blob")
    return Footer(payload_size=toc_offset, toc_offset=toc_offset, toc_size=toc_size)
