"""Where images live. Every store offers the same small interface (`Store`) to the
converter, to verify/inspect and to the workload runner; `open_store` picks one for a
reference.

Adding a store (a registry, an image archive) means one module here that implements
`Store`, one `ImageRef` kind in reference.py, and one line in `open_store`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

from estargz_opt.descriptor import Descriptor
from estargz_opt.digest import sha256_digest
from estargz_opt.errors import BadInputError, EstargzOptError
from estargz_opt.reference import (
    ContainerdRef,
    DockerArchiveRef,
    ImageRef,
    OCIArchiveRef,
    OCIRef,
    RegistryRef,
)
from estargz_opt.stores.containerd.model import ContainerdOptions
from estargz_opt.stores.registry.options import RegistryOptions

if TYPE_CHECKING:
    from estargz_opt.stores.containerd.store import ContainerdStore


def check_blob(desc: Descriptor, digest: str, size: int, what: str) -> None:
    """Every store checks what it reads against the descriptor that named it."""
    if size != desc.size or digest != desc.digest:
        raise BadInputError(f"blob {desc.digest} ({what}) does not match its digest or size")


class Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...


class BlobSink(Protocol):
    """A blob being written; it becomes visible under its digest only on commit."""

    @property
    def file(self) -> Writer: ...

    def commit(self, digest: str, size: int, diff_id: str | None = None) -> None: ...


class Store(Protocol):
    """An image store, used as a context manager for one run.

    How a new store follows it (a registry, an image archive):
    - `__enter__` takes whatever the run holds for its whole length (containerd: a lease
      against garbage collection; a registry: its auth token and connection pool);
      `__exit__` releases it, whether or not the run failed.
    - Reads are by descriptor and always verified: `read`, `stream` and `local_file`
      check the digest and size (`check_blob`) before the caller trusts the bytes. A
      missing blob is a BadInputError naming the blob and what it was for (`what`).
    - Writes are by content: `write` and `sink` store blobs under their sha256; nothing
      is visible under a name until `tag`, the run's last step. A registry store pushes
      blobs on commit and manifests in `tag`; an archive store writes the archive in `tag`.
    - `rollback` removes what the run wrote, so a failed conversion leaves no trace.
    A read-only store (an archive used as a source) raises EstargzOptError from the
    writing methods.
    """

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...

    def resolve(self, name: str | None) -> Descriptor:
        """The descriptor an image name (tag) points at."""
        ...

    def read(self, desc: Descriptor, what: str) -> bytes:
        """A small blob (manifest, index, config), checked against its digest and size."""
        ...

    def size_of(self, digest: str) -> int | None:
        """The size of the blob `digest`, or None if the store does not hold it (a record
        names its image's manifest by digest alone)."""
        ...

    def holds(self, digest: str, size: int) -> bool:
        """Whether the store already holds the blob, kept for this run (containerd: added
        to the run's lease): a blob it holds needs no copy."""
        ...

    def stream(self, desc: Descriptor, what: str) -> Iterator[bytes]:
        """A (layer) blob as a stream of pieces, checked once the stream is read to its
        end (a reader that stops early, like a file-name scan, gets no check)."""
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


@runtime_checkable
class Prefetching(Protocol):
    """A store whose reads are slow (a registry) and that can fetch ahead: told which
    blobs will be read, in about that order, it starts fetching them so that reading one
    overlaps fetching the next. A capability, not part of `Store`."""

    def prefetch(self, descs: Sequence[Descriptor], whats: Sequence[str]) -> None: ...


@runtime_checkable
class Referring(Protocol):
    """A store that can say what is attached to a manifest: cosign's tags
    (`sha256-<hex>.sig`) and OCI 1.1 referrers (through the referrers API where there is
    one, else the `sha256-<hex>` tag-schema index). A capability, not part of `Store`."""

    def has_tag(self, tag: str) -> bool: ...

    def referrers(self, digest: str) -> list[Descriptor]: ...

    def attach(self, subject: str, referrer: Descriptor) -> None:
        """List `referrer`, a manifest already written whose `subject` is `subject`,
        where the store has no referrers API to find it by itself (a tag-schema index)."""
        ...


@runtime_checkable
class Mounting(Protocol):
    """A store that can take a blob from another repository of its own registry by
    reference, moving no bytes (a cross-repository mount). A capability, not `Store`."""

    def mount_blob(self, host: str, repository: str, digest: str, size: int) -> bool:
        """Whether the blob is now held (False: another registry, or not mounted)."""
        ...


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """How to reach the stores of one side of a run (source or destination)."""

    containerd: ContainerdOptions = field(default_factory=ContainerdOptions)
    registry: RegistryOptions = field(default_factory=RegistryOptions)


def write_through_sink(store: Store, data: bytes) -> None:
    """`Store.write` for a store whose small blobs take the same path as large ones."""
    with store.sink() as s:
        s.file.write(data)
        s.commit(sha256_digest(data), len(data))


def open_store(ref: ImageRef, opts: StoreOptions, *, create: bool) -> Store:
    """The store `ref` names (not yet entered). create: it is the run's destination (an
    OCI layout is made if missing; a registry checks on entry that it may push)."""
    # Imported here: each store module imports check_blob from this package.
    if isinstance(ref, OCIRef):
        from estargz_opt.stores.oci import OCILayout

        return OCILayout(ref.path, create=create)
    if isinstance(ref, OCIArchiveRef):
        from estargz_opt.stores.ociarchive import OCIArchive

        return OCIArchive(ref.path, create=create)
    if isinstance(ref, DockerArchiveRef):
        from estargz_opt.stores.dockerarchive import DockerArchive

        return DockerArchive(ref.path)
    if isinstance(ref, RegistryRef):
        from estargz_opt.stores.registry.store import RegistryStore

        return RegistryStore(ref, opts.registry, destination=create)
    from estargz_opt.stores.containerd.store import ContainerdStore

    return ContainerdStore.connect(opts.containerd)


def same_store(a: ImageRef, b: ImageRef) -> bool:
    """Whether two references name the same store (the converter then copies nothing).
    Two repositories of a registry are two stores (each side has its own credentials);
    blobs go from one to the other by mount (`pair`)."""
    if isinstance(a, OCIRef) and isinstance(b, OCIRef):
        return a.path.resolve() == b.path.resolve()
    if isinstance(a, OCIArchiveRef) and isinstance(b, OCIArchiveRef):
        return a.path.resolve() == b.path.resolve()
    return isinstance(a, ContainerdRef) and isinstance(b, ContainerdRef)


def is_containerd(store: Store) -> bool:
    """Whether the store is containerd (whose own runner can run its images)."""
    return _is_a(store, "estargz_opt.stores.containerd.store", "ContainerdStore")


def _is_a(store: Store, module: str, cls: str) -> bool:
    """isinstance(store, module.cls) without importing `module`: a store of that class
    exists only if its module is loaded (containerd's loads grpc, the registry's httpx:
    ~0.2 s that a run on an OCI layout need not pay)."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(store, getattr(loaded, cls))


def pair(src: Store, dst: Store) -> None:
    """Tell the destination where the source lives, when it can take blobs from there
    without moving their bytes (a registry: mount from another repository of the same
    registry)."""
    registry = "estargz_opt.stores.registry.store"
    if not (_is_a(src, registry, "RegistryStore") and _is_a(dst, registry, "RegistryStore")):
        return
    from estargz_opt.stores.registry.store import RegistryStore

    assert isinstance(src, RegistryStore) and isinstance(dst, RegistryStore)
    if src.ref.api_host == dst.ref.api_host and src.ref.repository != dst.ref.repository:
        dst.mount_from = src.ref.repository


def as_containerd(store: Store, why: str) -> ContainerdStore:
    """The store as containerd, for what needs containerd's own services (the workload
    runner's snapshots, containers and tasks: `ContainerdStore.client`)."""
    from estargz_opt.stores.containerd.store import ContainerdStore

    if not isinstance(store, ContainerdStore):
        raise EstargzOptError(f"{why} needs containerd, which this image's store is not")
    return store
