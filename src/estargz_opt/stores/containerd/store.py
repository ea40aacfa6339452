"""containerd's content store and image service as a Store, the way ctr-remote uses them.

The whole run holds a lease, so garbage collection never takes content that is still
being written; when the run fails the lease goes and so does everything it wrote. New
blobs carry the labels upstream gives them: the source blob's labels, the DiffID as
`containerd.io/uncompressed`, and GC references from manifests and indexes to children.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO, Self

from estargz_opt.constants import GC_CONTENT_LABEL, IO_CHUNK, UNCOMPRESSED_LABEL
from estargz_opt.descriptor import Descriptor, load_json
from estargz_opt.digest import digest_of, hasher, sha256_digest, sha256_hex
from estargz_opt.errors import BadInputError, EstargzOptError
from estargz_opt.stores import check_blob
from estargz_opt.stores.containerd.client import Client
from estargz_opt.stores.containerd.errors import (
    ContainerdError,
    ContentNotFoundError,
    ImageNotFoundError,
    IngestLockedError,
)
from estargz_opt.stores.containerd.model import (
    ContainerdOptions,
    Image,
    IngestStatus,
    WriteResult,
)
from estargz_opt.stores.owner import OWNER_LABEL, is_dead, this_process

log = logging.getLogger("estargz_opt")

_INGEST_PREFIX = "estargz-opt-"


class _Aborted(Exception):
    """Ends the upload stream without committing it."""


_END = object()
_ABORT = object()


class _UploadPipe:
    """A write-only file whose bytes stream into a containerd ingest while they are produced.

    Writes are gathered into blocks (one gRPC round trip each) and handed to an upload
    thread through a bounded queue, so compression and upload overlap and memory stays flat.
    """

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        if len(self._buf) >= IO_CHUNK:
            self._sink.put(bytes(self._buf))
            self._buf = bytearray()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            self._sink.put(bytes(self._buf))
            self._buf = bytearray()


class _Sink:
    def __init__(self, store: ContainerdStore, base: str, source: Descriptor | None) -> None:
        self._store = store
        self._base = base
        self._ref = base  # the ingest ref, once the upload has chosen it
        self._source = source
        self._queue: queue.Queue[object] = queue.Queue(maxsize=8)
        self._result: WriteResult | None = None
        self._error: BaseException | None = None
        self.committed = False
        self.file = _UploadPipe(self)
        self._thread = threading.Thread(target=self._upload, name="upload", daemon=True)
        self._thread.start()

    def _chunks(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted
            assert isinstance(item, bytes)
            yield item

    def _upload(self) -> None:
        try:
            chunks = self._chunks()

            def write(ref: str, lock_wait: float | None) -> WriteResult:
                self._ref = ref
                return self._store.client.content.write(
                    ref, chunks, lease=self._store.lease, lock_wait=lock_wait
                )

            self._result = self._store.write_ingest(self._base, write)
        except BaseException as exc:  # reported to the writer on its next put or commit
            self._error = exc

    def put(self, item: object) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        self._raise()

    def _raise(self) -> None:
        if self._error is not None and not isinstance(self._error, _Aborted):
            raise self._error
        raise EstargzOptError(f"upload of {self._ref} to containerd stopped")

    def commit(self, digest: str, size: int, diff_id: str | None = None) -> None:
        self.file.flush()
        self.put(_END)
        self._thread.join()
        if self._result is None:
            self._raise()
        assert self._result is not None
        if self._result.digest != digest or self._result.size != size:
            raise EstargzOptError(
                f"containerd stored {self._result.digest} ({self._result.size} bytes) for "
                f"{digest} ({size} bytes)"
            )
        labels = self._store.source_labels(self._source)
        if diff_id:
            labels[UNCOMPRESSED_LABEL] = diff_id
        if labels:
            self._store.client.content.update_labels(digest, labels)
        self.committed = True

    def abort(self) -> None:
        """Stop the stream uncommitted and drop the partial ingest."""
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(_ABORT, timeout=5)
            self._thread.join(timeout=10)
        with contextlib.suppress(EstargzOptError):
            self._store.client.content.abort(self._ref)


class ContainerdStore:
    """Images of one containerd namespace, used inside a lease (use it as a context manager)."""

    def __init__(self, client: Client, tmp_dir: str | None = None) -> None:
        self._client = client
        self._tmp_dir = tmp_dir
        self._stack = ExitStack()
        self._lock = threading.Lock()
        self._sinks: dict[str, int] = {}
        self.lease: str | None = None
        self._owner = this_process()
        #: ingests of killed runs, by ref without its owner: resumed by the same write
        self._dead_ingests: dict[str, IngestStatus] = {}

    @classmethod
    def connect(cls, options: ContainerdOptions) -> ContainerdStore:
        """A store over a new client; entering the store takes its lease, leaving it
        deletes the lease and closes the client."""
        store = cls(Client(options.address, options.namespace, options.timeout))
        store._stack.callback(store._client.close)
        return store

    @property
    def client(self) -> Client:
        """The containerd client, for what needs containerd's own services beyond the
        Store interface (the workload runner: snapshots, containers, tasks)."""
        return self._client

    def __enter__(self) -> Self:
        try:
            # Check first: taking a lease in a namespace that does not exist would create it.
            self.client.check_namespace()
            labels = {"estargz-opt": "optimize", OWNER_LABEL: self._owner}
            self.lease = self._stack.enter_context(self.client.leases.hold(labels=labels))
            # Dead runs' ingests move to our lease first: deleting their lease lets the
            # garbage collector take them, and with them what a resume would reuse.
            self._find_dead_ingests()
            self._reap_dead_leases()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _find_dead_ingests(self) -> None:
        """Note the ingests of killed runs (their ref ends in `@owner`, see owner.py)."""
        try:
            ingests = self.client.content.list_statuses()
        except ContainerdError as exc:
            log.debug("cannot list ingests: %s", exc)
            return
        assert self.lease is not None
        for status in ingests:
            base, _, owner = status.ref.rpartition("@")
            if base.startswith(_INGEST_PREFIX) and is_dead(owner):
                try:
                    self.client.leases.add_resource(self.lease, status.ref, type="ingests")
                except ContainerdError as exc:  # gone meanwhile: nothing to resume
                    log.debug("cannot keep ingest %s: %s", status.ref, exc)
                    continue
                self._dead_ingests[base] = status
        # Those no write of this run resumes are dropped when it ends.
        self._stack.callback(self._abort_dead_ingests)

    def _abort_dead_ingests(self) -> None:
        with self._lock:
            left, self._dead_ingests = self._dead_ingests, {}
        for old in left.values():
            with contextlib.suppress(ContainerdError):
                # Unless another rerun resumes it right now (containerd's abort ignores
                # the ingest's lock): then it has moved on since we listed it.
                now = self.client.content.status(old.ref)
                if now is not None and (now.offset, now.updated_at) == (
                    old.offset,
                    old.updated_at,
                ):
                    log.info("deleting ingest %s, left by a run that was killed", old.ref)
                    self.client.content.abort(old.ref)

    def write_ingest(
        self, base: str, write: Callable[[str, float | None], WriteResult]
    ) -> WriteResult:
        """Write through an ingest of our own, `base@owner`, or resume a killed run's.

        Refs are named after the content (`base`) so that a rerun finds what a killed run
        left; the owner suffix keeps concurrent runs writing the same content from
        locking each other out (each writes its own ingest; the later commit finds the
        blob stored and just adds its labels). `write(ref, lock_wait)` does the upload
        (lock_wait: None for the client's default).
        """
        with self._lock:
            dead = self._dead_ingests.pop(base, None)
        if dead is not None:
            try:
                return write(dead.ref, 0.0)
            except IngestLockedError:  # another rerun resumes it
                log.debug("ingest %s is taken by another run", dead.ref)
        return write(f"{base}@{self._owner}", None)

    def _reap_dead_leases(self) -> None:
        """Delete the leases of estargz-opt runs that were killed (see owner.py).

        Synchronously: the garbage collection a deletion allows must be over before this
        run looks anything up. Otherwise a blob or snapshot that only the dead lease held
        is found now (an unpacked layer, a converted blob) and collected a moment later,
        under this run's feet ("parent snapshot … does not exist", "content … not found").
        """
        try:
            leases = self.client.leases.list(f'labels."{OWNER_LABEL}"')
        except ContainerdError:
            return
        for lease in leases:
            if is_dead(lease.labels.get(OWNER_LABEL, "")):
                log.info("deleting lease %s, left by a run that was killed", lease.id)
                try:
                    self.client.leases.delete(lease.id, sync=True)
                except ContainerdError as exc:
                    log.debug("could not delete lease %s: %s", lease.id, exc)

    def __exit__(self, *exc: object) -> None:
        self.lease = None
        self._stack.close()

    @property
    def where(self) -> str:
        return f"containerd namespace {self.client.namespace!r} at {self.client.address}"

    # ------------------------------------------------------------------ reading

    def resolve(self, name: str | None) -> Descriptor:
        if not name:
            raise EstargzOptError("name an image in containerd")
        try:
            return self.client.images.get(name).target
        except ImageNotFoundError:
            raise EstargzOptError(f"image {name!r} not found in {self.where}") from None

    def read(self, desc: Descriptor, what: str) -> bytes:
        try:
            data = self.client.content.read_all(desc.digest, verify=False)
        except ContentNotFoundError:
            raise self._missing(desc, what) from None
        check_blob(desc, sha256_digest(data), len(data), what)
        return data

    def size_of(self, digest: str) -> int | None:
        if sha256_hex(digest) is None:
            return None
        try:
            return self.client.content.info(digest).size
        except ContentNotFoundError:
            return None

    def holds(self, digest: str, size: int) -> bool:
        if self.size_of(digest) != size:
            return False
        if self.lease:
            self.client.leases.add_resource(self.lease, digest)
        return self.size_of(digest) == size  # still there, now under our lease

    def stream(self, desc: Descriptor, what: str) -> Iterator[bytes]:
        h = hasher()
        size = 0
        try:
            for block in self.client.content.read(desc.digest):
                h.update(block)
                size += len(block)
                yield block
        except ContentNotFoundError:
            raise self._missing(desc, what) from None
        check_blob(desc, digest_of(h), size, what)

    @contextlib.contextmanager
    def local_file(self, desc: Descriptor, what: str) -> Iterator[Path]:
        # An anonymous file: nothing is left in TMPDIR even if the process is killed.
        with tempfile.TemporaryFile(dir=self._tmp_dir, prefix="estargz-opt-") as f:
            for block in self.stream(desc, what):
                f.write(block)
            f.flush()
            yield Path(f"/proc/self/fd/{f.fileno()}")

    def _missing(self, desc: Descriptor, what: str) -> BadInputError:
        return BadInputError(
            f"missing blob {desc.digest} ({what}) in {self.where}: the image was pulled for "
            "another platform only, or lazily; pull it in full (ctr images pull "
            "--platform/--all-platforms) first"
        )

    def source_labels(self, source: Descriptor | None) -> dict[str, str]:
        """Labels of the blob a new one replaces (e.g. distribution sources), minus GC refs."""
        if source is None:
            return {}
        try:
            labels = self.client.content.info(source.digest).labels
        except ContentNotFoundError:
            return {}
        return {
            k: v
            for k, v in labels.items()
            if not k.startswith(GC_CONTENT_LABEL) and k != UNCOMPRESSED_LABEL
        }

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes, source: Descriptor | None = None) -> None:
        digest = sha256_digest(data)
        labels = self.source_labels(source) | _gc_labels(data)
        self.upload(data, digest, len(data), labels)

    @contextlib.contextmanager
    def sink(self, source: Descriptor | None = None) -> Iterator[_Sink]:
        with self._lock:
            key = source.digest if source else "blob"
            self._sinks[key] = self._sinks.get(key, 0) + 1
            # Named after the source, so a rerun after a crash finds (and resumes or
            # restarts) the ingest the crashed run left behind (see write_ingest).
            base = f"{_INGEST_PREFIX}from-{key}-{self._sinks[key]}"
        sink = _Sink(self, base, source)
        committed = False
        try:
            yield sink
            committed = sink.committed
        finally:
            if not committed:
                sink.abort()

    def upload(
        self, data: bytes | BinaryIO, digest: str, size: int, labels: Mapping[str, str]
    ) -> None:
        def write(ref: str, lock_wait: float | None) -> WriteResult:
            return self.client.content.write(
                ref,
                data,
                expected_digest=digest,
                expected_size=size,
                labels=labels,
                lease=self.lease,
                lock_wait=lock_wait,
            )

        self.write_ingest(f"{_INGEST_PREFIX}{digest}", write)

    def tag(self, tags: Mapping[str, Descriptor]) -> None:
        for name, desc in tags.items():
            self.client.images.put(Image(name=name, target=desc))

    def rollback(self) -> None:
        """Nothing to undo by hand: unreferenced content goes with the lease."""


def _gc_labels(data: bytes) -> dict[str, str]:
    """GC references from a manifest or index to its children, as containerd expects."""
    try:
        raw = load_json(data, "blob")
    except BadInputError:
        return {}
    labels: dict[str, str] = {}
    if isinstance(raw.get("config"), dict) and isinstance(raw["config"].get("digest"), str):
        labels[f"{GC_CONTENT_LABEL}.config"] = raw["config"]["digest"]
    for key, short in (("layers", "l"), ("manifests", "m")):
        items = raw.get(key)
        if isinstance(items, list):
            for i, item in enumerate(items):
                if isinstance(item, dict) and isinstance(item.get("digest"), str):
                    labels[f"{GC_CONTENT_LABEL}.{short}.{i}"] = item["digest"]
    return labels
