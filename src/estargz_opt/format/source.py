"""Opening an input layer: tar, tar+gzip or tar+zstd, recognised by its first bytes.

Compressed input is decompressed once, in bounded pieces, into an anonymous temporary
file, so the layer never sits in memory and nothing is left on disk if the process dies.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from estargz_opt.constants import IO_CHUNK
from estargz_opt.errors import BadInputError
from estargz_opt.format.codec import PIECE, Stream, TruncatedError, decode_all
from estargz_opt.format.estargz import GzipStream
from estargz_opt.format.zstdchunked import SOURCE_WINDOW_LOG_MAX, ZstdStream
from estargz_opt.magic import ZSTD_MAGIC, sniff


@dataclass(frozen=True, slots=True)
class TarSource:
    """A seekable uncompressed tar: file f, bytes [0, size)."""

    f: BinaryIO
    size: int
    compression: str  # "gzip", "zstd" or "none": what the input was


@contextlib.contextmanager
def open_tar(path: str | os.PathLike[str], tmp_dir: str | None = None) -> Iterator[TarSource]:
    """Yield the uncompressed tar of the layer at path."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise BadInputError(f"cannot read {os.fspath(path)}: {exc.strerror}") from None
    with f:
        kind = sniff(f.read(4))
        f.seek(0)
        if kind == "none" and os.path.isfile(path):
            yield TarSource(f, os.fstat(f.fileno()).st_size, kind)
            return
        with tempfile.TemporaryFile(dir=tmp_dir, prefix="estargz-opt-") as tmp:
            if kind == "gzip":
                size = gunzip_into(f, tmp)
            elif kind == "zstd":
                size = unzstd_into(f, tmp)
            else:
                shutil.copyfileobj(f, tmp, IO_CHUNK)
                size = tmp.tell()
            tmp.flush()
            yield TarSource(tmp, size, kind)


class Spool:
    """Source layers decompressed ahead of their conversion, by blob digest.

    The layer-name index decompresses each host layer while the workload runs; spooling
    those tar bytes into anonymous temporary files lets the conversion start from them
    instead of reading, checking and decompressing the blob a second time once the record
    is final. Only a blob read to its end (so checked by its store) is kept; the files
    take disk, never memory, and vanish with the process.
    """

    def __init__(self, tmp_dir: str | None = None) -> None:
        self._tmp_dir = tmp_dir
        self._tars: dict[str, TarSource] = {}
        self._lock = threading.Lock()

    def tee(self, digest: str, chunks: Iterable[bytes], what: str) -> Iterator[bytes]:
        """`plain_pieces(chunks)`, also written to a temporary file that is kept for
        `take(digest)` once the stream has been read to its end."""
        head = bytearray()

        def noting_head(it: Iterable[bytes]) -> Iterator[bytes]:
            for chunk in it:
                head.extend(chunk[: max(0, len(ZSTD_MAGIC) - len(head))])
                yield chunk

        # kept open past this generator, in the spool: closed by the taker or close()
        tmp = tempfile.TemporaryFile(dir=self._tmp_dir, prefix="estargz-opt-spool-")  # noqa: SIM115
        kept = False
        try:
            for piece in plain_pieces(noting_head(chunks), what):
                tmp.write(piece)
                yield piece
            tmp.flush()
            with self._lock:
                old = self._tars.pop(digest, None)
                self._tars[digest] = TarSource(tmp, tmp.tell(), sniff(bytes(head)))
            if old is not None:
                old.f.close()
            kept = True
        finally:
            if not kept:
                tmp.close()

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._tars

    def take(self, digest: str) -> TarSource | None:
        """The spooled tar of `digest` (the caller closes its file), or None."""
        with self._lock:
            return self._tars.pop(digest, None)

    def close(self) -> None:
        """Drop every tar nobody took."""
        with self._lock:
            tars, self._tars = list(self._tars.values()), {}
        for t in tars:
            t.f.close()


def plain_pieces(chunks: Iterable[bytes], what: str) -> Iterator[bytes]:
    """A layer blob read as a stream (tar, tar+gzip or tar+zstd), as its tar bytes, in
    bounded pieces: for readers that must not keep a temporary copy (the layer-name index,
    the workload unpacker). Corrupt or truncated data is BadInputError naming `what`."""
    it = iter(chunks)
    head = b""
    for chunk in it:
        head += chunk
        if len(head) >= len(ZSTD_MAGIC):
            break
    kind = sniff(head)
    if kind == "none":
        if head:
            yield head
        yield from it
        return
    stream: Stream = (
        GzipStream() if kind == "gzip" else ZstdStream(window_log_max=SOURCE_WINDOW_LOG_MAX)
    )
    try:
        yield from decode_all(stream, itertools.chain((head,), it))
    except TruncatedError as exc:
        raise BadInputError(f"truncated {kind} {what}: {exc}") from None
    except ValueError as exc:
        raise BadInputError(
            f"corrupt {kind} {what}: member at offset {stream.member_start}: {exc}"
        ) from None


def gunzip_into(src: BinaryIO, dst: BinaryIO) -> int:
    """Decompress a multi-member gzip stream; corrupt or truncated data is BadInputError."""
    return _decompress_into(GzipStream(), "gzip", src, dst)


def unzstd_into(src: BinaryIO, dst: BinaryIO) -> int:
    """Decompress every zstd frame; corrupt or truncated data is BadInputError."""
    return _decompress_into(ZstdStream(window_log_max=SOURCE_WINDOW_LOG_MAX), "zstd", src, dst)


def _decompress_into(stream: Stream, kind: str, src: BinaryIO, dst: BinaryIO) -> int:
    """Stream src through the decoder into dst, one bounded piece at a time.

    All-zero pieces become holes (a seek, not a write), so that zero-filled files and
    zero bombs cost neither memory nor disk bandwidth.
    """
    total = 0
    hole = False
    try:
        for out in decode_all(stream, iter(lambda: src.read(IO_CHUNK), b"")):
            if out == _ZEROS[: len(out)]:
                dst.seek(len(out), os.SEEK_CUR)
                hole = True
            else:
                dst.write(out)
                hole = False
            total += len(out)
    except TruncatedError as exc:
        raise BadInputError(f"truncated {kind} input: {exc}") from None
    except ValueError as exc:
        raise BadInputError(
            f"corrupt {kind} input: member at offset {stream.member_start}: {exc}"
        ) from None
    if hole:
        dst.truncate(total)  # a trailing hole needs the file's length set
    return total


_ZEROS = memoryview(bytes(PIECE))
