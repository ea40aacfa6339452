"""The small interface through which each layer format plugs into the writer and reader.

A format is a Compressor (member writer, TOC-and-footer writer) plus a Decompressor
(footer parser, TOC parser, payload stream). The builder and the reader know nothing
else about gzip, zstd or external TOCs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

PIECE = 1 << 20  # the most plain bytes a stream hands out at once, whatever the ratio


@dataclass(frozen=True, slots=True)
class TOCTail:
    """What a format appends after the payload, and what that adds to the DiffID stream."""

    blob_tail: bytes
    diff_tail: bytes
    toc_blob: bytes | None = None
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Footer:
    """Where the TOC lives. toc_offset is None when the TOC is kept outside the blob."""

    payload_size: int
    toc_offset: int | None
    toc_size: int
    toc_plain_size: int = 0  # the TOC's uncompressed size when the footer states it (zstd)


class Output(Protocol):
    """Where a built layer goes: a file, or a store's upload stream (only written to)."""

    def write(self, data: bytes, /) -> int: ...


class Compressor(Protocol):
    """Writes a format: independent payload members, then the TOC and the footer."""

    def compress_member(self, data: bytes) -> bytes:
        """One self-contained member (gzip member or zstd frame). Thread-safe."""
        ...

    def write_toc_and_footer(self, toc_json: bytes, payload_size: int) -> TOCTail: ...


class Stream(Protocol):
    """Decompresses consecutive members fed in pieces; raises ValueError on corruption.

    feed yields the plain bytes in pieces of at most PIECE bytes, so that memory stays
    bounded whatever the compression ratio (bombs, zero-filled files).
    """

    member_start: int  # blob offset of the member being decoded (the last one begun)

    def feed(self, data: bytes) -> Iterator[bytes]: ...

    def at_member_end(self) -> bool: ...


class TruncatedError(ValueError):
    """The input ended inside a member."""


def decode_all(stream: Stream, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Everything `chunks` decode to through `stream`, in pieces of at most PIECE bytes:
    ValueError on corrupt input, TruncatedError on input that ends inside a member."""
    for chunk in chunks:
        yield from stream.feed(chunk)
    if not stream.at_member_end():
        raise TruncatedError(f"the stream ends inside the member at offset {stream.member_start}")


class Decompressor(Protocol):
    """Reads a format: which footer it has, how its TOC is stored, how members decode."""

    name: str
    footer_size: int

    def parse_footer(self, tail: bytes, blob_size: int) -> Footer:
        """Raise ValueError when tail does not end with this format's footer."""
        ...

    def parse_toc(self, raw: bytes, footer: Footer) -> bytes:
        """The TOC JSON bytes from the stored TOC bytes; ValueError when malformed or too big."""
        ...

    def stream(self, start: int = 0) -> Stream:
        """A stream whose first fed byte lies at blob offset start."""
        ...
