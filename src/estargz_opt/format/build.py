"""Building a lazily pullable layer: order the entries, cut members, compress, write the TOC.

Member boundaries depend only on the entries and the chunk size, never on the number of
threads, so the output is deterministic; members are compressed in parallel and written
in order while the DiffID, blob digest and TOC are computed in the same pass.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum

from estargz_opt.constants import (
    DEFAULT_CHUNK_SIZE,
    IO_CHUNK,
    LANDMARK_CONTENTS,
    LANDMARKS,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    TOC_TAR_NAME,
    UNCOMPRESSED_SIZE_ANNOTATION,
)
from estargz_opt.digest import digest_of, hasher, sha256_digest
from estargz_opt.errors import BadInputError
from estargz_opt.format import estargz, externaltoc, tarfmt, zchunked, zstdchunked
from estargz_opt.format.codec import Compressor, Output
from estargz_opt.format.source import TarSource
from estargz_opt.format.tarfmt import TarEntry
from estargz_opt.format.toc import (
    TOCEntry,
    TOCWriter,
    format_modtime,
    toc_digest,
)

_BATCH_BYTES = 1 << 20  # members are handed to threads in batches of about this size
_IN_FLIGHT_BYTES = 16 << 20  # bound on uncompressed bytes queued for compression

ProgressFn = Callable[[int, int], None]

#: The version of the bytes this engine writes. Raise it with any change that could give
#: different bytes for the same input and options (tar re-encoding, chunking, TOC
#: fields, footer, compressor settings): the converted-layer cache (estargz_opt.cache)
#: keys on it, so entries written by an older engine are then no longer used.
OUTPUT_VERSION = 1


class ZstdFlavor(StrEnum):
    """Whose zstd:chunked: ctr-remote's (stargz-snapshotter reads it) or containers/storage's
    (podman and CRI-O pull it partially; see estargz_opt.format.zchunked)."""

    STARGZ = "stargz"
    CONTAINERS = "containers"


class Format(StrEnum):
    ESTARGZ = "estargz"
    ZSTDCHUNKED = "zstdchunked"
    EXTERNAL_TOC = "estargz-external-toc"

    @property
    def default_level(self) -> int:
        return zstdchunked.DEFAULT_LEVEL if self is Format.ZSTDCHUNKED else estargz.DEFAULT_LEVEL

    def compressor(self, level: int) -> Compressor:
        if self is Format.ZSTDCHUNKED:
            return zstdchunked.ZstdCompressor(level)
        if self is Format.EXTERNAL_TOC:
            return externaltoc.ExternalTOCCompressor(level)
        return estargz.GzipCompressor(level)


@dataclass(frozen=True, slots=True)
class LayerOptions:
    format: Format = Format.ESTARGZ
    prioritized: Sequence[str] = ()
    compression_level: int | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    min_chunk_size: int = 0
    workers: int | None = None  # threads for compression; never changes the bytes
    zstd_flavor: ZstdFlavor = ZstdFlavor.STARGZ

    @property
    def containers(self) -> bool:
        """Whether this is the containers/storage flavour of zstd:chunked."""
        return self.format is Format.ZSTDCHUNKED and self.zstd_flavor is ZstdFlavor.CONTAINERS

    @property
    def level(self) -> int:
        if self.compression_level is not None:
            return self.compression_level
        return zchunked.DEFAULT_LEVEL if self.containers else self.format.default_level

    def validate(self) -> None:
        if self.zstd_flavor is not ZstdFlavor.STARGZ and self.format is not Format.ZSTDCHUNKED:
            raise BadInputError("a zstd:chunked flavour applies to zstd:chunked only")
        if self.format is Format.ZSTDCHUNKED:
            if not 1 <= self.level <= 22:
                raise BadInputError(f"zstd compression level must be 1-22, got {self.level}")
            if self.min_chunk_size:
                raise BadInputError("min chunk size applies to gzip eStargz only, not zstd:chunked")
        elif not estargz.MIN_LEVEL <= self.level <= estargz.MAX_LEVEL:
            raise BadInputError(
                f"gzip compression level must be -2 to 9 (-1: default, -2: Huffman-only), "
                f"got {self.level}"
            )
        if self.chunk_size <= 0:
            raise BadInputError(f"chunk size must be positive, got {self.chunk_size}")
        if self.min_chunk_size < 0:
            raise BadInputError(f"min chunk size must not be negative, got {self.min_chunk_size}")


@dataclass(frozen=True, slots=True)
class LayerResult:
    digest: str
    size: int
    diff_id: str
    uncompressed_size: int
    toc_digest: str
    annotations: dict[str, str]
    toc_blob: bytes | None = None
    missing_prioritized: list[str] = field(default_factory=list)
    prioritized_entries: int = 0  # entries moved to the front, parent directories included
    prioritized_files: int = 0  # of those, the ones that are not directories
    prefetch_size: int = 0  # blob bytes before the prefetch landmark (what a lazy pull prefetches)

    def summary(self) -> dict[str, object]:
        return {
            "digest": self.digest,
            "size": self.size,
            "diffID": self.diff_id,
            "uncompressedSize": self.uncompressed_size,
            "tocDigest": self.toc_digest,
            "annotations": self.annotations,
        }


# ----------------------------------------------------------------------------- ordering


@dataclass(slots=True)
class _Index:
    entries: list[TarEntry]
    by_name: dict[str, int]


def index_entries(src: TarSource) -> _Index:
    """Every entry in input order; a repeated name keeps the later entry at its position."""
    entries: list[TarEntry | None] = []
    by_name: dict[str, int] = {}
    for e in tarfmt.iter_entries(src.f, src.size):
        _normalize(e)
        name = tarfmt.clean_name(e.name)
        if name in LANDMARKS or name == TOC_TAR_NAME:
            continue
        old = by_name.get(name)
        if old is not None:
            entries[old] = None
        by_name[name] = len(entries)
        entries.append(e)
    kept = [e for e in entries if e is not None]
    return _Index(kept, {tarfmt.clean_name(e.name): i for i, e in enumerate(kept)})


def _normalize(e: TarEntry) -> None:
    """Refuse names that escape the root; make absolute names relative, as containerd does."""
    if e.name.startswith("/"):
        e.name = e.name.lstrip("/") or "./"
    if tarfmt.climbs_out(e.name):
        raise BadInputError(f"entry name {e.name!r} climbs out of the layer root")
    if e.typeflag == tarfmt.LINK:
        if e.linkname.startswith("/"):
            e.linkname = e.linkname.lstrip("/")
        if tarfmt.climbs_out(e.linkname):
            raise BadInputError(f"hardlink {e.name!r} points outside the layer: {e.linkname!r}")


def order_entries(
    index: _Index, prioritized: Sequence[str]
) -> tuple[list[TarEntry | None], list[str], list[TarEntry]]:
    """Upstream's order: prioritized files (parents first, hardlink targets first), landmark, rest.

    Unlike upstream, a parent directory without an entry of its own is skipped (nothing is
    invented, so the layer's tree is unchanged), and a prioritized path missing from the
    layer is reported instead of aborting. Returns (order, missing paths, moved entries).
    """
    moved: set[int] = set()
    front: list[TarEntry] = []

    def take(idx: int) -> None:
        if idx not in moved:
            moved.add(idx)
            front.append(index.entries[idx])

    def take_ancestors(name: str) -> None:
        if name:
            parts = name.split("/")
            for depth in range(len(parts)):  # existing ancestors, root first
                ancestor = index.by_name.get("/".join(parts[:depth]))
                if ancestor is not None:
                    take(ancestor)

    def move(name: str) -> bool:
        """Take name with its ancestors, after the chain of hardlink targets it leads to.

        The chain is followed in a loop, not by recursion, so a long chain works and a
        self-link or a loop is named instead of overflowing the stack.
        """
        chain: list[int] = []
        seen: set[int] = set()
        name = tarfmt.clean_name(name)
        idx = index.by_name.get(name)
        while idx is not None:
            if idx in seen:
                loop = " -> ".join(index.entries[i].name for i in chain) + f" -> {name}"
                raise BadInputError(f"hardlink loop: {loop}")
            seen.add(idx)
            chain.append(idx)
            take_ancestors(name)
            entry = index.entries[idx]
            if entry.typeflag != tarfmt.LINK:
                break
            name = tarfmt.clean_name(entry.linkname)
            idx = index.by_name.get(name)
        for i in reversed(chain):  # the final target first, the prioritized path last
            take(i)
        return bool(chain)

    missing = [p for p in prioritized if not move(p)]
    if front:
        landmark = TarEntry(name=PREFETCH_LANDMARK, typeflag=tarfmt.REG, size=1, data_offset=-1)
        order: list[TarEntry | None] = [*front, landmark]
    else:
        landmark = TarEntry(name=NO_PREFETCH_LANDMARK, typeflag=tarfmt.REG, size=1, data_offset=-1)
        order = [landmark]
    order.extend(e for i, e in enumerate(index.entries) if i not in moved)
    return order, missing, front


# ----------------------------------------------------------------------------- members


class _ParallelMembers:
    """Cuts a member before every chunk; compresses members on a thread pool, writes in order."""

    def __init__(self, comp: Compressor, out: Output, workers: int, progress: ProgressFn | None):
        self._comp = comp
        self._out = out
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compress")
        self._pending: deque[tuple[Future[list[tuple[bytes, str]]], int]] = deque()
        self._in_flight = 0
        self._batch: list[tuple[bytes, int]] = []
        self._batch_bytes = 0
        self._current: list[bytes] = []
        self._lead = 0  # length of the chunk that opens the current member
        self.chunk_digests: dict[int, str] = {}  # member index -> digest of its opening chunk
        self.hashes_chunks = True  # chunk digests are computed on the pool, beside compression
        self._progress = progress
        self.count = 0  # members opened so far; the current one has index count - 1
        self.offsets: list[int] = []
        self.diff = hasher()
        self.usize = 0
        self.blob = hasher()
        self.csize = 0

    def write(self, data: bytes) -> None:
        if data:
            if not self.count:
                self.count = 1
            self.diff.update(data)
            self.usize += len(data)
            self._current.append(data)

    def start_chunk(self, landmark: bool, length: int) -> tuple[int, int]:
        self._cut()
        self.count += 1
        self._lead = length
        return self.count - 1, 0

    def _cut(self) -> None:
        if not self._current:
            return
        member = b"".join(self._current)
        self._current = []
        self._batch.append((member, self._lead))
        self._lead = 0
        self._batch_bytes += len(member)
        if self._batch_bytes >= _BATCH_BYTES:
            self._submit()

    def _submit(self) -> None:
        if not self._batch:
            return
        batch, size = self._batch, self._batch_bytes
        self._batch, self._batch_bytes = [], 0
        compress = self._comp.compress_member

        def work() -> list[tuple[bytes, str]]:
            return [(compress(m), sha256_digest(memoryview(m)[:n]) if n else "") for m, n in batch]

        self._pending.append((self._pool.submit(work), size))
        self._in_flight += size
        while self._in_flight > _IN_FLIGHT_BYTES:
            self._drain_one()

    def _drain_one(self) -> None:
        future, size = self._pending.popleft()
        self._in_flight -= size
        for member, digest in future.result():
            if digest:
                self.chunk_digests[len(self.offsets)] = digest
            self.offsets.append(self.csize)
            self.emit(member)
        if self._progress:
            self._progress(self.usize, self.csize)

    def emit(self, data: bytes) -> None:
        self._out.write(data)
        self.blob.update(data)
        self.csize += len(data)

    def finish(self) -> None:
        self._cut()
        self._submit()
        while self._pending:
            self._drain_one()
        self._pool.shutdown()

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _StreamingMembers(_ParallelMembers):
    """Min-chunk-size mode: a member is kept open until it holds min_size compressed bytes.

    The decision needs the compressed size so far, so compression is sequential here.
    """

    def __init__(
        self,
        comp: estargz.GzipCompressor,
        out: Output,
        min_size: int,
        progress: ProgressFn | None,
    ):
        super().__init__(comp, out, 1, progress)
        self._gz = comp
        self._min = min_size
        self._member: estargz.StreamingMember | None = None
        self._member_start_usize = 0
        self.hashes_chunks = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._member is None:
            self._open()
        self.diff.update(data)
        self.usize += len(data)
        assert self._member is not None
        self._member.write(data)

    def _open(self) -> None:
        self._member = self._gz.streaming_member()
        self._member_start_usize = self.usize
        self.offsets.append(self.csize)
        self.count += 1

    def start_chunk(self, landmark: bool, length: int) -> tuple[int, int]:
        if self._member is None:
            self._open()
            return self.count - 1, 0
        self._member.flush()
        if landmark or self._member.compressed >= self._min:
            self._cut()
            self._open()
            return self.count - 1, 0
        return self.count - 1, self.usize - self._member_start_usize

    def _cut(self) -> None:
        if self._member is not None:
            self.emit(self._member.close())
            self._member = None
            if self._progress:
                self._progress(self.usize, self.csize)

    def finish(self) -> None:
        self._cut()
        self._pool.shutdown()


# ----------------------------------------------------------------------------- the build


class _Names:
    """Upstream writes userName/groupName only when it changes for that id."""

    def __init__(self) -> None:
        self._last: dict[int, str] = {}

    def changed(self, ident: int, name: str) -> str:
        if not name or self._last.get(ident) == name:
            return ""
        self._last[ident] = name
        return name


def build_layer(
    src: TarSource,
    out: Output,
    opts: LayerOptions,
    progress: ProgressFn | None = None,
) -> LayerResult:
    """Write the converted layer for src to out (positioned at 0) and describe it."""
    opts.validate()
    if opts.containers:
        from estargz_opt.format.zchunked_build import build_containers_layer  # needs this module

        return build_containers_layer(src, out, opts, progress)
    order, missing, front = order_entries(index_entries(src), opts.prioritized)
    comp = opts.format.compressor(opts.level)
    workers = opts.workers or os.cpu_count() or 1
    if opts.min_chunk_size and isinstance(comp, estargz.GzipCompressor):
        members: _ParallelMembers = _StreamingMembers(comp, out, opts.min_chunk_size, progress)
    else:
        members = _ParallelMembers(comp, out, workers, progress)
    toc = _TOCStream(members)
    try:
        _write_entries(src, order, members, toc, opts.chunk_size)
        members.finish()
    except BaseException:
        members.abort()
        raise
    toc_json = toc.finish()
    tail = comp.write_toc_and_footer(toc_json, members.csize)
    members.emit(tail.blob_tail)
    members.diff.update(tail.diff_tail)
    usize = members.usize + len(tail.diff_tail)
    tdigest = toc_digest(toc_json)
    return LayerResult(
        digest=digest_of(members.blob),
        size=members.csize,
        diff_id=digest_of(members.diff),
        uncompressed_size=usize,
        toc_digest=tdigest,
        annotations={
            TOC_DIGEST_ANNOTATION: tdigest,
            UNCOMPRESSED_SIZE_ANNOTATION: str(usize),
            **tail.annotations,
        },
        toc_blob=tail.toc_blob,
        missing_prioritized=missing,
        prioritized_entries=len(front),
        prioritized_files=sum(1 for e in front if e.typeflag != tarfmt.DIR),
        prefetch_size=toc.prefetch_size,
    )


class _TOCStream:
    """TOC entries wait here until their member's blob offset is known, then become JSON."""

    def __init__(self, members: _ParallelMembers) -> None:
        self._members = members
        self._waiting: deque[tuple[TOCEntry, int]] = deque()
        self._writer = TOCWriter()
        self.prefetch_size = 0

    def add(self, entry: TOCEntry, member: int = -1) -> None:
        self._waiting.append((entry, member))
        self._flush()

    def _flush(self) -> None:
        offsets = self._members.offsets
        while self._waiting and self._waiting[0][1] < len(offsets):
            entry, member = self._waiting.popleft()
            if member >= 0:
                entry.offset = offsets[member]
                if not entry.chunk_digest:
                    entry.chunk_digest = self._members.chunk_digests.pop(member)
                if entry.type == "reg" and not entry.digest:
                    entry.digest = entry.chunk_digest
                if entry.name == PREFETCH_LANDMARK:
                    self.prefetch_size = entry.offset
            self._writer.add(entry)

    def finish(self) -> bytes:
        self._flush()
        assert not self._waiting, "every member is written before the TOC"
        return self._writer.finish()


def _write_entries(
    src: TarSource,
    order: list[TarEntry | None],
    members: _ParallelMembers,
    toc: _TOCStream,
    chunk_size: int,
) -> None:
    """Feed headers and chunks to the members, and each TOC entry to the TOC stream."""
    users, groups = _Names(), _Names()
    fd = src.f.fileno()
    for i, e in enumerate(order):
        assert e is not None
        order[i] = None  # parsed entries are let go as soon as they are written
        landmark = e.data_offset < 0
        if landmark:
            members.write(tarfmt.simple_reg_header(e.name, e.size))
        else:
            members.write(tarfmt.encode_header(e))
        ent = TOCEntry(
            name=e.name,
            type=tarfmt.TYPE_NAMES[e.typeflag],
            mode=e.mode,
            uid=e.uid,
            gid=e.gid,
            uname=users.changed(e.uid, e.uname),
            gname=groups.changed(e.gid, e.gname),
            modtime=format_modtime(e.mtime, e.mtime_nsec),
            xattrs=e.xattrs,
        )
        if e.typeflag in (tarfmt.LINK, tarfmt.SYMLINK):
            ent.link_name = e.linkname
        elif e.typeflag in (tarfmt.CHAR, tarfmt.BLOCKDEV):
            ent.dev_major, ent.dev_minor = e.devmajor, e.devminor
        elif e.typeflag == tarfmt.REG:
            ent.size = e.size
        if e.typeflag != tarfmt.REG or e.size == 0:
            if e.typeflag == tarfmt.REG:
                ent.digest = _EMPTY_DIGEST
            toc.add(ent)
            continue
        whole = hasher() if e.size > chunk_size else None
        chunks: list[tuple[TOCEntry, int]] = []
        written = 0
        while written < e.size:
            length = min(chunk_size, e.size - written)
            if length == chunk_size:
                ent.chunk_size = length
            member_index, ent.inner_offset = members.start_chunk(landmark, length)
            ent.chunk_offset = written
            data = LANDMARK_CONTENTS if landmark else _pread(fd, e, written, length)
            members.write(data)
            if not members.hashes_chunks:
                ent.chunk_digest = sha256_digest(data)
            if whole is not None:
                whole.update(data)
            chunks.append((ent, member_index))
            written += length
            ent = TOCEntry(name=e.name, type="chunk")
        if whole is not None:
            chunks[0][0].digest = digest_of(whole)
        for chunk, member_index in chunks:
            toc.add(chunk, member_index)
        members.write(tarfmt.padding(e.size))


_EMPTY_DIGEST = sha256_digest(b"")


def _pread(fd: int, e: TarEntry, at: int, length: int) -> bytes:
    parts = []
    pos = e.data_offset + at
    remaining = length
    while remaining:
        data = os.pread(fd, min(remaining, IO_CHUNK), pos)
        if not data:
            raise BadInputError(f"truncated tar: content of {e.name!r} ends early")
        parts.append(data)
        pos += len(data)
        remaining -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)
