"""Opening an input layer: tar, tar+gzip or tar+zstd, recognised by its first bytes.

Compressed input is decompressed once into an anonymous temporary file, so the layer
never sits in memory and nothing is left on disk if the process dies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from estargz_opt.errors import BadInputError
from estargz_opt.format.codec import Stream, TruncatedError, decode_all
from estargz_opt.format.estargz import GzipStream
from estargz_opt.format.zstdchunked import ZstdStream

GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_COPY = 1 << 20


@dataclass(frozen=True, slots=True)
class TarSource:
    """A seekable uncompressed tar: file f, bytes [0, size)."""

    f: BinaryIO
    size: int
    compression: str  # "gzip", "zstd" or "none": what the input was


def sniff(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


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
                shutil.copyfileobj(f, tmp, _COPY)
                size = tmp.tell()
            tmp.flush()
            yield TarSource(tmp, size, kind)


def gunzip_into(src: BinaryIO, dst: BinaryIO) -> int:
    """Decompress a multi-member gzip stream; corrupt or truncated data is BadInputError."""
    return _decode_into(GzipStream(), "gzip", "member", src, dst)


def unzstd_into(src: BinaryIO, dst: BinaryIO) -> int:
    """Decompress every zstd frame; corrupt or truncated data is BadInputError."""
    return _decode_into(ZstdStream(), "zstd", "frame", src, dst)


def _decode_into(stream: Stream, kind: str, member: str, src: BinaryIO, dst: BinaryIO) -> int:
    total = 0
    try:
        for out in decode_all(stream, iter(lambda: src.read(_COPY), b"")):
            dst.write(out)
            total += len(out)
    except TruncatedError:
        raise BadInputError(
            f"truncated {kind} input: the stream ends inside a {member}"
        ) from None
    except ValueError as exc:
        raise BadInputError(f"corrupt {kind} input near byte {src.tell()}: {exc}") from None
    return total
