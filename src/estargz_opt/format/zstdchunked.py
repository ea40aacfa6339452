"""zstd:chunked: one zstd frame per member, the TOC in a skippable frame, a 40-byte footer.

The footer's payload sits in its own skippable frame (48 bytes on disk); readers look at
the last 40. The manifest-checksum annotation hashes the compressed TOC.
"""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Iterator

import zstandard

from estargz_opt.constants import (
    MAX_TOC_SIZE,
    ZSTD_MANIFEST_CHECKSUM_ANNOTATION,
    ZSTD_MANIFEST_POSITION_ANNOTATION,
)
from estargz_opt.digest import sha256_digest
from estargz_opt.format.codec import PIECE, Footer, TOCTail

if sys.version_info >= (3, 14):
    from compression import zstd as _zstd
else:
    from backports import zstd as _zstd

DEFAULT_LEVEL = 3
# A zstd frame names the window its decoder must hold, up to 2 GiB: a few hostile bytes can
# make a decoder allocate that much. Chunk frames, decoded several at a time, get up to
# 32 MiB (upstream's encoder uses 8 MiB windows; ours, with the input size known, fit the
# chunk). The TOC frame and source layers, one decoder at a time, get libzstd's default
# limit of 128 MiB (what level 22 writes for a big TOC, `zstd --long` for a layer).
BLOB_WINDOW_LOG_MAX = 25
SOURCE_WINDOW_LOG_MAX = 27
FOOTER_SIZE = 40
SKIPPABLE_MAGIC = 0x184D2A50
_SKIPPABLE_HEADER = struct.Struct("<II")
_FOOTER_MAGIC = b"GnUlInUx"
_MANIFEST_TYPE_CRFS = 1


def skippable_frame(payload: bytes) -> bytes:
    return _SKIPPABLE_HEADER.pack(SKIPPABLE_MAGIC, len(payload)) + payload


class ZstdCompressor:
    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = level
        self._local = threading.local()

    def _encoder(self) -> zstandard.ZstdCompressor:
        enc = getattr(self._local, "enc", None)
        if enc is None:
            enc = zstandard.ZstdCompressor(
                level=self.level, write_checksum=True, write_content_size=False
            )
            self._local.enc = enc
        return enc

    def compress_member(self, data: bytes) -> bytes:
        return self._encoder().compress(data)

    def write_toc_and_footer(self, toc_json: bytes, payload_size: int) -> TOCTail:
        compressed = self._encoder().compress(toc_json)
        toc_offset = payload_size + _SKIPPABLE_HEADER.size
        footer = (
            struct.pack("<QQQQ", toc_offset, len(compressed), len(toc_json), _MANIFEST_TYPE_CRFS)
            + _FOOTER_MAGIC
        )
        position = f"{toc_offset}:{len(compressed)}:{len(toc_json)}:1"
        return TOCTail(
            blob_tail=skippable_frame(compressed) + skippable_frame(footer),
            diff_tail=b"",
            annotations={
                ZSTD_MANIFEST_CHECKSUM_ANNOTATION: sha256_digest(compressed),
                ZSTD_MANIFEST_POSITION_ANNOTATION: position,
            },
        )


def _decoder(window_log_max: int) -> _zstd.ZstdDecompressor:
    """A decoder that refuses frames whose window exceeds 2**window_log_max bytes."""
    limit: dict[int, int] = {_zstd.DecompressionParameter.window_log_max: window_log_max}
    return _zstd.ZstdDecompressor(options=limit)


class ZstdStream:
    """Decompresses consecutive zstd frames (skippable ones yield nothing); checksums are checked.

    The decoder is the standard library's zstd API (backported before 3.14) because it can
    stop at a given output size, which python-zstandard's decompressobj cannot.
    """

    def __init__(self, start: int = 0, window_log_max: int = BLOB_WINDOW_LOG_MAX) -> None:
        self._d: _zstd.ZstdDecompressor | None = None
        self._window_log_max = window_log_max
        self.member_start = start
        self._pos = start  # blob offset of the next byte fed

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._pos += len(data)
        while True:
            if self._d is None:
                if not data:
                    return
                self._d = _decoder(self._window_log_max)
                self.member_start = self._pos - len(data)
            try:
                out = self._d.decompress(data, max_length=PIECE)
            except _zstd.ZstdError as exc:
                raise ValueError(f"corrupt zstd data ({exc})") from None
            data = b""
            if self._d.eof:
                data = self._d.unused_data
                self._d = None
            elif self._d.needs_input:  # all input used and no output held back
                if out:
                    yield out
                return
            if out:
                yield out

    def at_member_end(self) -> bool:
        return self._d is None


class ZstdDecompressor:
    name = "zstdchunked"
    footer_size = FOOTER_SIZE

    def parse_footer(self, tail: bytes, blob_size: int) -> Footer:
        tail = tail[-FOOTER_SIZE:]
        if len(tail) < FOOTER_SIZE or tail[32:] != _FOOTER_MAGIC:
            raise ValueError("not a zstd:chunked footer")
        toc_offset, clen, ulen, _kind = struct.unpack_from("<QQQQ", tail)
        if toc_offset < 8 or toc_offset + clen > blob_size - FOOTER_SIZE:
            raise ValueError(f"footer TOC position {toc_offset}:{clen} lies outside the blob")
        return Footer(
            payload_size=toc_offset - 8, toc_offset=toc_offset, toc_size=clen, toc_plain_size=ulen
        )

    def parse_toc(self, raw: bytes, footer: Footer) -> bytes:
        """The TOC frame, decoded to at most the footer's stated size (and the hard cap)."""
        limit = footer.toc_plain_size or MAX_TOC_SIZE
        if limit > MAX_TOC_SIZE:
            raise ValueError(f"the footer states a {limit}-byte TOC, over the {MAX_TOC_SIZE} limit")
        d = _decoder(SOURCE_WINDOW_LOG_MAX)
        try:
            out = d.decompress(raw, max_length=limit + 1)
        except _zstd.ZstdError as exc:
            raise ValueError(f"corrupt zstd TOC ({exc})") from None
        if len(out) > limit:
            raise ValueError(f"the TOC decompresses to more than the footer's {limit} bytes")
        if not d.eof:
            raise ValueError("truncated zstd TOC")
        return out

    def stream(self, start: int = 0) -> ZstdStream:
        return ZstdStream(start)
