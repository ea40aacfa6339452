"""containerd's content service: blobs by digest, and ingests (writes in progress).

A write goes through an ingest named by a ref. containerd keeps an interrupted ingest's
bytes under its ref, so a rerun that writes the same blob under the same ref can resume
where the last run stopped; `Ingest` spells that protocol out step by step.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, cast

import grpc
from google.protobuf import field_mask_pb2

from estargz_opt.digest import Hasher, digest_of, hasher, hasher_for, matches
from estargz_opt.stores.containerd import rpcs, wire
from estargz_opt.stores.containerd._pb import content_pb2
from estargz_opt.stores.containerd.errors import (
    AlreadyExistsError,
    ContainerdError,
    FailedPreconditionError,
    IngestLockedError,
    NotFoundError,
)
from estargz_opt.stores.containerd.model import ContentInfo, IngestStatus, WriteResult
from estargz_opt.stores.containerd.transport import Service, Subject, Transport

log = logging.getLogger("estargz_opt.stores.containerd")

_CHUNK = 1 << 20  # bytes per Write message; containerd reads 1 MiB per Read message too
_LOCK_WAIT = 10.0  # seconds to wait for an ingest another (dying) stream still holds
_SPOOL_IN_MEMORY = 8 << 20
_CLOSE_WAIT = 10.0  # seconds to wait for containerd to end a write stream we leave

Data = bytes | BinaryIO | Iterable[bytes]


class ContentService(Service):
    """Blobs in one namespace's content store."""

    def info(self, digest: str) -> ContentInfo:
        r = self._t.unary(
            rpcs.CONTENT_INFO, content_pb2.InfoRequest(digest=digest), Subject("content", digest)
        )
        return wire.info(r.info)

    def update_labels(
        self, digest: str, labels: Mapping[str, str], *, replace: bool = False
    ) -> ContentInfo:
        """Set the given labels on a blob (an empty value removes one).

        With replace=True the blob keeps exactly `labels`.
        """
        paths = ["labels"] if replace else [f"labels.{k}" for k in labels]
        if not paths:
            return self.info(digest)
        req = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=dict(labels)),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )
        return wire.info(self._t.unary(rpcs.CONTENT_UPDATE, req, Subject("content", digest)).info)

    def delete(self, digest: str) -> None:
        req = content_pb2.DeleteContentRequest(digest=digest)
        self._t.unary(rpcs.CONTENT_DELETE, req, Subject("content", digest))

    def read(self, digest: str, offset: int = 0, size: int = 0) -> Iterator[bytes]:
        """The blob's bytes, streamed (from `offset`, `size` bytes; 0 means to the end)."""
        req = content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size)
        for resp in self._t.server_stream(rpcs.CONTENT_READ, req, Subject("content", digest)):
            if resp.data:
                yield resp.data

    def read_all(self, digest: str, *, verify: bool = True) -> bytes:
        """A whole (small) blob; checked against its digest unless verify=False."""
        data = b"".join(self.read(digest))
        if verify and not matches(digest, data):
            raise ContainerdError(f"content {digest} read from containerd does not match it")
        return data

    def status(self, ref: str) -> IngestStatus | None:
        """The ingest `ref`, or None if there is none."""
        try:
            r = self._t.unary(
                rpcs.CONTENT_STATUS, content_pb2.StatusRequest(ref=ref), Subject("ingest", ref)
            )
        except NotFoundError:
            return None
        return wire.status(r.status)

    def list_statuses(self, *filters: str) -> list[IngestStatus]:
        req = content_pb2.ListStatusesRequest(filters=filters)
        return [wire.status(s) for s in self._t.unary(rpcs.CONTENT_STATUSES, req).statuses]

    def abort(self, ref: str, *, missing_ok: bool = True) -> None:
        """Drop the ingest `ref` and what it holds."""
        try:
            req = content_pb2.AbortRequest(ref=ref)
            self._t.unary(rpcs.CONTENT_ABORT, req, Subject("ingest", ref))
        except NotFoundError:
            if not missing_ok:
                raise

    def write(
        self,
        ref: str,
        data: Data,
        expected_digest: str | None = None,
        expected_size: int | None = None,
        labels: Mapping[str, str] | None = None,
        *,
        lease: str | None = None,
    ) -> WriteResult:
        """Store a blob through the ingest `ref` and commit it with `labels`.

        An ingest left by an interrupted run under the same ref is resumed when the
        bytes it holds are a prefix of `data` (checked by digest), and restarted
        otherwise, so rerunning after a crash never fails on a stale ingest. A blob
        that is already stored is not written again; `labels` are added to it. Pass the
        lease that must hold the blob until something references it.
        """
        deadline = time.monotonic() + _LOCK_WAIT
        while True:
            try:
                with Ingest(self._t, ref, expected_digest, expected_size, lease) as ingest:
                    held = ingest.stat()
                    ingest.write(ingest.resume(_chunks(data), held))
                    return ingest.commit(labels or {})
            except IngestLockedError:
                # The stream of a killed writer may hold the ref for a moment.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
            except AlreadyExistsError as exc:
                digest = expected_digest or (exc.digest if isinstance(exc, _Exists) else None)
                if digest is None:
                    raise
                # Same bytes, already stored: still make sure of the labels.
                info = self.update_labels(digest, labels or {})
                return WriteResult(digest=info.digest, size=info.size, existed=True)


@dataclass(frozen=True, slots=True)
class Held:
    """What an ingest already holds when a write stream opens (STAT's answer)."""

    offset: int
    digest: str


class _Exists(AlreadyExistsError):
    """The committed blob is already stored, under `digest`."""

    def __init__(self, message: str, code: grpc.StatusCode | None, digest: str) -> None:
        super().__init__(message, code)
        self.digest = digest


class Ingest:
    """One Write stream into the ingest `ref`: stat, resume, write, commit — in that order.

    - stat: ask what the ingest already holds (an interrupted run's bytes);
    - resume: skip that many bytes of the data if they hash to what the ingest holds,
      otherwise start over from offset 0 (the first write truncates the stale ingest);
    - write: send the rest, each message answered with the new offset;
    - commit: containerd checks size and digest, then stores the labels with the blob.

    Use it as a context manager: leaving it half-closes the stream and waits for
    containerd to end it, so that the ingest is released before anyone touches it again.
    """

    def __init__(
        self,
        transport: Transport,
        ref: str,
        expected_digest: str | None,
        expected_size: int | None,
        lease: str | None = None,
    ) -> None:
        self.ref = ref
        self.expected_digest = expected_digest
        self.expected_size = expected_size
        self.offset = 0
        self.resumed_from = 0
        # Without an expected digest we hash locally, to name the blob when committing.
        self._hasher: Hasher | None = hasher() if expected_digest is None else None
        self._transport = transport
        self._lease = lease
        self._subject = (
            Subject("content", expected_digest) if expected_digest else Subject("ingest", ref)
        )
        self._requests: queue.SimpleQueue[content_pb2.WriteContentRequest | None] = (
            queue.SimpleQueue()
        )
        self._cleanup = contextlib.ExitStack()
        self._call: Any = None

    def __enter__(self) -> Ingest:
        self._call = self._transport.bidi(rpcs.CONTENT_WRITE, self._pump(), self._lease)
        self._cleanup.callback(self._close)
        return self

    def __exit__(self, *exc: object) -> None:
        self._cleanup.close()

    # -------------------------------------------------------------- the steps

    def stat(self) -> Held:
        resp = self._exchange(
            action=content_pb2.STAT,
            total=self.expected_size or 0,
            expected=self.expected_digest or "",
        )
        return Held(offset=resp.offset, digest=resp.digest)

    def resume(self, chunks: Iterator[bytes], held: Held) -> Iterator[bytes]:
        """The chunks still to send: without the held prefix if it is ours."""
        if held.offset == 0:
            return chunks
        if self.expected_size is not None and held.offset > self.expected_size:
            log.debug("ingest %s held %d bytes: restarting", self.ref, held.offset)
            return chunks
        # closed with the stream, by the ExitStack
        spool = self._cleanup.enter_context(
            tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115
        )
        ok, rest = _skip_prefix(chunks, held, self._hasher, spool)
        if ok:
            self.offset = self.resumed_from = held.offset
        elif self._hasher is not None:
            self._hasher = hasher()
        log.debug(
            "ingest %s held %d bytes: %s", self.ref, held.offset, "resuming" if ok else "restarting"
        )
        return rest

    def write(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            if self._hasher is not None:
                self._hasher.update(chunk)
            # offset 0 on the first write truncates a stale ingest we do not resume
            resp = self._exchange(action=content_pb2.WRITE, offset=self.offset, data=chunk)
            self.offset += len(chunk)
            if resp.offset != self.offset:
                raise ContainerdError(
                    f"containerd holds {resp.offset} bytes of {self.ref}, expected {self.offset}"
                )

    def commit(self, labels: Mapping[str, str]) -> WriteResult:
        if self.expected_size is not None and self.offset != self.expected_size:
            raise FailedPreconditionError(
                f"blob {self.expected_digest or self.ref} has {self.offset} bytes, "
                f"expected {self.expected_size}"
            )
        if self.expected_digest is not None:
            digest = self.expected_digest
        else:
            assert self._hasher is not None
            digest = digest_of(self._hasher)
        try:
            done = self._exchange(
                action=content_pb2.COMMIT,
                offset=self.offset,
                total=self.offset,
                expected=digest,
                labels=dict(labels),
            )
        except AlreadyExistsError as exc:
            raise _Exists(str(exc), exc.code, digest) from None
        return WriteResult(
            digest=done.digest or digest, size=self.offset, resumed_from=self.resumed_from
        )

    # -------------------------------------------------------------- the stream

    def _pump(self) -> Iterator[content_pb2.WriteContentRequest]:
        while (req := self._requests.get()) is not None:
            yield req

    def _exchange(self, **fields: Any) -> content_pb2.WriteContentResponse:
        # containerd answers every request on this stream exactly once.
        self._requests.put(content_pb2.WriteContentRequest(ref=self.ref, **fields))
        try:
            resp: content_pb2.WriteContentResponse = next(self._call)
        except StopIteration:
            raise ContainerdError(
                f"containerd closed the write stream of {self.ref} early"
            ) from None
        except grpc.RpcError as exc:
            raise self._transport.error(exc, rpcs.CONTENT_WRITE, self._subject) from None
        return resp

    def _close(self) -> None:
        # Half-close and wait for containerd to end the stream: only then has it
        # released the ingest, so an abort or a rewrite right after us cannot race
        # the write handler of this stream (cancelling would not wait for that).
        self._requests.put(None)
        timer = threading.Timer(_CLOSE_WAIT, self._call.cancel)
        timer.start()
        try:
            for _ in self._call:
                pass
        except grpc.RpcError:
            pass
        finally:
            timer.cancel()


def _chunks(data: Data) -> Iterator[bytes]:
    """The data as pieces of at most _CHUNK bytes, empty pieces skipped."""
    if isinstance(data, bytes | bytearray | memoryview):
        pieces: Iterable[bytes] = (bytes(data),)
    elif hasattr(data, "read"):
        reader = cast(BinaryIO, data)
        pieces = iter(lambda: reader.read(_CHUNK), b"")
    else:
        pieces = data
    for piece in pieces:
        for start in range(0, len(piece), _CHUNK):
            yield bytes(piece[start : start + _CHUNK])


def _skip_prefix(
    chunks: Iterator[bytes], held: Held, local: Hasher | None, spool: IO[bytes]
) -> tuple[bool, Iterator[bytes]]:
    """Consume the first `held.offset` bytes of `chunks` if their digest is `held.digest`.

    Returns (True, the rest) with `local` (if any) fed the prefix; otherwise (False,
    all the chunks again, the consumed ones replayed from `spool`).
    """
    check = hasher_for(held.digest)
    if check is None:
        return False, chunks
    n = held.offset
    taken, tail = 0, b""
    for chunk in chunks:
        head, tail = chunk[: n - taken], chunk[n - taken :]
        check.update(head)
        if local is not None:
            local.update(head)
        spool.write(head)
        taken += len(head)
        if taken == n:
            break
    rest = itertools.chain([tail] if tail else [], chunks)
    if taken == n and digest_of(check) == held.digest:
        return True, rest
    spool.seek(0)
    return False, itertools.chain(iter(lambda: spool.read(_CHUNK), b""), rest)
