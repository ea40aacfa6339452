"""Where images live. Every store offers the same small interface to the converter."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol

from estargz_opt.descriptor import Descriptor
from estargz_opt.errors import BadInputError


def check_blob(desc: Descriptor, digest: str, size: int, what: str) -> None:
    """Every store checks what it reads against the descriptor that named it."""
    if size != desc.size or digest != desc.digest:
        raise BadInputError(f"blob {desc.digest} ({what}) does not match its digest or size")


class BlobSink(Protocol):
    """A blob being written; it becomes visible under its digest only on commit."""

    file: BinaryIO

    def commit(self, digest: str, size: int, diff_id: str | None = None) -> None: ...


class Store(Protocol):
    def resolve(self, name: str | None) -> Descriptor:
        """The descriptor an image name (tag) points at."""
        ...

    def read(self, desc: Descriptor, what: str) -> bytes:
        """A small blob (manifest, index, config), checked against its digest and size."""
        ...

    def local_file(self, desc: Descriptor, what: str) -> AbstractContextManager[Path]:
        """A verified local file holding a (layer) blob, for the format engine to read."""
        ...

    def write(self, data: bytes, source: Descriptor | None = None) -> None:
        """Store a small blob under its sha256 (source: the blob it replaces, if any)."""
        ...

    def sink(self, source: Descriptor | None = None) -> AbstractContextManager[BlobSink]:
        """A new large blob, streamed; discarded unless committed."""
        ...

    def tag(self, tags: Mapping[str, Descriptor]) -> None:
        """Point each name at its descriptor, all at once; the last step of a conversion."""
        ...

    def rollback(self) -> None:
        """Remove what this run wrote (a conversion that failed leaves no trace)."""
        ...
