"""Which names each layer of an image holds, to map an accessed path to its top-most layer."""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from estargz_opt.constants import IO_CHUNK
from estargz_opt.errors import BadInputError
from estargz_opt.format import tarfmt
from estargz_opt.format.source import plain_pieces

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass(frozen=True, slots=True)
class LayerNames:
    """The clean names in each layer, bottom (0) to top."""

    layers: list[frozenset[str]]

    @staticmethod
    def names_in(path: str | os.PathLike[str]) -> frozenset[str]:
        """The clean names of one layer blob file (tar, tar+gzip or tar+zstd)."""
        with open(path, "rb") as f:
            return LayerNames.names_in_stream(iter(lambda: f.read(IO_CHUNK), b""))

    @staticmethod
    def names_in_stream(chunks: Iterable[bytes]) -> frozenset[str]:
        """The clean names of one layer blob read as a stream (no temporary copy).

        Used on blobs read from containerd while the workload runs: the tar is parsed as
        it is decompressed, so only the headers are kept.
        """
        stream = io.BufferedReader(_ChunkReader(plain_pieces(chunks, "layer")), IO_CHUNK)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                names = {tarfmt.clean_name(m.name) for m in tar}
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            raise BadInputError(f"cannot read the layer's file names: {exc}") from None
        names.discard("")
        return frozenset(names)

    def top_layer(self, name: str) -> int | None:
        """The layer that provides name, or None if absent or deleted by a whiteout above."""
        name = tarfmt.clean_name(name)
        if not name:
            return None
        parent, base = posixpath.split(name)
        whiteout = posixpath.join(parent, WHITEOUT_PREFIX + base)
        opaque = posixpath.join(parent, OPAQUE)
        for i in range(len(self.layers) - 1, -1, -1):
            names = self.layers[i]
            if name in names:
                return i
            if whiteout in names or opaque in names:
                return None
        return None

    def all_names(self) -> list[str]:
        """Every name in any layer, sorted (so glob matches come in a stable order)."""
        out: set[str] = set()
        for names in self.layers:
            out.update(n for n in names if not posixpath.basename(n).startswith(WHITEOUT_PREFIX))
        return sorted(out)


class _ChunkReader(io.RawIOBase):
    """A read-only stream over an iterator of byte chunks (e.g. a gRPC read)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    # typeshed's readinto takes any buffer; io.BufferedReader passes memoryviews only.
    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buf = memoryview(chunk)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n
