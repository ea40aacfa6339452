"""zstd:chunked as containers/storage writes it: the flavour podman and CRI-O pull partially.

The facts come from reading c/storage's pkg/chunked (compressor/, internal/minimal) and
vbatts/tar-split; the code is ours. The blob is the layer's tar cut into zstd frames:
tar headers and padding in frames of their own, each chunk of a file's content in its
own frame. After them come three skippable frames: the zstd-compressed TOC, the
zstd-compressed tar-split (which lets c/storage rebuild the exact tar, so DiffIDs stay
true), and a 64-byte footer. Chunks follow c/storage's rule (a bup-style rolling sum
over 64 bytes, a cut where its low 16 bits are all ones; runs of 1 KiB or more zeros
are chunks of their own, typed `zeros`), so unchanged parts of an edited file keep
their chunk digests and dedup against any local layer. Unlike c/storage, no chunk
exceeds MAX_CHUNK, so memory stays bounded whatever the file holds.
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anycrc  # type: ignore[import-untyped]
import zstandard

from estargz_opt.digest import sha256_digest
from estargz_opt.errors import BadInputError
from estargz_opt.format import tarfmt
from estargz_opt.format.tarfmt import TarEntry

# Constants of the format (they move to the constants module later).
MANIFEST_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
MANIFEST_POSITION = "io.github.containers.zstd-chunked.manifest-position"
TARSPLIT_POSITION = "io.github.containers.zstd-chunked.tarsplit-position"
FOOTER_MAGIC = b"GNUlInUx"
FOOTER_SIZE = 64
MANIFEST_TYPE_CRFS = 1
TOC_VERSION = 1
CHUNK_TYPE_ZEROS = "zeros"
#: level 7 makes layers within 0.5% of skopeo's zstd:chunked (c/storage's encoder at its
#: level 10) in well under half its time; 9 saves 0.5% more for 15% more CPU
#: (bench/bench_zchunked.py)
DEFAULT_LEVEL = 7
HOLE_MIN = 1024  # a run of at least this many zero bytes is a `zeros` chunk
MAX_CHUNK = 8 << 20  # our bound on one chunk (c/storage has none)
TYPE_NAMES = {
    tarfmt.REG: "reg",
    tarfmt.LINK: "hardlink",
    tarfmt.CHAR: "char",
    tarfmt.BLOCKDEV: "block",
    tarfmt.DIR: "dir",
    tarfmt.FIFO: "fifo",
    tarfmt.SYMLINK: "symlink",
}
#: the TOC fields c/storage compares with each tar-split header
HEADER_FIELDS = (
    "type",
    "name",
    "linkName",
    "mode",
    "size",
    "uid",
    "gid",
    "modtime",
    "accesstime",
    "changetime",
    "devMajor",
    "devMinor",
    "xattrs",
)
_WINDOW = 64
_CHAR_OFFSET = 31
_SPLIT_MASK = 0xFFFF
SKIPPABLE_HEADER = struct.Struct("<II")
SKIPPABLE_MAGIC = 0x184D2A50
_FOOTER = struct.Struct("<7Q8s")
_CRC64 = anycrc.Model("CRC64-GO-ISO")  # tar-split's file checksum (Go's crc64 ISO table)
_NONZERO = re.compile(rb"[^\x00]")
_ZEROS = bytes(HOLE_MIN)
_TARSPLIT_FILE, _TARSPLIT_SEGMENT = 1, 2


def skippable_frame(payload: bytes) -> bytes:
    return SKIPPABLE_HEADER.pack(SKIPPABLE_MAGIC, len(payload)) + payload


@dataclass(frozen=True, slots=True)
class FooterData:
    toc_offset: int
    toc_size: int
    toc_plain_size: int
    manifest_type: int
    tarsplit_offset: int
    tarsplit_size: int
    tarsplit_plain_size: int

    def to_bytes(self) -> bytes:
        return _FOOTER.pack(
            self.toc_offset,
            self.toc_size,
            self.toc_plain_size,
            self.manifest_type,
            self.tarsplit_offset,
            self.tarsplit_size,
            self.tarsplit_plain_size,
            FOOTER_MAGIC,
        )

    @classmethod
    def parse(cls, tail: bytes) -> FooterData:
        if len(tail) < FOOTER_SIZE or tail[-8:] != FOOTER_MAGIC:
            raise ValueError("not a containers zstd:chunked footer")
        *nums, _magic = _FOOTER.unpack(tail[-FOOTER_SIZE:])
        return cls(*nums)

    def manifest_position(self) -> str:
        return f"{self.toc_offset}:{self.toc_size}:{self.toc_plain_size}:{self.manifest_type}"

    def tarsplit_position(self) -> str:
        return f"{self.tarsplit_offset}:{self.tarsplit_size}:{self.tarsplit_plain_size}"


# ----------------------------------------------------------------------------- chunking


@dataclass(slots=True)
class Piece:
    """Content classified by the chunker: data (cut after it when `cut`) or a run of zeros."""

    data: bytes
    zeros: bool = False
    cut: bool = False


class Chunker:
    """c/storage's chunk boundaries for one file's content, fed in pieces of any size.

    The rolling sum (s1: window sum plus 64*31; s2: running sum of s1 minus 64*(dropped
    byte + 31)) is computed for a whole piece at once with numpy cumulative sums; only
    s2 matters for the cut test. Zero runs are rolled too, but never cut in.
    """

    def __init__(self) -> None:
        self._window = bytes(_WINDOW)
        self._s2 = (_WINDOW * (_WINDOW - 1) * _CHAR_OFFSET) & _SPLIT_MASK
        self._zeros = 0  # zeros at the end of what was fed, not yet classified
        self._open = 0  # bytes in the current chunk so far

    def feed(self, data: bytes) -> Iterator[Piece]:
        pos = 0
        if self._zeros:
            m = _NONZERO.search(data)
            if m is None:
                self._zeros += len(data)
                return
            yield from self._flush_zeros(m.start())
            pos = m.start()
        while pos < len(data):
            hole = data.find(_ZEROS, pos)
            if hole < 0:
                stripped = data[pos:].rstrip(b"\x00")
                if stripped:
                    yield from self._data(stripped)
                self._zeros = len(data) - pos - len(stripped)
                return
            if hole > pos:
                yield from self._data(data[pos:hole])
            m = _NONZERO.search(data, hole)
            if m is None:
                self._zeros = len(data) - hole
                return
            yield from self._hole(m.start() - hole)
            pos = m.start()

    def finish(self) -> Iterator[Piece]:
        yield from self._flush_zeros(0)

    def _flush_zeros(self, extra: int) -> Iterator[Piece]:
        run, self._zeros = self._zeros + extra, 0
        if run >= HOLE_MIN:
            yield from self._hole(run)
        elif run:
            yield from self._data(bytes(run))

    def _hole(self, length: int) -> Iterator[Piece]:
        if self._open:
            yield Piece(b"", cut=True)
            self._open = 0
        self._roll(bytes(min(length, _WINDOW)))  # past 64 zeros the sum no longer changes
        while length:
            n = min(length, MAX_CHUNK)
            length -= n
            yield Piece(bytes(n), zeros=True, cut=True)

    def _data(self, data: bytes) -> Iterator[Piece]:
        cuts = self._roll(data)
        bounds = [(c, True) for c in cuts]
        if not cuts or cuts[-1] != len(data):
            bounds.append((len(data), False))
        start = 0
        for end, cut in bounds:
            while end - start + self._open > MAX_CHUNK:
                n = MAX_CHUNK - self._open
                yield Piece(data[start : start + n], cut=True)
                start += n
                self._open = 0
            if end > start:
                yield Piece(data[start:end], cut=cut)
                self._open = 0 if cut else self._open + end - start
                start = end

    def _roll(self, data: bytes) -> list[int]:
        """Roll data through the sum; the offsets just after each byte where a cut falls.

        Only s2's low 16 bits decide a cut, so the arithmetic is done modulo 2**16
        (uint16 arrays: half the memory traffic of 32-bit sums, the same cuts).
        """
        import numpy as np  # here, not at the top: it would add ~60 ms to every CLI start

        n = len(data)
        ext = np.frombuffer(self._window + data, dtype=np.uint8)
        prefix = np.empty(len(ext) + 1, dtype=np.uint16)
        prefix[0] = 0
        np.cumsum(ext, dtype=np.uint16, out=prefix[1:])
        step = prefix[_WINDOW + 1 :] - prefix[1 : n + 1]  # the window's sum after each byte
        step -= ext[:n].astype(np.uint16) * np.uint16(_WINDOW)  # minus 64 * the byte dropped
        s2 = np.cumsum(step, dtype=np.uint16)
        s2 += np.uint16(self._s2)
        self._s2 = int(s2[-1])
        self._window = (self._window + data)[-_WINDOW:]
        return [int(i) + 1 for i in np.flatnonzero(s2 == np.uint16(_SPLIT_MASK))]


# ----------------------------------------------------------------------------- tar-split


class TarSplitWriter:
    """vbatts/tar-split's JSON records (segments of raw tar bytes, file records with their
    CRC-64), zstd-compressed as they are made."""

    def __init__(self, level: int) -> None:
        self._z = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj()
        self._out: list[bytes] = []
        self._segment = bytearray()
        self._position = 0
        self.plain_size = 0

    def segment(self, raw: bytes) -> None:
        self._segment += raw

    def file(self, name: str, size: int, crc: int | None) -> None:
        self._flush_segment()
        payload = None if crc is None else base64.b64encode(crc.to_bytes(8, "big")).decode()
        self._record({"type": _TARSPLIT_FILE, "name": name, "size": size, "payload": payload})

    def _flush_segment(self) -> None:
        if self._segment:
            payload = base64.b64encode(bytes(self._segment)).decode()
            self._segment.clear()
            self._record({"type": _TARSPLIT_SEGMENT, "payload": payload})

    def _record(self, rec: dict[str, Any]) -> None:
        if not rec.get("size"):
            rec.pop("size", None)
        rec["position"] = self._position
        self._position += 1
        line = json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        self.plain_size += len(line)
        self._out.append(self._z.compress(line))

    def finish(self) -> bytes:
        self._flush_segment()
        self._out.append(self._z.flush())
        return b"".join(self._out)


def crc64(data: bytes, crc: int | None = None) -> int:
    return int(_CRC64.calc(data) if crc is None else _CRC64.calc(data, crc))


# ----------------------------------------------------------------------------- TOC entries


def go_time(sec: int, nsec: int) -> str:
    """Go's time.Time JSON form (RFC 3339, nanoseconds without trailing zeros) in UTC."""
    try:
        t = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=sec)
    except OverflowError:
        raise BadInputError(f"time {sec} lies outside the years 1-9999") from None
    text = t.strftime("%Y-%m-%dT%H:%M:%S")
    if nsec:
        text += f".{nsec:09d}".rstrip("0")
    return text + "Z"


def header_metadata(e: TarEntry) -> dict[str, Any]:
    """The TOC fields c/storage derives from a tar header (Go's reader's view of it), in
    c/storage's field order, zero values left out."""
    try:
        e.name.encode()
        e.linkname.encode()
    except UnicodeEncodeError:
        raise BadInputError(
            f"entry name {tarfmt.encode(e.name)!r} is not UTF-8: a zstd:chunked TOC cannot hold it"
        ) from None
    meta: dict[str, Any] = {"type": TYPE_NAMES[e.typeflag], "name": e.name}
    fields: list[tuple[str, Any]] = [
        ("linkName", e.linkname),
        ("mode", e.mode),
        ("size", e.size),
        ("uid", e.uid),
        ("gid", e.gid),
        ("modtime", go_time(e.mtime, e.mtime_nsec)),
        ("accesstime", go_time(*e.atime) if e.atime else None),
        ("changetime", go_time(*e.ctime) if e.ctime else None),
        ("devMajor", e.devmajor),
        ("devMinor", e.devminor),
        ("xattrs", {k: base64.b64encode(v).decode() for k, v in e.xattrs.items()}),
    ]
    meta.update((k, v) for k, v in fields if v)
    return meta


def reparse(header: bytes) -> TarEntry:
    """The entry Go's tar reader makes of header blocks we wrote (what c/storage compares)."""
    for entry in tarfmt.iter_entries(io.BytesIO(header), None):
        return entry
    raise AssertionError("an encoded header parses to an entry")


@dataclass(slots=True)
class ChunkRef:
    member: int  # index of the zstd frame holding the chunk
    chunk_offset: int
    size: int
    zeros: bool


@dataclass(slots=True)
class PendingEntry:
    """A TOC entry whose blob offsets are known once every frame is written."""

    meta: dict[str, Any]
    chunks: list[ChunkRef] = field(default_factory=list)
    digest: str = ""

    def resolve(self, offsets: list[int], digests: dict[int, str]) -> list[dict[str, Any]]:
        """The entry and its chunk entries, given each frame's offset and each chunk
        frame's digest (by frame index)."""
        if not self.chunks:
            return [self.meta]
        main = dict(self.meta)
        main["digest"] = self.digest
        main["offset"] = offsets[self.chunks[0].member]
        main["endOffset"] = offsets[self.chunks[-1].member + 1]
        if len(self.chunks) == 1:
            return [main]
        out = [main]
        for i, c in enumerate(self.chunks):
            ent = main if i == 0 else {"type": "chunk", "name": main["name"]}
            ent["offset"] = offsets[c.member]
            ent["chunkSize"] = c.size
            if i:
                ent["chunkOffset"] = c.chunk_offset
            ent["chunkDigest"] = digests[c.member]
            if c.zeros:
                ent["chunkType"] = CHUNK_TYPE_ZEROS
            if i:
                out.append(ent)
        return out


def toc_json(entries: list[dict[str, Any]], tarsplit_digest: str) -> bytes:
    toc = {"version": TOC_VERSION, "entries": entries, "tarSplitDigest": tarsplit_digest}
    return json.dumps(toc, separators=(",", ":"), ensure_ascii=False).encode()


def tail_frames(
    payload_size: int,
    toc_compressed: bytes,
    toc_plain_size: int,
    tarsplit: bytes,
    tarsplit_plain: int,
) -> tuple[bytes, dict[str, str]]:
    """The TOC, tar-split and footer frames after payload_size bytes, and the annotations."""
    toc_offset = payload_size + SKIPPABLE_HEADER.size
    tarsplit_offset = toc_offset + len(toc_compressed) + SKIPPABLE_HEADER.size
    footer = FooterData(
        toc_offset,
        len(toc_compressed),
        toc_plain_size,
        MANIFEST_TYPE_CRFS,
        tarsplit_offset,
        len(tarsplit),
        tarsplit_plain,
    )
    blob_tail = (
        skippable_frame(toc_compressed)
        + skippable_frame(tarsplit)
        + skippable_frame(footer.to_bytes())
    )
    return blob_tail, {
        MANIFEST_CHECKSUM: sha256_digest(toc_compressed),
        MANIFEST_POSITION: footer.manifest_position(),
        TARSPLIT_POSITION: footer.tarsplit_position(),
    }
