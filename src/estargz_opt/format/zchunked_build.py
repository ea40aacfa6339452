"""Writing a containers-flavour zstd:chunked layer (see estargz_opt.format.zchunked).

It shares the stargz builder's entry order (prioritized files first) and its parallel,
deterministic frame compression; it differs in what it writes: no landmark files (podman
would unpack them into the rootfs), frames cut around each content chunk, a tar-split
record of every byte of the tar, and c/storage's TOC. The tar is re-encoded exactly as
for the stargz flavour, so the DiffID is the digest of the very bytes the tar-split
rebuilds.
"""

from __future__ import annotations

import os

import zstandard

from estargz_opt.constants import MAX_TOC_SIZE
from estargz_opt.digest import digest_of, hasher, sha256_digest
from estargz_opt.errors import BadInputError
from estargz_opt.format import tarfmt, zchunked, zstdchunked
from estargz_opt.format.build import (
    LayerOptions,
    LayerResult,
    ProgressFn,
    _ParallelMembers,
    _pread,
    index_entries,
    order_entries,
)
from estargz_opt.format.codec import Compressor, Output
from estargz_opt.format.source import TarSource
from estargz_opt.format.zchunked import ChunkRef, PendingEntry

_READ = 4 << 20


def build_containers_layer(
    src: TarSource, out: Output, opts: LayerOptions, progress: ProgressFn | None = None
) -> LayerResult:
    """Write the containers-flavour layer for src to out and describe it."""
    order, missing, front = order_entries(index_entries(src), opts.prioritized)
    comp: Compressor = zstdchunked.ZstdCompressor(opts.level)  # only its frames are used
    members = _ParallelMembers(comp, out, opts.workers or os.cpu_count() or 1, progress)
    tarsplit = zchunked.TarSplitWriter(opts.level)
    pending: list[PendingEntry] = []
    prefetch_member = -1
    try:
        fd = src.f.fileno()
        for i, e in enumerate(order):
            assert e is not None
            order[i] = None
            if e.data_offset < 0:  # the stargz landmark: it would be a real file here
                if front:
                    prefetch_member, _ = members.start_chunk(False, 0)
                continue
            pending.append(_write_entry(fd, e, members, tarsplit))
        members.write(tarfmt.EOF_BLOCKS)
        tarsplit.segment(tarfmt.EOF_BLOCKS)
        members.finish()
    except BaseException:
        members.abort()
        raise
    ts = tarsplit.finish()
    offsets = [*members.offsets, members.csize]
    entries = [ent for p in pending for ent in p.resolve(offsets, members.chunk_digests)]
    toc = zchunked.toc_json(entries, sha256_digest(ts))
    if len(toc) > MAX_TOC_SIZE:
        raise BadInputError(
            f"the TOC would be {len(toc)} bytes, over c/storage's {MAX_TOC_SIZE}-byte limit"
        )
    compressed_toc = zstandard.ZstdCompressor(level=opts.level).compress(toc)
    tail, annotations = zchunked.tail_frames(
        members.csize, compressed_toc, len(toc), ts, tarsplit.plain_size
    )
    members.emit(tail)
    return LayerResult(
        digest=digest_of(members.blob),
        size=members.csize,
        diff_id=digest_of(members.diff),
        uncompressed_size=members.usize,
        toc_digest=annotations[zchunked.MANIFEST_CHECKSUM],
        annotations=annotations,
        missing_prioritized=missing,
        prioritized_entries=len(front),
        prioritized_files=sum(1 for e in front if e.typeflag != tarfmt.DIR),
        prefetch_size=offsets[prefetch_member] if prefetch_member >= 0 else 0,
    )


def _write_entry(
    fd: int, e: tarfmt.TarEntry, members: _ParallelMembers, tarsplit: zchunked.TarSplitWriter
) -> PendingEntry:
    header = tarfmt.encode_header(e)
    seen = zchunked.reparse(header)  # what Go's reader (and so c/storage) makes of it
    members.write(header)
    tarsplit.segment(header)
    pending = PendingEntry(zchunked.header_metadata(seen))
    size = seen.size if seen.typeflag == tarfmt.REG else 0
    if size:
        pending.digest, crc = _write_content(fd, e, size, members, pending.chunks)
        members.start_chunk(False, 0)  # padding and the next header open a new frame
        tarsplit.file(seen.name, size, crc)
        pad = tarfmt.padding(size)
        members.write(pad)
        tarsplit.segment(pad)
    else:  # Go hands tar-split no content here: a stated size gets the empty CRC
        tarsplit.file(seen.name, seen.size, 0 if seen.size else None)
    return pending


def _write_content(
    fd: int, e: tarfmt.TarEntry, size: int, members: _ParallelMembers, chunks: list[ChunkRef]
) -> tuple[str, int]:
    """Write a file's content, one frame per chunk; its digest and tar-split CRC.

    A chunk (at most MAX_CHUNK bytes) is gathered before its frame is begun, so that
    its length is known and the compression pool hashes it beside compressing it.
    """
    chunker = zchunked.Chunker()
    whole = hasher()
    crc: int | None = None
    parts: list[bytes] = []
    zeros = False
    written = 0

    def take(piece: zchunked.Piece) -> None:
        nonlocal zeros, written
        if piece.data:
            parts.append(piece.data)
            zeros = piece.zeros
        if piece.cut and parts:
            data = b"".join(parts) if len(parts) > 1 else parts[0]
            parts.clear()
            member, _ = members.start_chunk(False, len(data))
            members.write(data)
            chunks.append(ChunkRef(member, written, len(data), zeros))
            written += len(data)

    at = 0
    while at < size:
        data = _pread(fd, e, at, min(_READ, size - at))
        at += len(data)
        whole.update(data)
        crc = zchunked.crc64(data, crc)
        for piece in chunker.feed(data):
            take(piece)
    for piece in chunker.finish():
        take(piece)
    take(zchunked.Piece(b"", cut=True))
    assert written == size
    return digest_of(whole), crc if crc is not None else 0
