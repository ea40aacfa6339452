"""Opening a converted layer: find its footer, load and check its TOC, verify every chunk.

Verification is what both kinds of pull do, done up front. A lazy puller decompresses
each chunk from its TOC offset and hashes it; a full pull (overlayfs, Podman, containerd's
default) reads every member in order, headers-only members too. Both are checked, so a
lying TOC or a flipped byte anywhere is named (entry and offset) before the image is
pushed. Decompression never hands out more than a fixed piece, whatever the ratio.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

from estargz_opt.constants import LANDMARKS, TOC_TAR_NAME
from estargz_opt.digest import digest_of, hasher
from estargz_opt.errors import BadInputError, MissingExternalTOCError, VerificationError
from estargz_opt.format import tarfmt
from estargz_opt.format.codec import Decompressor, Footer, Stream, TruncatedError, decode_all
from estargz_opt.format.estargz import GzipDecompressor, LegacyGzipDecompressor
from estargz_opt.format.externaltoc import ExternalTOCDecompressor
from estargz_opt.format.toc import (
    TOC,
    TOCEntry,
    as_decoded,
    parse_toc,
    toc_digest,
)
from estargz_opt.format.zstdchunked import ZstdDecompressor

DECOMPRESSORS: tuple[Decompressor, ...] = (
    GzipDecompressor(),
    LegacyGzipDecompressor(),
    ZstdDecompressor(),
    ExternalTOCDecompressor(),
)
_STEP = 1 << 20


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

    def verify(
        self,
        expected_toc_digest: str | None = None,
        workers: int | None = None,
        expected_diff_id: str | None = None,
    ) -> PayloadCheck:
        """Check what a lazy pull reads, then what a full pull reads; raise on the first failure.

        First the TOC digest and every chunk's sha256 from its TOC offset (the lazy path),
        then one pass over every member in blob order: each payload entry against its TOC
        entry and chunk digests, and the DiffID (the full-pull path).
        """
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
        check = self._full_pass(None)
        if expected_diff_id and expected_diff_id != check.diff_id:
            raise VerificationError(
                f"DiffID {check.diff_id} does not match the expected {expected_diff_id}"
            )
        return check

    def _check_group(self, start: int, end: int, chunks: list[Chunk]) -> str | None:
        """Hash the chunks of the member at start as it inflates, no further than they reach."""
        need = max(c.inner_offset + c.length for c in chunks)
        hashers = [hasher() for _ in chunks]
        pos = 0
        try:
            for piece in self._plain_from(start, end):
                view = memoryview(piece)
                for c, h in zip(chunks, hashers, strict=True):
                    lo = max(c.inner_offset, pos)
                    hi = min(c.inner_offset + c.length, pos + len(piece))
                    if lo < hi:
                        h.update(view[lo - pos : hi - pos])
                pos += len(piece)
                if pos >= need:
                    break
        except ValueError as exc:
            return f"entry {chunks[0].name!r} at offset {start}: {exc}"
        for c, h in zip(chunks, hashers, strict=True):
            if pos < c.inner_offset + c.length:
                return (
                    f"entry {c.name!r} at offset {c.offset}: data ends after "
                    f"{max(0, pos - c.inner_offset)} of {c.length} bytes"
                )
            got = digest_of(h)
            if got != c.digest:
                return (
                    f"entry {c.name!r} at offset {c.offset} (inner offset {c.inner_offset}): "
                    f"chunk digest {got} != {c.digest}"
                )
        return None

    def _plain_from(self, start: int, end: int) -> Iterator[bytes]:
        """Plain bytes of the members from blob offset start on, first reading up to end."""
        stream = self.codec.stream(start)
        pos = start
        limit = self.footer.payload_size
        fd = self._f.fileno()
        while pos < limit:
            step = end - pos if pos < end else _STEP
            data = os.pread(fd, min(step, _STEP, limit - pos), pos)
            if not data:
                return
            pos += len(data)
            yield from stream.feed(data)

    # ------------------------------------------------------------------- tar

    def write_tar(self, out: BinaryIO) -> None:
        """The layer's files as a plain tar: landmarks and the TOC dropped, EOF blocks added.

        Written while the blob is read once, with every entry and chunk checked against
        the TOC on the way (what the tar holds is what a lazy pull would show).
        """
        self._full_pass(out)
        out.write(tarfmt.EOF_BLOCKS)

    def _full_pass(self, sink: BinaryIO | None) -> PayloadCheck:
        """Read every member in blob order as a full pull does, checking it against the TOC.

        Memory stays bounded: the tar is parsed from the decompressed stream as it flows,
        content is hashed (and copied to sink, without landmarks and the TOC) piece by piece.
        """
        diff = hasher()
        stream = self.codec.stream(0)

        def pieces() -> Iterator[bytes]:
            for piece in self._decompressed(self.size, stream):
                diff.update(piece)
                yield piece

        plain = _PlainStream(pieces(), keep=sink is not None)
        files = iter(_toc_files(self.toc))
        keep = False  # whether the entry before this one goes to sink
        end = 0  # plain offset where the last entry (with its padding) ends
        entries = tarfmt.iter_entries(plain, None)
        while True:
            try:
                e = next(entries, None)
            except BadInputError as exc:
                raise VerificationError(
                    f"payload tar (member at offset {stream.member_start}): {exc}"
                ) from None
            if e is None:
                break
            plain.settle(e.header_offset, sink if keep else None)
            name = tarfmt.clean_name(e.name)
            want = next(files, None)
            if want is None:
                if name != TOC_TAR_NAME or self.footer.toc_offset is None:
                    raise VerificationError(
                        f"payload entry {e.name!r} (member at offset {stream.member_start}) "
                        "is not in the TOC"
                    )
                self._check_toc_entry(plain, e, stream)
                keep = False
            else:
                _compare_entry(e, want[0], stream.member_start)
                keep = name not in LANDMARKS
                plain.settle(e.data_offset, sink if keep else None)
                self._check_content(plain, e, want, stream, sink if keep else None)
            end = e.data_offset + e.data_size + len(tarfmt.padding(e.data_size))
        missing = next(files, None)
        if missing is not None:
            raise VerificationError(f"TOC entry {missing[0].name!r} is not in the payload")
        plain.settle(end, sink if keep else None)
        trailing = plain.drain(_MAX_TRAILING)
        if trailing > _MAX_TRAILING:
            raise VerificationError(
                f"more than {_MAX_TRAILING} bytes follow the tar's end (member at offset "
                f"{stream.member_start})"
            )
        return PayloadCheck(diff_id=digest_of(diff), uncompressed_size=plain.pos)

    def _check_content(
        self,
        plain: _PlainStream,
        e: tarfmt.TarEntry,
        want: tuple[TOCEntry, list[TOCEntry]],
        stream: Stream,
        sink: BinaryIO | None,
    ) -> None:
        """Hash a regular file's content chunk by chunk against the TOC's chunk digests."""
        if e.typeflag != tarfmt.REG or not e.size:
            return
        covered = 0
        for c in want[1]:
            length = c.chunk_size or e.size - c.chunk_offset
            if c.chunk_offset != covered or length <= 0 or covered + length > e.size:
                raise VerificationError(
                    f"TOC chunks of {e.name!r} do not tile its {e.size} bytes "
                    f"(a chunk at {c.chunk_offset}+{length})"
                )
            h = hasher()
            left = length
            while left:
                data = plain.read(min(left, _STEP))
                if not data:
                    raise VerificationError(
                        f"payload tar (member at offset {stream.member_start}): "
                        f"truncated tar: content of {e.name!r} ends early"
                    )
                h.update(data)
                plain.settle(plain.pos, sink)
                left -= len(data)
            got = digest_of(h)
            if got != c.chunk_digest:
                raise VerificationError(
                    f"entry {e.name!r} at file offset {c.chunk_offset} (member at offset "
                    f"{stream.member_start}): payload chunk digest {got} != TOC {c.chunk_digest}"
                )
            covered += length
        if covered != e.size:
            raise VerificationError(f"TOC chunks of {e.name!r} cover {covered} of {e.size} bytes")

    def _check_toc_entry(self, plain: _PlainStream, e: tarfmt.TarEntry, stream: Stream) -> None:
        """The TOC's own tar entry, after the payload: it must hold the TOC that was parsed."""
        h = hasher()
        left = e.size
        while left and (data := plain.read(min(left, _STEP))):
            h.update(data)
            left -= len(data)
        plain.settle(plain.pos, None)
        if digest_of(h) != self.toc_digest:
            raise VerificationError(
                f"the TOC entry in the member at offset {stream.member_start} is not the TOC read"
            )

    def read_at(self, offset: int, size: int) -> bytes:
        return os.pread(self._f.fileno(), size, offset)

    def _decompressed(self, end: int, stream: Stream) -> Iterator[bytes]:
        """The members in blob bytes [0, end), decompressed in order, in bounded pieces."""
        reads = (self.read_at(pos, min(_STEP, end - pos)) for pos in range(0, end, _STEP))
        try:
            yield from decode_all(stream, reads)
        except TruncatedError:
            raise VerificationError(
                f"blob ends inside the compressed member at offset {stream.member_start}"
            ) from None
        except ValueError as exc:
            raise VerificationError(f"member at offset {stream.member_start}: {exc}") from None


@dataclass(frozen=True, slots=True)
class PayloadCheck:
    """What one full pass over the blob measured."""

    diff_id: str
    uncompressed_size: int


_MAX_TRAILING = 1 << 20  # plain bytes allowed after the tar's end (zero padding, say)


def _toc_files(toc: TOC) -> Iterator[tuple[TOCEntry, list[TOCEntry]]]:
    """Each non-chunk TOC entry with its chunks (the entry itself first, for a regular file)."""
    current: tuple[TOCEntry, list[TOCEntry]] | None = None
    for e in toc.entries:
        if e.type == "chunk" and current is not None and current[0].name == e.name:
            current[1].append(e)
            continue
        if current is not None:
            yield current
        if e.type == "chunk":
            raise VerificationError(f"TOC chunk entry {e.name!r} follows no file of that name")
        current = (e, [e] if e.type == "reg" and e.size else [])
    if current is not None:
        yield current


def _compare_entry(e: tarfmt.TarEntry, t: TOCEntry, member: int) -> None:
    """A payload tar header against its TOC entry: what a full and a lazy pull would each see."""
    where = f"payload entry {e.name!r} (member at offset {member})"
    if tarfmt.clean_name(as_decoded(e.name)) != tarfmt.clean_name(t.name):
        raise VerificationError(f"{where} is {t.name!r} in the TOC")
    kind = tarfmt.TYPE_NAMES.get(e.typeflag, e.typeflag)
    checks: list[tuple[str, object, object]] = [
        ("type", kind, t.type),
        ("mode", e.mode, t.mode),
        ("uid", e.uid, t.uid),
        ("gid", e.gid, t.gid),
    ]
    if e.typeflag == tarfmt.REG:
        checks.append(("size", e.size, t.size))
    elif e.typeflag == tarfmt.SYMLINK:
        checks.append(("link name", as_decoded(e.linkname), t.link_name))
    elif e.typeflag == tarfmt.LINK:
        link = tarfmt.clean_name(as_decoded(e.linkname))
        checks.append(("link name", link, tarfmt.clean_name(t.link_name)))
    elif e.typeflag in (tarfmt.CHAR, tarfmt.BLOCKDEV):
        checks.append(("device", (e.devmajor, e.devminor), (t.dev_major, t.dev_minor)))
    for what, got, toc_value in checks:
        if got != toc_value:
            raise VerificationError(f"{where} has {what} {got!r}, the TOC says {toc_value!r}")


class _PlainStream:
    """A forward-only file over decompressed pieces, for the tar parser.

    With keep, every byte read waits in pending until settle() sends it to a sink or
    drops it: the consumer decides per entry, once the parser has named it.
    """

    def __init__(self, pieces: Iterator[bytes], keep: bool) -> None:
        self._pieces = pieces
        self._buf = b""
        self._at = 0  # read position in _buf
        self.pos = 0  # plain offset of the next byte
        self._keep = keep
        self._pending: deque[bytes] = deque()
        self._settled = 0  # plain offset where pending starts

    def read(self, n: int, /) -> bytes:
        parts = []
        while n:
            if self._at == len(self._buf):
                piece = next(self._pieces, None)
                if piece is None:
                    break
                self._buf, self._at = piece, 0
            take = self._buf[self._at : self._at + n]
            self._at += len(take)
            n -= len(take)
            parts.append(take)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.pos += len(data)
        if self._keep and data:
            self._pending.append(data)
        return data

    def seek(self, offset: int, /) -> int:
        if offset < self.pos:
            raise ValueError("a plain stream cannot seek back")
        while self.pos < offset and self.read(min(offset - self.pos, _STEP)):
            pass
        return self.pos

    def settle(self, upto: int, sink: BinaryIO | None) -> None:
        """Send the pending bytes before plain offset upto to sink (or drop them)."""
        while self._pending and self._settled < upto:
            head = self._pending.popleft()
            cut = upto - self._settled
            if cut < len(head):
                self._pending.appendleft(head[cut:])
                head = head[:cut]
            if sink is not None:
                sink.write(head)
            self._settled += len(head)
        self._settled = max(self._settled, min(upto, self.pos))

    def drain(self, limit: int) -> int:
        """Read to the end, dropping the bytes; returns how many (stops just past limit)."""
        self._keep = False
        self._pending.clear()
        count = 0
        while count <= limit and (data := self.read(_STEP)):
            count += len(data)
        return count


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
            toc_json = codec.parse_toc(raw, footer)
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
