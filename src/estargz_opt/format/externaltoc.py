"""eStargz with an external TOC: the blob ends with a 46-byte footer, the TOC travels apart.

The payload is plain eStargz gzip. The TOC blob is the same gzip member that would
otherwise sit inside the layer; the DiffID covers the payload only.
"""

from __future__ import annotations

import struct

from estargz_opt.format.codec import Footer, TOCTail
from estargz_opt.format.estargz import (
    DEFAULT_LEVEL,
    GzipCompressor,
    GzipDecompressor,
    gzip_member,
    toc_tar,
)

FOOTER_SIZE = 46
_MAGIC = b"STARGZEXTERNALTOC"


def footer() -> bytes:
    extra = b"SG" + struct.pack("<H", len(_MAGIC)) + _MAGIC
    return (
        bytes.fromhex("1f8b08040000000000ff")
        + struct.pack("<H", len(extra))
        + extra
        + bytes.fromhex("010000ffff")
        + bytes(8)
    )


class ExternalTOCCompressor(GzipCompressor):
    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        super().__init__(level)

    def write_toc_and_footer(self, toc_json: bytes, payload_size: int) -> TOCTail:
        return TOCTail(
            blob_tail=footer(), diff_tail=b"", toc_blob=gzip_member(toc_tar(toc_json), self.level)
        )


class ExternalTOCDecompressor(GzipDecompressor):
    """Parses the external footer; the TOC bytes come from the separately supplied blob."""

    name = "estargz-external-toc"
    footer_size = FOOTER_SIZE

    def parse_footer(self, tail: bytes, blob_size: int) -> Footer:
        if tail[-FOOTER_SIZE:] != footer():
            raise ValueError("not an external-TOC eStargz footer")
        return Footer(payload_size=blob_size - FOOTER_SIZE, toc_offset=None, toc_size=0)
