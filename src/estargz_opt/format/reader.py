"""Opening a converted layer: find its footer, load and check its TOC, verify every chunk.

Verification is what a lazy puller does at read time, done up front: each chunk is
decompressed from its TOC offset and hashed, so a lying TOC or a flipped byte is named
(entry and offset) before the image is pushed.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

from estargz_opt.digest import digest_of, hasher, sha256_digest
from estargz_opt.errors import BadInputError, VerificationError
from estargz_opt.format import tarfmt
from estargz_opt.format.codec import Decompressor, Footer
from estargz_opt.format.estargz import GzipDecompressor, LegacyGzipDecompressor
from estargz_opt.format.externaltoc import ExternalTOCDecompressor
from estargz_opt.format.toc import LANDMARKS, TOC, TOC_TAR_NAME, parse_toc, toc_digest
from estargz_opt.format.zstdchunked import ZstdDecompressor

DECOMPRESSORS: tuple[Decompressor, ...] = (
    GzipDecompressor(),
    LegacyGzipDecompressor(),
    ZstdDecompressor(),
    ExternalTOCDecompressor(),
)
_STEP = 1 << 20


class MissingExternalTOCError(VerificationError):
    """The blob is an external-TOC layer and its TOC was not supplied."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Where one chunk's bytes live: the member at offset, inner_offset bytes into it."""

    name: str
    offset: int
    inner_offset: int
    length: int
    digest: str


class Layer:
    """An open eStargz or zstd:chunked blob with a parsed TOC."""

    def __init__(
        self, f: BinaryIO, size: int, footer: Footer, codec: Decompressor, toc_json: bytes
    ) -> None:
        self._f = f
        self.size = size
        self.footer = footer
        self.codec = codec
        self.toc_json = toc_json
        self.toc: TOC = parse_toc(toc_json)
        self.toc_digest = toc_digest(toc_json)

    @property
    def format(self) -> str:
        return self.codec.name

    def __enter__(self) -> Layer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    # ------------------------------------------------------------------- chunks

    def chunks(self) -> list[Chunk]:
        """Every payload piece the TOC points at, with its length derived like upstream's reader."""
        out: list[Chunk] = []
        size_of: dict[str, int] = {}
        for i, e in enumerate(self.toc.entries):
            if e.type == "reg":
                size_of[e.name] = e.size
                if e.size == 0:
                    continue
            elif e.type != "chunk":
                continue
            total = size_of.get(e.name)
            if total is None:
                raise VerificationError(f"TOC entry {i} ({e.name!r}) is a chunk of no file")
            length = e.chunk_size or total - e.chunk_offset
            if length <= 0 or e.chunk_offset + length > total:
                raise VerificationError(
                    f"TOC entry {i} ({e.name!r}) has chunk {e.chunk_offset}+{length} "
                    f"outside its {total}-byte file"
                )
            if e.offset >= self.footer.payload_size:
                raise VerificationError(
                    f"TOC entry {e.name!r} points at offset {e.offset}, "
                    f"beyond the payload ({self.footer.payload_size} bytes)"
                )
            if not e.chunk_digest:
                raise VerificationError(
                    f"TOC entry {e.name!r} at offset {e.offset} has no chunkDigest"
                )
            out.append(Chunk(e.name, e.offset, e.inner_offset, length, e.chunk_digest))
        return out

    def verify(self, expected_toc_digest: str | None = None, workers: int | None = None) -> None:
        """Check the TOC digest, then every chunk's sha256; raise on the first failure."""
        if expected_toc_digest and expected_toc_digest != self.toc_digest:
            raise VerificationError(
                f"TOC digest {self.toc_digest} does not match the expected {expected_toc_digest}"
            )
        for i, e in enumerate(self.toc.entries):
            one_chunk = e.type == "reg" and e.size and e.chunk_size in (0, e.size)
            if one_chunk and e.digest and e.chunk_digest and e.digest != e.chunk_digest:
                raise VerificationError(
                    f"TOC entry {i} ({e.name!r}) has digest != chunkDigest for a one-chunk file"
                )
        groups: dict[int, list[Chunk]] = {}
        for c in self.chunks():
            groups.setdefault(c.offset, []).append(c)
        starts = sorted(groups)
        ends = {
            o: (starts[i + 1] if i + 1 < len(starts) else self.footer.payload_size)
            for i, o in enumerate(starts)
        }
        workers = workers or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[Future[str | None]] = deque()
            for o in starts:  # bounded submission keeps memory flat on huge layers
                pending.append(pool.submit(self._check_group, o, ends[o], groups.pop(o)))
                if len(pending) >= 4 * workers and (error := pending.popleft().result()):
                    raise VerificationError(error)
            for future in pending:
                if error := future.result():
                    raise VerificationError(error)

    def _check_group(self, start: int, end: int, chunks: list[Chunk]) -> str | None:
        need = max(c.inner_offset + c.length for c in chunks)
        try:
            data = self._decompress_from(start, end, need)
        except ValueError as exc:
            return f"entry {chunks[0].name!r} at offset {start}: {exc}"
        for c in chunks:
            piece = data[c.inner_offset : c.inner_offset + c.length]
            if len(piece) < c.length:
                return (
                    f"entry {c.name!r} at offset {c.offset}: data ends after {len(piece)} of "
                    f"{c.length} bytes"
                )
            got = sha256_digest(piece)
            if got != c.digest:
                return (
                    f"entry {c.name!r} at offset {c.offset} (inner offset {c.inner_offset}): "
                    f"chunk digest {got} != {c.digest}"
                )
        return None

    def _decompress_from(self, start: int, end: int, need: int) -> bytes:
        stream = self.codec.stream()
        out = bytearray()
        pos = start
        limit = self.footer.payload_size
        fd = self._f.fileno()
        while len(out) < need and pos < limit:
            step = end - pos if pos < end else _STEP
            data = os.pread(fd, min(step, limit - pos), pos)
            if not data:
                break
            pos += len(data)
            out += stream.feed(data)
        return bytes(out)

    # ------------------------------------------------------------------- tar

    def write_tar(self, out: BinaryIO) -> None:
        """The layer's files as a plain tar: landmarks and the TOC dropped, EOF blocks added."""
        with tempfile.TemporaryFile(prefix="estargz-opt-") as tmp:
            size = self._decompress_payload(tmp)
            for e in self._payload_entries(tmp, size):
                if (
                    tarfmt.clean_name(e.name) in LANDMARKS
                    or tarfmt.clean_name(e.name) == TOC_TAR_NAME
                ):
                    continue
                end = e.data_offset + e.data_size + len(tarfmt.padding(e.data_size))
                tmp.seek(e.header_offset)
                remaining = end - e.header_offset
                while remaining:
                    block = tmp.read(min(remaining, _STEP))
                    out.write(block)
                    remaining -= len(block)
            out.write(tarfmt.EOF_BLOCKS)

    def _decompress_payload(self, dst: BinaryIO) -> int:
        total = 0
        for plain in self._decompressed(self.footer.payload_size):
            dst.write(plain)
            total += len(plain)
        return total

    def diff_id(self) -> tuple[str, int]:
        """sha256 and length of the whole blob decompressed: the DiffID containerd computes."""
        h = hasher()
        total = 0
        for plain in self._decompressed(self.size):
            h.update(plain)
            total += len(plain)
        return digest_of(h), total

    def read_at(self, offset: int, size: int) -> bytes:
        return os.pread(self._f.fileno(), size, offset)

    def _decompressed(self, end: int) -> Iterator[bytes]:
        """The members in blob bytes [0, end), decompressed in order."""
        stream = self.codec.stream()
        for pos in range(0, end, _STEP):
            try:
                yield stream.feed(self.read_at(pos, min(_STEP, end - pos)))
            except ValueError as exc:
                raise VerificationError(f"blob near offset {pos}: {exc}") from None
        if not stream.at_member_end():
            raise VerificationError("blob ends inside a compressed member")

    @staticmethod
    def _payload_entries(f: BinaryIO, size: int) -> Iterator[tarfmt.TarEntry]:
        try:
            yield from tarfmt.iter_entries(f, size)
        except BadInputError as exc:
            raise VerificationError(f"payload tar: {exc}") from None


def open_layer(
    path: str | os.PathLike[str],
    toc_digest: str | None = None,
    external_toc: bytes | None = None,
) -> Layer:
    """Open a converted blob; with toc_digest, refuse a TOC whose digest differs."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - owned by the Layer
    except OSError as exc:
        raise BadInputError(f"cannot read {os.fspath(path)}: {exc.strerror}") from None
    try:
        layer = _open(f, external_toc)
        if toc_digest and toc_digest != layer.toc_digest:
            raise VerificationError(
                f"TOC digest {layer.toc_digest} does not match the expected {toc_digest}"
            )
        return layer
    except BaseException:
        f.close()
        raise


def _open(f: BinaryIO, external_toc: bytes | None) -> Layer:
    size = os.fstat(f.fileno()).st_size
    tail_size = min(size, max(d.footer_size for d in DECOMPRESSORS))
    tail = os.pread(f.fileno(), tail_size, size - tail_size)
    errors = []
    for codec in DECOMPRESSORS:
        try:
            footer = codec.parse_footer(tail, size)
        except (ValueError, IndexError, struct.error) as exc:
            errors.append(f"{codec.name}: {exc}")
            continue
        if footer.toc_offset is None:
            if external_toc is None:
                raise MissingExternalTOCError(
                    "the layer keeps its TOC outside the blob (external TOC); supply it"
                )
            raw = external_toc
        else:
            raw = os.pread(f.fileno(), footer.toc_size, footer.toc_offset)
        try:
            toc_json = codec.parse_toc(raw)
        except ValueError as exc:
            raise VerificationError(
                f"{codec.name} TOC at offset {footer.toc_offset}: {exc}"
            ) from None
        try:
            return Layer(f, size, footer, codec, toc_json)
        except BadInputError as exc:
            raise VerificationError(str(exc)) from None
    raise VerificationError(
        "not an eStargz or zstd:chunked layer: no known footer (" + "; ".join(errors) + ")"
    )
