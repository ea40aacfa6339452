"""zstd:chunked: one zstd frame per member, the TOC in a skippable frame, a 40-byte footer.

The footer's payload sits in its own skippable frame (48 bytes on disk); readers look at
the last 40. The manifest-checksum annotation hashes the compressed TOC.
"""

from __future__ import annotations

import struct
import threading

import zstandard

from estargz_opt.digest import sha256_digest
from estargz_opt.format.codec import Footer, TOCTail

DEFAULT_LEVEL = 3
FOOTER_SIZE = 40
SKIPPABLE_MAGIC = 0x184D2A50
_SKIPPABLE_HEADER = struct.Struct("<II")
_FOOTER_MAGIC = b"GnUlInUx"
_MANIFEST_TYPE_CRFS = 1
MANIFEST_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
MANIFEST_POSITION = "io.containers.zstd-chunked.manifest-position"


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
        return TOCTail(
            blob_tail=skippable_frame(compressed) + skippable_frame(footer),
            diff_tail=b"",
            annotations={
                MANIFEST_CHECKSUM: sha256_digest(compressed),
                MANIFEST_POSITION: f"{toc_offset}:{len(compressed)}:{len(toc_json)}:1",
            },
        )


class ZstdStream:
    """Decompresses consecutive zstd frames, skipping skippable ones; checksums are checked."""

    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._d: zstandard.ZstdDecompressionObj | None = None
        self._pending = b""
        self._skip = 0

    def feed(self, data: bytes) -> bytes:
        out = []
        data = self._pending + data
        self._pending = b""
        while data:
            if self._skip:
                n = min(self._skip, len(data))
                self._skip -= n
                data = data[n:]
                continue
            if self._d is None:
                if len(data) < 8:
                    self._pending = data
                    break
                magic, size = _SKIPPABLE_HEADER.unpack_from(data)
                if magic & 0xFFFFFFF0 == SKIPPABLE_MAGIC:
                    self._skip = size
                    data = data[8:]
                    continue
                self._d = self._dctx.decompressobj()
            try:
                out.append(self._d.decompress(data))
            except zstandard.ZstdError as exc:
                raise ValueError(f"corrupt zstd data ({exc})") from None
            if not self._d.eof:
                break
            data = self._d.unused_data
            self._d = None
        return b"".join(out)

    def at_member_end(self) -> bool:
        return self._d is None and not self._pending and not self._skip


class ZstdDecompressor:
    name = "zstdchunked"
    footer_size = FOOTER_SIZE

    def parse_footer(self, tail: bytes, blob_size: int) -> Footer:
        tail = tail[-FOOTER_SIZE:]
        if len(tail) < FOOTER_SIZE or tail[32:] != _FOOTER_MAGIC:
            raise ValueError("not a zstd:chunked footer")
        toc_offset, clen, _ulen, _kind = struct.unpack_from("<QQQQ", tail)
        if toc_offset < 8 or toc_offset + clen > blob_size - FOOTER_SIZE:
            raise ValueError(f"footer TOC position {toc_offset}:{clen} lies outside the blob")
        return Footer(payload_size=toc_offset - 8, toc_offset=toc_offset, toc_size=clen)

    def parse_toc(self, raw: bytes) -> bytes:
        try:
            d = zstandard.ZstdDecompressor().decompressobj()
            out = d.decompress(raw)
        except zstandard.ZstdError as exc:
            raise ValueError(f"corrupt zstd TOC ({exc})") from None
        if not d.eof:
            raise ValueError("truncated zstd TOC")
        return out

    def stream(self) -> ZstdStream:
        return ZstdStream()
