"""`RegistryStore`: one repository of a registry as a `Store`.

Reading: manifests are fetched by tag or digest (and kept for the run, they are small);
layers are streamed through their digest check into a temporary file that the format
engine reads, one file per layer being converted, removed once converted.

Writing: entered as a run's destination, the store first opens an upload session and
cancels it, so a repository that refuses our pushes fails the run before any layer is
converted (and the session holds its push authorization before any stream starts). A
new blob (`sink`, whose digest is known only once written) is streamed: an upload
session is opened at once and a thread sends the blob in one PATCH as the converter
writes it, so a layer's upload overlaps its own conversion; `commit` then has the blob
committed (PUT ?digest=) in the background. The bytes go through a spool file that the
stream reads behind the writer: the converter never waits on the network, memory stays
flat, and a stream that breaks or is refused is sent again from the spool by the retried
whole/chunked upload. Blobs whose digest is known before they are written (`write`:
configs) are pushed on commit in the background: HEAD first, then a cross-repository
mount when the source is another repository of the same registry, else an upload
(copies and cache hits ask `holds`, which does the HEAD and the mount, before opening a
sink). Manifests and indexes are kept until `tag`, which waits for every blob, pushes
manifests children first, and writes the tags last: a failure never leaves a tag
pointing at missing content. A discarded sink and a rollback cancel their upload
sessions; blobs already pushed stay, untagged (as with skopeo).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Self

from estargz_opt import descriptor as d
from estargz_opt.constants import IO_CHUNK
from estargz_opt.descriptor import Descriptor, Index
from estargz_opt.digest import digest_tag, sha256_digest, sha256_hex
from estargz_opt.errors import BadInputError, RegistryError
from estargz_opt.reference import DEFAULT_TAG, RegistryRef
from estargz_opt.stores import check_blob
from estargz_opt.stores.owner import is_dead, temp_owner, temp_prefix
from estargz_opt.stores.registry.client import PIECE, Client, RetryPolicy, Upload, sniff_type
from estargz_opt.stores.registry.options import RegistryOptions
from estargz_opt.stores.registry.session import Session, open_session

log = logging.getLogger("estargz_opt")

#: Blobs pushed at once (each its own connection); the converter's workers run besides.
_UPLOADS = 2
#: Layers downloaded at once ahead of the conversion, and how many downloaded layers may
#: wait on disk for the converter (a bound on temporary disk use, not on memory).
_DOWNLOADS = 2
_AHEAD = 4
#: The kind of this run's spool directory (downloaded and converted blobs), in $TMPDIR.
_SPOOL = "estargz-opt-registry"


class _Discarded(Exception):
    """Ends a stream whose blob was discarded or whose run stopped (never committed)."""


@dataclass(frozen=True, slots=True)
class _StreamOwner:
    """What a streamed upload tells the store that made it (its own methods, handed over,
    so that the sink calls nothing private of the store)."""

    opened: Callable[[Upload], None]
    committed: Callable[[_StreamSink, str, int], None]
    cancel: Callable[[Upload], None]


class _StreamSink:
    """A new blob, streamed to an upload session while it is written (module docstring).

    The writer appends to the spool and publishes how much of it is flushed; the stream
    thread reads the spool up to there, so the spool is the only buffer. The session is
    opened (POST) before the PATCH goes out, which gives the session its push token:
    the auth flow authorizes the PATCH before sending it, since a streamed body cannot
    be replayed after a 401.
    """

    def __init__(self, client: Client, f: BinaryIO, path: Path, owner: _StreamOwner) -> None:
        self.file = self
        self.committed = False
        self._client = client
        self._owner = owner
        self._f = f
        self.path = path
        self._cond = threading.Condition()
        self._flushed = 0  # bytes of the spool the stream may read
        self._pending = 0  # bytes written since
        self._done = False
        self._discarded = False
        self.upload: Upload | None = None
        #: why the stream did not reach the registry whole (None: it did, or not yet)
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._stream, name="stream", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self._pending += len(data)
        if self._pending >= PIECE:
            self._publish()
        return len(data)

    def _publish(self) -> None:
        self._f.flush()
        with self._cond:
            self._flushed += self._pending
            self._cond.notify_all()
        self._pending = 0

    def _body(self) -> Iterator[bytes]:
        """The spool as it grows, to its end once committed."""
        stopped = self._client.stopped
        with open(self.path, "rb") as f:
            sent = 0
            while True:
                with self._cond:
                    while sent == self._flushed and not (self._done or self._discarded):
                        if stopped.is_set():
                            raise _Discarded
                        self._cond.wait(0.2)
                    if self._discarded or stopped.is_set():
                        raise _Discarded
                    end = self._flushed
                if sent == end:
                    return  # done, and all of it sent
                piece = f.read(min(PIECE, end - sent))
                if not piece:
                    raise _Discarded  # the spool is gone (the run is over)
                sent += len(piece)
                yield piece

    def _stream(self) -> None:
        client = self._client
        try:
            up = client.start_upload()
            self.upload = up
            self._owner.opened(up)
            if up.min_chunk:
                self.failure = f"the registry asks for chunks of at least {up.min_chunk} bytes"
                return
            self.failure = client.stream_patch(up, self._body())
        except _Discarded:
            self.failure = "discarded"
        except Exception as exc:  # any failure: the blob is sent again from the spool
            self.failure = str(exc) or type(exc).__name__

    def commit(self, digest: str, size: int, diff_id: str | None = None) -> None:
        self._publish()
        with self._cond:
            self._done = True
            self._cond.notify_all()
        self._owner.committed(self, digest, size)
        self.committed = True

    def wait(self) -> str | None:
        """Wait for the stream to end; why it failed, or None."""
        self._thread.join()
        return self.failure

    def discard(self) -> None:
        """Stop the stream and cancel its upload session (the blob will not be used)."""
        with self._cond:
            self._discarded = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        if self.upload is not None and not self._thread.is_alive():
            self._owner.cancel(self.upload)


class RegistryStore:
    """One repository (`ref`) on a registry, reached with the options of its side."""

    def __init__(
        self,
        ref: RegistryRef,
        opts: RegistryOptions,
        retry: RetryPolicy | None = None,
        *,
        destination: bool = False,
    ) -> None:
        self.ref = ref
        self._opts = opts
        self._retry = retry
        #: entered as a run's destination: check at once that we may push (`__enter__`)
        self._destination = destination
        self._session: Session | None = None
        self._client: Client | None = None
        self._tmp: Path | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        #: manifests and indexes read this run, by digest (they are small)
        self._manifests: dict[str, bytes] = {}
        #: manifests and indexes written this run, pushed in `tag`
        self._out: dict[str, bytes] = {}
        #: blobs pushed or being pushed this run
        self._pushes: dict[str, Future[None]] = {}
        self._open_uploads: list[Upload] = []
        #: another repository of the same registry that blobs can be mounted from
        self.mount_from: str | None = None
        #: layers being fetched ahead (`prefetch`), by digest, until `local_file` takes them
        self._ahead: dict[str, Future[Path]] = {}
        self._ahead_room = threading.BoundedSemaphore(_AHEAD)
        self._fetcher: ThreadPoolExecutor | None = None

    def __enter__(self) -> Self:
        session = open_session(self.ref.api_host, self._opts)
        try:
            client = Client(session, self.ref.repository, self._retry)
            if self._destination:
                client.check_push()
        except BaseException:
            session.close()
            raise
        self._session, self._client = session, client
        _remove_dead_spools()
        self._tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(_SPOOL), suffix=".tmp"))
        self._pool = ThreadPoolExecutor(_UPLOADS, thread_name_prefix="push")
        self._fetcher = ThreadPoolExecutor(_DOWNLOADS, thread_name_prefix="fetch")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fetcher is not None:
            self.client.stopped.set()
            self._fetcher.shutdown(wait=True, cancel_futures=True)
            self._fetcher = None
        if self._pool is not None:
            self._stop_pushing()
        if self._session is not None:
            self._session.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("RegistryStore used outside its with block")
        return self._client

    def _temp(self) -> tuple[BinaryIO, Path]:
        assert self._tmp is not None
        fd, name = tempfile.mkstemp(dir=self._tmp, suffix=".blob")
        return os.fdopen(fd, "w+b"), Path(name)

    # ------------------------------------------------------------------ reading

    def resolve(self, name: str | None) -> Descriptor:
        reference = name or self.ref.digest or self.ref.tag or DEFAULT_TAG
        by_digest = sha256_hex(reference) is not None
        what = f"manifest {reference}" if by_digest else f"tag {reference!r}"
        desc, data = self.client.get_manifest(reference, what)
        if by_digest and desc.digest != reference:
            raise BadInputError(
                f"{self.client.where}: manifest {reference} does not match its digest"
            )
        with self._lock:
            self._manifests[desc.digest] = data
        return desc

    def has_tag(self, tag: str) -> bool:
        return self.client.has_manifest(tag)

    def referrers(self, digest: str) -> list[Descriptor]:
        """Through the referrers API, else the tag-schema index (`sha256-<hex>`)."""
        what = f"referrers of {digest}"
        data = self.client.referrers(digest)
        if data is None:
            tag = digest_tag(digest)
            if not self.client.has_manifest(tag):
                return []
            what = f"referrers of {digest} (tag {tag!r})"
            _, data = self.client.get_manifest(tag, what)
        return Index.parse(data, f"{self.client.where}: {what}").manifests

    def attach(self, subject: str, referrer: Descriptor) -> None:
        self._push_manifest(referrer, set())  # a copied referrer, which no tag reaches
        if self.client.referrers(subject) is not None:
            return  # the registry indexes a pushed manifest's subject itself
        tag = digest_tag(subject)
        what = f"referrers of {subject} (tag {tag!r})"
        index = Index(d.OCI_INDEX, [], {"schemaVersion": 2})
        if self.client.has_manifest(tag):
            _, data = self.client.get_manifest(tag, what)
            index = Index.parse(data, f"{self.client.where}: {what}")
        if any(m.digest == referrer.digest for m in index.manifests):
            return
        index.manifests.append(referrer)
        self.client.put_manifest(tag, d.OCI_INDEX, index.to_bytes())

    def read(self, desc: Descriptor, what: str) -> bytes:
        data = self._manifests.get(desc.digest) or self._out.get(desc.digest)
        if data is None:
            if desc.media_type in d.INDEX_TYPES | d.MANIFEST_TYPES:
                _, data = self.client.get_manifest(desc.digest, what)
                with self._lock:
                    self._manifests[desc.digest] = data
            else:
                data = self.client.read_blob(desc, what)
        check_blob(desc, sha256_digest(data), len(data), what)
        return data

    def size_of(self, digest: str) -> int | None:
        if sha256_hex(digest) is None:
            return None
        size = self.client.manifest_size(digest)
        return size if size is not None else self.client.blob_size(digest)

    def holds(self, digest: str, size: int) -> bool:
        with self._lock:
            if digest in self._pushes:
                return True
        if self.client.blob_size(digest) == size:
            return True
        return self.mount_from is not None and self.client.mount(digest, self.mount_from)

    def mount_blob(self, host: str, repository: str, digest: str, size: int) -> bool:
        """`Mounting`: mount the blob from `repository` when it is on this registry."""
        if host != self.ref.api_host:
            return False
        return self.client.blob_size(digest) == size or self.client.mount(digest, repository)

    def stream(self, desc: Descriptor, what: str) -> Iterator[bytes]:
        with self.local_file(desc, what) as path, open(path, "rb") as f:
            while block := f.read(IO_CHUNK):
                yield block

    def prefetch(self, descs: Sequence[Descriptor], whats: Sequence[str]) -> None:
        """Start downloading these layers, in order, at most _AHEAD waiting on disk."""
        assert self._fetcher is not None
        with self._lock:
            for desc, what in zip(descs, whats, strict=True):
                if desc.digest not in self._ahead:
                    self._ahead[desc.digest] = self._fetcher.submit(self._fetch, desc, what)

    def _fetch(self, desc: Descriptor, what: str) -> Path:
        while not self._ahead_room.acquire(timeout=0.2):
            if self.client.stopped.is_set():
                raise RegistryError(f"{self.client.where}: download interrupted")
        try:
            return self._download(desc, what)
        except BaseException:
            self._ahead_room.release()
            raise

    def _download(self, desc: Descriptor, what: str) -> Path:
        f, path = self._temp()
        try:
            with f:
                self.client.download(desc, what, f)
        except BaseException:
            path.unlink()
            raise
        return path

    @contextlib.contextmanager
    def local_file(self, desc: Descriptor, what: str) -> Iterator[Path]:
        with self._lock:
            ahead = self._ahead.pop(desc.digest, None)
        if ahead is not None:
            try:
                path = ahead.result()
            finally:
                if not ahead.exception():
                    self._ahead_room.release()
        else:
            path = self._download(desc, what)
        try:
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes, source: Descriptor | None = None) -> None:
        digest = sha256_digest(data)
        if _is_manifest(data, source):
            with self._lock:
                self._out[digest] = data
            return
        self._raise_failed_push()
        f, path = self._temp()
        with f:
            f.write(data)
        self._push(path, digest, len(data))

    @contextlib.contextmanager
    def sink(self, source: Descriptor | None = None) -> Iterator[_StreamSink]:
        self._raise_failed_push()
        f, path = self._temp()
        sink = None
        try:
            with f:
                sink = _StreamSink(
                    self.client,
                    f,
                    path,
                    _StreamOwner(self._opened, self._push_streamed, self._cancel),
                )
                yield sink
        finally:
            if sink is None or not sink.committed:
                if sink is not None:
                    sink.discard()
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _opened(self, upload: Upload) -> None:
        with self._lock:
            self._open_uploads.append(upload)

    def _closed(self, upload: Upload) -> None:
        with self._lock:
            self._open_uploads = [u for u in self._open_uploads if u is not upload]

    def _cancel(self, upload: Upload) -> None:
        self.client.cancel(upload)
        self._closed(upload)

    def _push_streamed(self, sink: _StreamSink, digest: str, size: int) -> None:
        """Have a committed stream's blob committed in the background (a blob this run
        pushes already needs no second copy: that stream is cancelled)."""
        assert self._pool is not None
        with self._lock:
            known = digest in self._pushes
            if not known:
                self._pushes[digest] = self._pool.submit(self._land, sink, digest, size)
        if known:
            sink.discard()
            with contextlib.suppress(FileNotFoundError):
                sink.path.unlink()

    def _land(self, sink: _StreamSink, digest: str, size: int) -> None:
        """PUT ?digest= once the stream has ended; a stream that broke, was refused, or
        whose commit failed is uploaded again from the spool (HEAD, mount, upload)."""
        try:
            why = sink.wait()
            up = sink.upload
            if why is None and up is not None:
                why = self.client.finish_stream(up, digest)
                if why is None:
                    self._closed(up)
                    return
            if self.client.stopped.is_set():
                raise RegistryError(f"{self.client.where}: upload interrupted")
            log.info(
                "%s: blob %s: the streamed upload did not land (%s); uploading it "
                "again from its spool",
                self.client.where,
                digest,
                why,
            )
            if up is not None:
                self._cancel(up)
            self._push_now(sink.path, digest, size, chunked=up is not None and up.whole_refused)
        finally:
            with contextlib.suppress(FileNotFoundError):
                sink.path.unlink()

    def _push(self, path: Path, digest: str, size: int) -> None:
        """Push the spooled blob in the background (the file is removed once pushed)."""
        assert self._pool is not None
        with self._lock:
            if digest in self._pushes:
                path.unlink()
                return
            self._pushes[digest] = self._pool.submit(self._push_now, path, digest, size)

    def _push_now(self, path: Path, digest: str, size: int, *, chunked: bool = False) -> None:
        try:
            if self.client.blob_size(digest) == size:
                return
            if self.mount_from is not None and self.client.mount(digest, self.mount_from):
                return
            started: list[Upload] = []

            def on_start(upload: Upload) -> None:
                started.append(upload)
                self._opened(upload)

            self.client.upload(path, digest, size, on_start, chunked=chunked)
            # Committed: those sessions are closed. A failed push leaves its session open
            # for rollback to cancel.
            for upload in started:
                self._closed(upload)
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _raise_failed_push(self) -> None:
        """Fail early once a push has failed (the run cannot be tagged anyway)."""
        with self._lock:
            done = [f for f in self._pushes.values() if f.done() and not f.cancelled()]
        for fut in done:
            fut.result()

    def tag(self, tags: Mapping[str, Descriptor]) -> None:
        with self._lock:
            pushes = list(self._pushes.values())
        for fut in pushes:
            fut.result()
        pushed: set[str] = set()
        for desc in tags.values():
            self._push_manifest(desc, pushed)
        for name, desc in tags.items():
            data = self._manifest_bytes(desc)
            self.client.put_manifest(name, _content_type(desc, data), data)

    def _manifest_bytes(self, desc: Descriptor) -> bytes:
        data = self._out.get(desc.digest)
        return data if data is not None else self.read(desc, f"manifest {desc.digest}")

    def _push_manifest(self, desc: Descriptor, pushed: set[str]) -> None:
        """Push a manifest or index written this run, its child manifests first."""
        if desc.digest in pushed or desc.digest not in self._out:
            return
        data = self._out[desc.digest]
        if _content_type(desc, data) in d.INDEX_TYPES:
            for child in Index.parse(data, f"index {desc.digest}").manifests:
                if child.media_type in d.INDEX_TYPES | d.MANIFEST_TYPES:
                    self._push_manifest(child, pushed)
        self.client.put_manifest(desc.digest, _content_type(desc, data), data)
        pushed.add(desc.digest)

    def rollback(self) -> None:
        """Cancel what is still being pushed and the upload sessions left open. Blobs
        already pushed stay, untagged: a rerun finds them by HEAD and sends them no more."""
        if self._pool is not None:
            self._stop_pushing()
        with self._lock:
            self._out.clear()

    def _stop_pushing(self) -> None:
        assert self._pool is not None
        self.client.stopped.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None
        with self._lock:
            open_uploads, self._open_uploads = self._open_uploads, []
        for upload in open_uploads:
            self.client.cancel(upload)


def _remove_dead_spools() -> None:
    """Remove the spool directories of runs that were killed (their owner is gone)."""
    where = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in os.scandir(where):
            owner = temp_owner(entry.name)
            if entry.name.startswith(f".{_SPOOL}@") and owner and is_dead(owner):
                shutil.rmtree(entry.path, ignore_errors=True)


def _content_type(desc: Descriptor, data: bytes) -> str:
    """The Content-Type a manifest is pushed with: its descriptor's media type, else its
    own (an OCI index may omit both mediaType fields)."""
    if desc.media_type in d.INDEX_TYPES | d.MANIFEST_TYPES:
        return desc.media_type
    return sniff_type(data) or d.OCI_MANIFEST


def _is_manifest(data: bytes, source: Descriptor | None) -> bool:
    """Whether a small blob being written is a manifest or an index (pushed as a manifest,
    not as a blob): by the type of the blob it replaces, else by its content."""
    if source is not None:
        return source.media_type in d.INDEX_TYPES | d.MANIFEST_TYPES
    return sniff_type(data) is not None
