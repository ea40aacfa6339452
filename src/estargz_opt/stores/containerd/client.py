"""A small, typed containerd client over gRPC.

We talk to containerd's API directly with grpcio and our own minimal message
definitions (protos/, compiled into _pb/), instead of the PyPI `containerd`
package, whose stale generated code does not import with current protobuf.

Every call carries the `containerd-namespace` header, and inside `Client.lease()`
also `containerd-lease`, so what we write cannot be garbage-collected half-way.
gRPC failures become ContainerdError subclasses whose messages are one line the
user can act on (the CLI prints them as they are).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import queue
import secrets
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

import grpc
from google.protobuf import any_pb2, empty_pb2, field_mask_pb2

from estargz_opt.descriptor import Descriptor
from estargz_opt.errors import EstargzOptError
from estargz_opt.mount import Mount as Mount  # re-exported: the client returns it
from estargz_opt.stores.containerd._pb import (
    containers_pb2,
    content_pb2,
    diff_pb2,
    images_pb2,
    introspection_pb2,
    leases_pb2,
    namespaces_pb2,
    snapshots_pb2,
    tasks_pb2,
    types_pb2,
    version_pb2,
)

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"
DEFAULT_SNAPSHOTTER = "overlayfs"
DEFAULT_RUNTIME = "io.containerd.runc.v2"
#: The type URL containerd gives an OCI runtime spec (JSON) inside a container record.
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
GC_EXPIRE_LABEL = "containerd.io/gc.expire"
#: How long a lease outlives a run that dies without deleting it.
DEFAULT_LEASE_EXPIRY = timedelta(hours=6)

_CHUNK = 1 << 20  # bytes per Write message; containerd reads 1 MiB per Read message too
_MAX_MESSAGE = 16 << 20  # containerd's own gRPC message limit
_LOCK_WAIT = 10.0  # seconds to wait for an ingest another (dying) stream still holds
_SPOOL_IN_MEMORY = 8 << 20
_CLOSE_WAIT = 10.0  # seconds to wait for containerd to end a write stream we leave

_HOW_TO_POINT = (
    "point estargz-opt at a running containerd with -a/--address or CONTAINERD_ADDRESS, "
    "or start one (e.g. sudo systemctl start containerd)"
)


# ---------------------------------------------------------------------- errors


class ContainerdError(EstargzOptError):
    """containerd could not be reached, or refused or failed a request."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ContainerdUnavailableError(ContainerdError):
    """No containerd answers at the address (missing socket, refused, died mid-run)."""


class ContainerdPermissionError(ContainerdError):
    """The socket exists but this user may not connect to it."""


class NotFoundError(ContainerdError):
    """The named object does not exist in the namespace."""


class ImageNotFoundError(NotFoundError):
    pass


class ContentNotFoundError(NotFoundError):
    pass


class NamespaceNotFoundError(NotFoundError):
    pass


class AlreadyExistsError(ContainerdError):
    pass


class FailedPreconditionError(ContainerdError):
    """containerd refused a request in the current state (e.g. a commit that does not verify)."""


class IngestLockedError(ContainerdError):
    """Another write stream holds the ingest ref."""


# ---------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class Version:
    version: str
    revision: str


@dataclass(frozen=True, slots=True)
class Plugin:
    type: str
    id: str
    requires: list[str] = field(default_factory=list)
    platforms: list[str] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ContentInfo:
    digest: str
    size: int
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class IngestStatus:
    """A write in progress (or left behind by an interrupted one)."""

    ref: str
    offset: int
    total: int
    expected: str
    started_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class WriteResult:
    digest: str
    size: int
    #: bytes kept from an earlier, interrupted ingest of the same ref (0: written from scratch)
    resumed_from: int = 0
    #: the blob was already in the store; only its labels were applied
    existed: bool = False


@dataclass(slots=True)
class Image:
    """An image record: a name pointing at a descriptor (manifest or index), plus labels."""

    name: str
    target: Descriptor
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Lease:
    id: str
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    name: str
    parent: str
    #: "view", "active" or "committed"
    kind: str
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Container:
    """A container record: what a task is created from."""

    id: str
    #: the OCI runtime spec, as JSON bytes
    spec: bytes
    image: str = ""
    runtime: str = DEFAULT_RUNTIME
    snapshotter: str = ""
    snapshot_key: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class TaskState:
    """A task's (or process's) state as containerd reports it."""

    container_id: str
    pid: int
    #: "unknown", "created", "running", "stopped", "paused" or "pausing"
    status: str
    exit_status: int = 0
    exited_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class TaskExit:
    exit_status: int
    exited_at: datetime | None = None


# ---------------------------------------------------------------------- RPC table

_UNARY, _SERVER_STREAM, _BIDI = "unary_unary", "unary_stream", "stream_stream"
_CONTENT = "containerd.services.content.v1.Content"
_IMAGES = "containerd.services.images.v1.Images"
_LEASES = "containerd.services.leases.v1.Leases"
_NAMESPACES = "containerd.services.namespaces.v1.Namespaces"
_INTROSPECTION = "containerd.services.introspection.v1.Introspection"
_VERSION = "containerd.services.version.v1.Version"
_SNAPSHOTS = "containerd.services.snapshots.v1.Snapshots"
_CONTAINERS = "containerd.services.containers.v1.Containers"
_TASKS = "containerd.services.tasks.v1.Tasks"
_DIFF = "containerd.services.diff.v1.Diff"


@dataclass(frozen=True, slots=True)
class _Rpc:
    service: str
    method: str
    request: Any
    response: Any
    kind: str = _UNARY

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    def bind(self, channel: grpc.Channel) -> Callable[..., Any]:
        return getattr(channel, self.kind)(
            self.path,
            request_serializer=self.request.SerializeToString,
            response_deserializer=self.response.FromString,
        )


# The stubs we use, declared here rather than generated (*_pb2_grpc.py would pin
# the grpcio release that generated them). tests check this against the .proto files.
RPCS: dict[str, _Rpc] = {
    "version": _Rpc(_VERSION, "Version", empty_pb2.Empty, version_pb2.VersionResponse),
    "plugins": _Rpc(
        _INTROSPECTION,
        "Plugins",
        introspection_pb2.PluginsRequest,
        introspection_pb2.PluginsResponse,
    ),
    "server": _Rpc(_INTROSPECTION, "Server", empty_pb2.Empty, introspection_pb2.ServerResponse),
    "namespace_list": _Rpc(
        _NAMESPACES,
        "List",
        namespaces_pb2.ListNamespacesRequest,
        namespaces_pb2.ListNamespacesResponse,
    ),
    "content_info": _Rpc(_CONTENT, "Info", content_pb2.InfoRequest, content_pb2.InfoResponse),
    "content_update": _Rpc(
        _CONTENT, "Update", content_pb2.UpdateRequest, content_pb2.UpdateResponse
    ),
    "content_delete": _Rpc(_CONTENT, "Delete", content_pb2.DeleteContentRequest, empty_pb2.Empty),
    "content_read": _Rpc(
        _CONTENT,
        "Read",
        content_pb2.ReadContentRequest,
        content_pb2.ReadContentResponse,
        _SERVER_STREAM,
    ),
    "content_status": _Rpc(
        _CONTENT, "Status", content_pb2.StatusRequest, content_pb2.StatusResponse
    ),
    "content_list_statuses": _Rpc(
        _CONTENT,
        "ListStatuses",
        content_pb2.ListStatusesRequest,
        content_pb2.ListStatusesResponse,
    ),
    "content_write": _Rpc(
        _CONTENT,
        "Write",
        content_pb2.WriteContentRequest,
        content_pb2.WriteContentResponse,
        _BIDI,
    ),
    "content_abort": _Rpc(_CONTENT, "Abort", content_pb2.AbortRequest, empty_pb2.Empty),
    "image_get": _Rpc(_IMAGES, "Get", images_pb2.GetImageRequest, images_pb2.GetImageResponse),
    "image_list": _Rpc(
        _IMAGES, "List", images_pb2.ListImagesRequest, images_pb2.ListImagesResponse
    ),
    "image_create": _Rpc(
        _IMAGES, "Create", images_pb2.CreateImageRequest, images_pb2.CreateImageResponse
    ),
    "image_update": _Rpc(
        _IMAGES, "Update", images_pb2.UpdateImageRequest, images_pb2.UpdateImageResponse
    ),
    "image_delete": _Rpc(_IMAGES, "Delete", images_pb2.DeleteImageRequest, empty_pb2.Empty),
    "lease_create": _Rpc(_LEASES, "Create", leases_pb2.CreateRequest, leases_pb2.CreateResponse),
    "lease_delete": _Rpc(_LEASES, "Delete", leases_pb2.DeleteRequest, empty_pb2.Empty),
    "lease_list": _Rpc(_LEASES, "List", leases_pb2.ListRequest, leases_pb2.ListResponse),
    "lease_add_resource": _Rpc(
        _LEASES, "AddResource", leases_pb2.AddResourceRequest, empty_pb2.Empty
    ),
    "snapshot_prepare": _Rpc(
        _SNAPSHOTS,
        "Prepare",
        snapshots_pb2.PrepareSnapshotRequest,
        snapshots_pb2.PrepareSnapshotResponse,
    ),
    "snapshot_view": _Rpc(
        _SNAPSHOTS, "View", snapshots_pb2.ViewSnapshotRequest, snapshots_pb2.ViewSnapshotResponse
    ),
    "snapshot_mounts": _Rpc(
        _SNAPSHOTS, "Mounts", snapshots_pb2.MountsRequest, snapshots_pb2.MountsResponse
    ),
    "snapshot_commit": _Rpc(
        _SNAPSHOTS, "Commit", snapshots_pb2.CommitSnapshotRequest, empty_pb2.Empty
    ),
    "snapshot_remove": _Rpc(
        _SNAPSHOTS, "Remove", snapshots_pb2.RemoveSnapshotRequest, empty_pb2.Empty
    ),
    "snapshot_stat": _Rpc(
        _SNAPSHOTS, "Stat", snapshots_pb2.StatSnapshotRequest, snapshots_pb2.StatSnapshotResponse
    ),
    "snapshot_list": _Rpc(
        _SNAPSHOTS,
        "List",
        snapshots_pb2.ListSnapshotsRequest,
        snapshots_pb2.ListSnapshotsResponse,
        _SERVER_STREAM,
    ),
    "container_get": _Rpc(
        _CONTAINERS,
        "Get",
        containers_pb2.GetContainerRequest,
        containers_pb2.GetContainerResponse,
    ),
    "container_create": _Rpc(
        _CONTAINERS,
        "Create",
        containers_pb2.CreateContainerRequest,
        containers_pb2.CreateContainerResponse,
    ),
    "container_delete": _Rpc(
        _CONTAINERS, "Delete", containers_pb2.DeleteContainerRequest, empty_pb2.Empty
    ),
    "container_list": _Rpc(
        _CONTAINERS,
        "List",
        containers_pb2.ListContainersRequest,
        containers_pb2.ListContainersResponse,
    ),
    "task_create": _Rpc(
        _TASKS, "Create", tasks_pb2.CreateTaskRequest, tasks_pb2.CreateTaskResponse
    ),
    "task_start": _Rpc(_TASKS, "Start", tasks_pb2.StartRequest, tasks_pb2.StartResponse),
    "task_delete": _Rpc(_TASKS, "Delete", tasks_pb2.DeleteTaskRequest, tasks_pb2.DeleteResponse),
    "task_get": _Rpc(_TASKS, "Get", tasks_pb2.GetRequest, tasks_pb2.GetResponse),
    "task_kill": _Rpc(_TASKS, "Kill", tasks_pb2.KillRequest, empty_pb2.Empty),
    "task_wait": _Rpc(_TASKS, "Wait", tasks_pb2.WaitRequest, tasks_pb2.WaitResponse),
    "task_close_io": _Rpc(_TASKS, "CloseIO", tasks_pb2.CloseIORequest, empty_pb2.Empty),
    "task_resize_pty": _Rpc(_TASKS, "ResizePty", tasks_pb2.ResizePtyRequest, empty_pb2.Empty),
    "diff_apply": _Rpc(_DIFF, "Apply", diff_pb2.ApplyRequest, diff_pb2.ApplyResponse),
}


# ---------------------------------------------------------------------- client


class Client:
    """A connection to one containerd, working in one namespace.

    `timeout` (seconds) bounds each unary call; streamed reads and writes are not
    bounded, since a large blob may legitimately take long.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        namespace: str = DEFAULT_NAMESPACE,
        timeout: float | None = None,
    ) -> None:
        if not namespace:
            raise ContainerdError(
                "a containerd namespace is required: pass -n/--namespace or set "
                "CONTAINERD_NAMESPACE (ctr's default is 'default')"
            )
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self._path = socket_path(address)
        self._channel = grpc.insecure_channel(
            f"unix:{self._path}",
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.max_send_message_length", _MAX_MESSAGE),
            ],
        )
        self._stubs = {name: rpc.bind(self._channel) for name, rpc in RPCS.items()}
        self._lease: str | None = None

    # -------------------------------------------------------------- lifecycle

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- plumbing

    def _metadata(self) -> list[tuple[str, str]]:
        md = [(NAMESPACE_HEADER, self.namespace)]
        if self._lease:
            md.append((LEASE_HEADER, self._lease))
        return md

    def _call(
        self,
        name: str,
        request: Any,
        subject: tuple[str, str] | None = None,
        *,
        unbounded: bool = False,
    ) -> Any:
        """One unary call; `unbounded` lifts the timeout (for calls that block by design)."""
        log.debug("containerd %s %s", RPCS[name].path, subject[1] if subject else "")
        timeout = None if unbounded else self.timeout
        try:
            return self._stubs[name](request, timeout=timeout, metadata=self._metadata())
        except grpc.RpcError as exc:
            raise self._error(exc, RPCS[name].path, subject) from None

    def _error(
        self, exc: grpc.RpcError, path: str, subject: tuple[str, str] | None
    ) -> ContainerdError:
        """Turn a gRPC failure into an error that says what to do about it."""
        code: grpc.StatusCode | None = exc.code() if isinstance(exc, grpc.Call) else None
        details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
        details = " ".join(details.split())
        if code is not None:
            # containerd appends its error class (": not found"); we name it ourselves.
            details = details.removesuffix(": " + code.name.lower().replace("_", " "))
        what = f"{subject[0]} {subject[1]}" if subject else path.rsplit("/", 1)[-1]
        if code == grpc.StatusCode.UNAVAILABLE and "locked" in details:
            return IngestLockedError(f"containerd: {what}: {details}", code)
        if code == grpc.StatusCode.UNAVAILABLE:
            return self._unreachable(details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            within = f" within {self.timeout:g} s (raise --timeout?)" if self.timeout else ""
            return ContainerdUnavailableError(
                f"containerd at {self.address} did not answer {what}{within}", code
            )
        if code == grpc.StatusCode.NOT_FOUND:
            if not self._namespace_exists_quietly():
                return NamespaceNotFoundError(self._no_namespace_message(), code)
            kind, cls = {
                "image": ("image", ImageNotFoundError),
                "content": ("content", ContentNotFoundError),
            }.get(subject[0] if subject else "", ("", NotFoundError))
            if kind:
                return cls(
                    f"{kind} {subject[1]} not found in containerd namespace {self.namespace!r}",
                    code,
                )
            return NotFoundError(f"containerd: {what} not found: {details}", code)
        if code == grpc.StatusCode.ALREADY_EXISTS:
            return AlreadyExistsError(f"containerd: {what} already exists: {details}", code)
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            if "namespace is required" in details:
                return ContainerdError(
                    "containerd wants a namespace: pass -n/--namespace or set CONTAINERD_NAMESPACE",
                    code,
                )
            return FailedPreconditionError(
                f"containerd refused {what} (failed precondition): {details}", code
            )
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return ContainerdPermissionError(f"containerd: {what}: {details}", code)
        name = code.name.lower() if code is not None else "error"
        return ContainerdError(f"containerd: {what} failed ({name}): {details}", code)

    def _unreachable(self, details: str) -> ContainerdError:
        problem = probe_socket(self._path)
        if problem == "missing":
            return ContainerdUnavailableError(
                f"no containerd socket at {self.address}: {_HOW_TO_POINT}"
            )
        if problem == "refused":
            return ContainerdUnavailableError(
                f"containerd is not listening at {self.address} (connection refused, "
                f"a stale socket?): {_HOW_TO_POINT}"
            )
        if problem == "permission":
            return ContainerdPermissionError(
                f"permission denied on containerd socket {self.address}: run as root "
                "(e.g. with sudo) or as a user allowed to open the socket"
            )
        if problem:
            return ContainerdUnavailableError(
                f"cannot connect to containerd at {self.address}: {problem}; {_HOW_TO_POINT}"
            )
        return ContainerdUnavailableError(
            f"containerd at {self.address} is unavailable ({details}); is it still running?"
        )

    def _namespace_exists_quietly(self) -> bool:
        try:
            return self.namespace_exists(self.namespace)
        except ContainerdError:
            return True  # cannot tell; report the original error

    def _no_namespace_message(self) -> str:
        try:
            names = ", ".join(self.namespaces()) or "none"
        except ContainerdError:
            names = "unknown"
        return (
            f"containerd namespace {self.namespace!r} does not exist "
            f"(namespaces: {names}); choose one with -n/--namespace or CONTAINERD_NAMESPACE"
        )

    # -------------------------------------------------------------- server

    def version(self) -> Version:
        r = self._call("version", empty_pb2.Empty())
        return Version(version=r.version, revision=r.revision)

    def server_uuid(self) -> str:
        return self._call("server", empty_pb2.Empty()).uuid

    def plugins(self, *filters: str) -> list[Plugin]:
        r = self._call("plugins", introspection_pb2.PluginsRequest(filters=filters))
        return [
            Plugin(
                type=p.type,
                id=p.id,
                requires=list(p.requires),
                platforms=[
                    "/".join(x for x in (q.os, q.architecture, q.variant) if x) for q in p.platforms
                ],
                exports=dict(p.exports),
                capabilities=list(p.capabilities),
            )
            for p in r.plugins
        ]

    def namespaces(self) -> list[str]:
        r = self._call("namespace_list", namespaces_pb2.ListNamespacesRequest())
        return sorted(n.name for n in r.namespaces)

    def namespace_exists(self, name: str) -> bool:
        return name in self.namespaces()

    # -------------------------------------------------------------- content

    def content_info(self, digest: str) -> ContentInfo:
        r = self._call("content_info", content_pb2.InfoRequest(digest=digest), ("content", digest))
        return _info(r.info)

    def update_labels(
        self, digest: str, labels: Mapping[str, str], *, replace: bool = False
    ) -> ContentInfo:
        """Set the given labels on a blob (an empty value removes one).

        With replace=True the blob keeps exactly `labels`.
        """
        paths = ["labels"] if replace else [f"labels.{k}" for k in labels]
        if not paths:
            return self.content_info(digest)
        req = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=dict(labels)),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )
        return _info(self._call("content_update", req, ("content", digest)).info)

    def delete_content(self, digest: str) -> None:
        self._call(
            "content_delete", content_pb2.DeleteContentRequest(digest=digest), ("content", digest)
        )

    def read_content(self, digest: str, offset: int = 0, size: int = 0) -> Iterator[bytes]:
        """The blob's bytes, streamed (from `offset`, `size` bytes; 0 means to the end)."""
        req = content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size)
        log.debug("containerd %s %s", RPCS["content_read"].path, digest)
        stream = self._stubs["content_read"](req, metadata=self._metadata())
        try:
            for resp in stream:
                if resp.data:
                    yield resp.data
        except grpc.RpcError as exc:
            raise self._error(exc, RPCS["content_read"].path, ("content", digest)) from None
        finally:
            stream.cancel()

    def read_all(self, digest: str, *, verify: bool = True) -> bytes:
        """A whole (small) blob; checked against its digest unless verify=False."""
        data = b"".join(self.read_content(digest))
        if verify:
            algo, _, want = digest.partition(":")
            if algo in hashlib.algorithms_available and hashlib.new(algo, data).hexdigest() != want:
                raise ContainerdError(f"content {digest} read from containerd does not match it")
        return data

    def ingest_status(self, ref: str) -> IngestStatus | None:
        """The ingest `ref`, or None if there is none."""
        try:
            r = self._call("content_status", content_pb2.StatusRequest(ref=ref), ("ingest", ref))
        except NotFoundError:
            return None
        return _status(r.status)

    def list_ingests(self, *filters: str) -> list[IngestStatus]:
        r = self._call("content_list_statuses", content_pb2.ListStatusesRequest(filters=filters))
        return [_status(s) for s in r.statuses]

    def abort(self, ref: str, *, missing_ok: bool = True) -> None:
        """Drop the ingest `ref` and what it holds."""
        try:
            self._call("content_abort", content_pb2.AbortRequest(ref=ref), ("ingest", ref))
        except NotFoundError:
            if not missing_ok:
                raise

    def write_content(
        self,
        ref: str,
        data: bytes | BinaryIO | Iterable[bytes],
        expected_digest: str | None = None,
        expected_size: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> WriteResult:
        """Store a blob through the ingest `ref` and commit it with `labels`.

        An ingest left by an interrupted run under the same ref is resumed when the
        bytes it holds are a prefix of `data` (checked by digest), and restarted
        otherwise, so rerunning after a crash never fails on a stale ingest. A blob
        that is already stored is not written again; `labels` are added to it.
        """
        deadline = time.monotonic() + _LOCK_WAIT
        while True:
            try:
                return self._write(ref, data, expected_digest, expected_size, labels or {})
            except IngestLockedError:
                # The stream of a killed writer may hold the ref for a moment.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
            except AlreadyExistsError:
                if expected_digest is None:
                    raise
                info = self.update_labels(expected_digest, labels or {})
                return WriteResult(digest=info.digest, size=info.size, existed=True)

    def _write(
        self,
        ref: str,
        data: bytes | BinaryIO | Iterable[bytes],
        expected_digest: str | None,
        expected_size: int | None,
        labels: Mapping[str, str],
    ) -> WriteResult:
        rpc = RPCS["content_write"]
        subject = ("content", expected_digest) if expected_digest else ("ingest", ref)
        requests: queue.SimpleQueue[content_pb2.WriteContentRequest | None] = queue.SimpleQueue()

        def pump() -> Iterator[content_pb2.WriteContentRequest]:
            while (req := requests.get()) is not None:
                yield req

        log.debug("containerd %s %s", rpc.path, ref)
        call = self._stubs["content_write"](pump(), metadata=self._metadata())

        def exchange(**fields: Any) -> content_pb2.WriteContentResponse:
            # containerd answers every request on this stream exactly once.
            requests.put(content_pb2.WriteContentRequest(ref=ref, **fields))
            try:
                return next(call)
            except StopIteration:
                raise ContainerdError(
                    f"containerd closed the write stream of {ref} early"
                ) from None
            except grpc.RpcError as exc:
                raise self._error(exc, rpc.path, subject) from None

        def close() -> None:
            # Half-close and wait for containerd to end the stream: only then has it
            # released the ingest, so an abort or a rewrite right after us cannot race
            # the write handler of this stream (cancelling would not wait for that).
            requests.put(None)
            timer = threading.Timer(_CLOSE_WAIT, call.cancel)
            timer.start()
            try:
                for _ in call:
                    pass
            except grpc.RpcError:
                pass
            finally:
                timer.cancel()

        with contextlib.ExitStack() as cleanup:
            cleanup.callback(close)
            stat = exchange(
                action=content_pb2.STAT,
                total=expected_size or 0,
                expected=expected_digest or "",
            )
            chunks = _chunks(data)
            # Without an expected digest we hash locally, to name the blob if it exists.
            hasher = hashlib.sha256() if expected_digest is None else None
            offset = 0
            if stat.offset > 0:
                if expected_size is None or stat.offset <= expected_size:
                    spool = cleanup.enter_context(
                        tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)
                    )
                    resumed, chunks = _skip_prefix(chunks, stat.offset, stat.digest, hasher, spool)
                    if resumed:
                        offset = stat.offset
                    elif hasher is not None:
                        hasher = hashlib.sha256()
                log.debug(
                    "ingest %s held %d bytes: %s",
                    ref,
                    stat.offset,
                    "resuming" if offset else "restarting",
                )
            resumed_from = offset
            for chunk in chunks:
                if hasher is not None:
                    hasher.update(chunk)
                # offset 0 on the first write truncates a stale ingest we do not resume
                resp = exchange(action=content_pb2.WRITE, offset=offset, data=chunk)
                offset += len(chunk)
                if resp.offset != offset:
                    raise ContainerdError(
                        f"containerd holds {resp.offset} bytes of {ref}, expected {offset}"
                    )
            if expected_size is not None and offset != expected_size:
                raise FailedPreconditionError(
                    f"blob {expected_digest or ref} has {offset} bytes, expected {expected_size}"
                )
            digest = expected_digest or "sha256:" + hasher.hexdigest()  # type: ignore[union-attr]
            try:
                # containerd verifies size and digest, then stores the labels with the blob.
                done = exchange(
                    action=content_pb2.COMMIT,
                    offset=offset,
                    total=offset,
                    expected=digest,
                    labels=dict(labels),
                )
            except AlreadyExistsError:
                if expected_digest is None:
                    # Same bytes, already stored: still make sure of the labels.
                    info = self.update_labels(digest, labels)
                    return WriteResult(digest=digest, size=info.size, existed=True)
                raise
            return WriteResult(digest=done.digest or digest, size=offset, resumed_from=resumed_from)

    # -------------------------------------------------------------- images

    def get_image(self, name: str) -> Image:
        r = self._call("image_get", images_pb2.GetImageRequest(name=name), ("image", name))
        return _image(r.image)

    def list_images(self, *filters: str) -> list[Image]:
        r = self._call("image_list", images_pb2.ListImagesRequest(filters=filters))
        return [_image(i) for i in r.images]

    def create_image(self, image: Image) -> Image:
        req = images_pb2.CreateImageRequest(image=_image_pb(image))
        return _image(self._call("image_create", req, ("image", image.name)).image)

    def update_image(self, image: Image, fields: Sequence[str] = ()) -> Image:
        """Update an image record; `fields` limits which (e.g. "target", "labels.<key>").

        With no fields, the target and all labels are replaced.
        """
        req = images_pb2.UpdateImageRequest(
            image=_image_pb(image), update_mask=field_mask_pb2.FieldMask(paths=list(fields))
        )
        return _image(self._call("image_update", req, ("image", image.name)).image)

    def put_image(self, image: Image) -> Image:
        """Create the image record, or point the existing one at the new target and labels."""
        try:
            return self.create_image(image)
        except AlreadyExistsError:
            return self.update_image(image)

    def delete_image(self, name: str, *, sync: bool = False) -> None:
        """Delete an image record; sync=True also waits for garbage collection."""
        self._call(
            "image_delete", images_pb2.DeleteImageRequest(name=name, sync=sync), ("image", name)
        )

    # -------------------------------------------------------------- leases

    def create_lease(
        self, lease_id: str | None = None, labels: Mapping[str, str] | None = None
    ) -> Lease:
        lease_id = lease_id or f"estargz-opt-{int(time.time())}-{secrets.token_hex(4)}"
        req = leases_pb2.CreateRequest(id=lease_id, labels=dict(labels or {}))
        return _lease(self._call("lease_create", req, ("lease", lease_id)).lease)

    def delete_lease(self, lease_id: str, *, sync: bool = False) -> None:
        """Delete a lease; sync=True also waits for the garbage collection it allows."""
        req = leases_pb2.DeleteRequest(id=lease_id, sync=sync)
        self._call("lease_delete", req, ("lease", lease_id))

    def list_leases(self, *filters: str) -> list[Lease]:
        r = self._call("lease_list", leases_pb2.ListRequest(filters=filters))
        return [_lease(x) for x in r.leases]

    def add_lease_resource(self, lease_id: str, resource_id: str, type: str = "content") -> None:
        """Make a lease hold an existing object too (type "content": a blob digest)."""
        req = leases_pb2.AddResourceRequest(
            id=lease_id, resource=leases_pb2.Resource(id=resource_id, type=type)
        )
        self._call("lease_add_resource", req, ("lease", lease_id))

    @contextlib.contextmanager
    def lease(
        self,
        expire: timedelta = DEFAULT_LEASE_EXPIRY,
        labels: Mapping[str, str] | None = None,
        *,
        sync: bool = False,
    ) -> Iterator[str]:
        """Hold a lease while the block runs; calls made meanwhile carry it.

        Content written under the lease is safe from garbage collection until the
        block ends (the lease is then deleted) or, if the process dies, until
        `expire` has passed. Yields the lease id.
        """
        until = (datetime.now(UTC) + expire).strftime("%Y-%m-%dT%H:%M:%SZ")
        lease = self.create_lease(labels={GC_EXPIRE_LABEL: until, **(labels or {})})
        outer, self._lease = self._lease, lease.id
        ok = False
        try:
            yield lease.id
            ok = True
        finally:
            self._lease = outer
            try:
                self.delete_lease(lease.id, sync=sync)
            except ContainerdError:
                if ok:
                    raise
                # Keep the original error; the lease expires on its own.
                log.debug("could not delete lease %s", lease.id, exc_info=True)

    # -------------------------------------------------------------- snapshots

    def prepare_snapshot(
        self,
        key: str,
        parent: str = "",
        *,
        snapshotter: str = DEFAULT_SNAPSHOTTER,
        labels: Mapping[str, str] | None = None,
    ) -> list[Mount]:
        """Create the active (writable) snapshot `key` on `parent` ("" for none); its mounts.

        Call it inside `lease()`: containerd may garbage-collect a snapshot that no
        lease, container or gc.root label holds, even while a layer is applied to it.
        """
        req = snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels or {})
        )
        return _mounts(self._call("snapshot_prepare", req, ("snapshot", key)).mounts)

    def view_snapshot(
        self,
        key: str,
        parent: str,
        *,
        snapshotter: str = DEFAULT_SNAPSHOTTER,
        labels: Mapping[str, str] | None = None,
    ) -> list[Mount]:
        """Create the read-only snapshot `key` of `parent`; its mounts."""
        req = snapshots_pb2.ViewSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels or {})
        )
        return _mounts(self._call("snapshot_view", req, ("snapshot", key)).mounts)

    def snapshot_mounts(self, key: str, *, snapshotter: str = DEFAULT_SNAPSHOTTER) -> list[Mount]:
        req = snapshots_pb2.MountsRequest(snapshotter=snapshotter, key=key)
        return _mounts(self._call("snapshot_mounts", req, ("snapshot", key)).mounts)

    def commit_snapshot(
        self,
        name: str,
        key: str,
        *,
        labels: Mapping[str, str] | None = None,
        snapshotter: str = DEFAULT_SNAPSHOTTER,
    ) -> None:
        """Commit the active snapshot `key` as the read-only snapshot `name`.

        `key` no longer exists afterwards. An unpacked layer becomes a parent for
        the next one only once committed (an active snapshot cannot be a parent).
        """
        req = snapshots_pb2.CommitSnapshotRequest(
            snapshotter=snapshotter, name=name, key=key, labels=dict(labels or {})
        )
        self._call("snapshot_commit", req, ("snapshot", key))

    def stat_snapshot(self, key: str, *, snapshotter: str = DEFAULT_SNAPSHOTTER) -> SnapshotInfo:
        req = snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        return _snapshot_info(self._call("snapshot_stat", req, ("snapshot", key)).info)

    def remove_snapshot(
        self, key: str, *, snapshotter: str = DEFAULT_SNAPSHOTTER, missing_ok: bool = False
    ) -> None:
        req = snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        try:
            self._call("snapshot_remove", req, ("snapshot", key))
        except NotFoundError:
            if not missing_ok:
                raise

    def list_snapshots(
        self, *filters: str, snapshotter: str = DEFAULT_SNAPSHOTTER
    ) -> list[SnapshotInfo]:
        rpc = RPCS["snapshot_list"]
        req = snapshots_pb2.ListSnapshotsRequest(snapshotter=snapshotter, filters=filters)
        log.debug("containerd %s %s", rpc.path, snapshotter)
        stream = self._stubs["snapshot_list"](req, timeout=self.timeout, metadata=self._metadata())
        try:
            return [_snapshot_info(i) for resp in stream for i in resp.info]
        except grpc.RpcError as exc:
            raise self._error(exc, rpc.path, ("snapshotter", snapshotter)) from None

    # -------------------------------------------------------------- diff

    def apply_layer(self, layer: Descriptor, mounts: Sequence[Mount]) -> Descriptor:
        """Unpack the layer blob `layer` (in the content store) onto `mounts`.

        Returns the applied, uncompressed layer: its digest is the layer's DiffID.
        """
        req = diff_pb2.ApplyRequest(diff=_descriptor_pb(layer), mounts=_mounts_pb(mounts))
        r = self._call("diff_apply", req, ("layer", layer.digest), unbounded=True)
        return _descriptor(r.applied)

    # -------------------------------------------------------------- containers

    def create_container(self, container: Container) -> Container:
        c = container
        req = containers_pb2.CreateContainerRequest(
            container=containers_pb2.Container(
                id=c.id,
                labels=dict(c.labels),
                image=c.image,
                runtime=containers_pb2.Container.Runtime(name=c.runtime),
                spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=c.spec),
                snapshotter=c.snapshotter,
                snapshot_key=c.snapshot_key,
            )
        )
        return _container(self._call("container_create", req, ("container", c.id)).container)

    def get_container(self, container_id: str) -> Container:
        req = containers_pb2.GetContainerRequest(id=container_id)
        return _container(self._call("container_get", req, ("container", container_id)).container)

    def list_containers(self, *filters: str) -> list[Container]:
        """Container records matching containerd filters (e.g. 'labels."x"==y')."""
        req = containers_pb2.ListContainersRequest(filters=filters)
        return [_container(c) for c in self._call("container_list", req).containers]

    def delete_container(self, container_id: str, *, missing_ok: bool = False) -> None:
        req = containers_pb2.DeleteContainerRequest(id=container_id)
        try:
            self._call("container_delete", req, ("container", container_id))
        except NotFoundError:
            if not missing_ok:
                raise

    # -------------------------------------------------------------- tasks

    def create_task(
        self,
        container_id: str,
        rootfs: Sequence[Mount] = (),
        *,
        stdin: str = "",
        stdout: str = "",
        stderr: str = "",
        terminal: bool = False,
    ) -> int:
        """Create the container's task (its init process, not yet started); its pid.

        stdin/stdout/stderr are paths of FIFOs or files the shim opens ("" for none).
        """
        req = tasks_pb2.CreateTaskRequest(
            container_id=container_id,
            rootfs=_mounts_pb(rootfs),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            terminal=terminal,
        )
        return self._call("task_create", req, ("task", container_id)).pid

    def start_task(self, container_id: str) -> int:
        req = tasks_pb2.StartRequest(container_id=container_id)
        return self._call("task_start", req, ("task", container_id)).pid

    def kill_task(self, container_id: str, signal: int, *, all: bool = False) -> None:
        """Send `signal` to the task's init process (all=True: to every process in it)."""
        req = tasks_pb2.KillRequest(container_id=container_id, signal=signal, all=all)
        self._call("task_kill", req, ("task", container_id))

    def get_task(self, container_id: str) -> TaskState:
        req = tasks_pb2.GetRequest(container_id=container_id)
        p = self._call("task_get", req, ("task", container_id)).process
        return TaskState(
            container_id=p.container_id or container_id,
            pid=p.pid,
            status=tasks_pb2.Status.Name(p.status).lower(),
            exit_status=p.exit_status,
            exited_at=_time(p, "exited_at"),
        )

    def wait_task(self, container_id: str, timeout: float | None = None) -> TaskExit:
        """Block until the task exits (at most `timeout` seconds; None: no limit)."""
        rpc = RPCS["task_wait"]
        req = tasks_pb2.WaitRequest(container_id=container_id)
        log.debug("containerd %s %s", rpc.path, container_id)
        try:
            r = self._stubs["task_wait"](req, timeout=timeout, metadata=self._metadata())
        except grpc.RpcError as exc:
            raise self._error(exc, rpc.path, ("task", container_id)) from None
        return TaskExit(exit_status=r.exit_status, exited_at=_time(r, "exited_at"))

    def close_stdin(self, container_id: str) -> None:
        """Close the task's stdin, so that it reads end-of-file (the shim keeps the FIFO)."""
        req = tasks_pb2.CloseIORequest(container_id=container_id, stdin=True)
        self._call("task_close_io", req, ("task", container_id))

    def resize_pty(self, container_id: str, width: int, height: int) -> None:
        """Set the size of the task's terminal (created with terminal=True)."""
        req = tasks_pb2.ResizePtyRequest(container_id=container_id, width=width, height=height)
        self._call("task_resize_pty", req, ("task", container_id))

    def delete_task(self, container_id: str, *, missing_ok: bool = False) -> TaskExit | None:
        """Delete a stopped task; its exit (None if missing_ok and there was no task)."""
        req = tasks_pb2.DeleteTaskRequest(container_id=container_id)
        try:
            r = self._call("task_delete", req, ("task", container_id))
        except NotFoundError:
            if missing_ok:
                return None
            raise
        return TaskExit(exit_status=r.exit_status, exited_at=_time(r, "exited_at"))


# ---------------------------------------------------------------------- helpers


def socket_path(address: str) -> str:
    """The filesystem path of a containerd address (a path or unix:// URL)."""
    if address.startswith("unix://"):
        return address[len("unix://") :]
    if address.startswith("unix:"):
        return address[len("unix:") :]
    if "://" in address:
        raise ContainerdError(
            f"unsupported containerd address {address!r}: containerd listens on a unix "
            "socket (e.g. /run/containerd/containerd.sock)"
        )
    return address


def probe_socket(path: str) -> str | None:
    """Why nothing can connect to the unix socket at `path`, or None if something answers.

    gRPC reports all of these as UNAVAILABLE; a plain connect tells them apart.
    """
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return "not a socket"
    except FileNotFoundError:
        return "missing"
    except PermissionError:  # a directory on the way is closed to us
        return "permission"
    except OSError as exc:
        return exc.strerror or str(exc)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
    except FileNotFoundError:
        return "missing"
    except ConnectionRefusedError:
        return "refused"
    except PermissionError:
        return "permission"
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        s.close()
    return None


def _chunks(data: bytes | BinaryIO | Iterable[bytes]) -> Iterator[bytes]:
    """The data as pieces of at most _CHUNK bytes, empty pieces skipped."""
    if isinstance(data, bytes | bytearray | memoryview):
        pieces: Iterable[bytes] = (bytes(data),)
    elif hasattr(data, "read"):
        pieces = iter(lambda: data.read(_CHUNK), b"")  # type: ignore[union-attr]
    else:
        pieces = data
    for piece in pieces:
        for start in range(0, len(piece), _CHUNK):
            yield bytes(piece[start : start + _CHUNK])


def _skip_prefix(
    chunks: Iterator[bytes], n: int, digest: str, hasher: Any | None, spool: BinaryIO
) -> tuple[bool, Iterator[bytes]]:
    """Consume the first `n` bytes of `chunks` if their digest is `digest`.

    Returns (True, the rest) with `hasher` (if any) fed the prefix; otherwise (False,
    all the chunks again, the consumed ones replayed from `spool`).
    """
    algo, _, want = digest.partition(":")
    if algo not in hashlib.algorithms_available:
        return False, chunks
    check = hashlib.new(algo)
    taken, tail = 0, b""
    for chunk in chunks:
        head, tail = chunk[: n - taken], chunk[n - taken :]
        check.update(head)
        if hasher is not None:
            hasher.update(head)
        spool.write(head)
        taken += len(head)
        if taken == n:
            break
    rest = itertools.chain([tail] if tail else [], chunks)
    if taken == n and check.hexdigest() == want:
        return True, rest
    spool.seek(0)
    return False, itertools.chain(iter(lambda: spool.read(_CHUNK), b""), rest)


def _time(msg: Any, name: str) -> datetime | None:
    if not msg.HasField(name):
        return None
    return getattr(msg, name).ToDatetime(tzinfo=UTC)


def _info(i: content_pb2.Info) -> ContentInfo:
    return ContentInfo(
        digest=i.digest,
        size=i.size,
        labels=dict(i.labels),
        created_at=_time(i, "created_at"),
        updated_at=_time(i, "updated_at"),
    )


def _status(s: content_pb2.Status) -> IngestStatus:
    return IngestStatus(
        ref=s.ref,
        offset=s.offset,
        total=s.total,
        expected=s.expected,
        started_at=_time(s, "started_at"),
        updated_at=_time(s, "updated_at"),
    )


def _image(i: images_pb2.Image) -> Image:
    t = i.target
    return Image(
        name=i.name,
        target=Descriptor(
            media_type=t.media_type,
            digest=t.digest,
            size=t.size,
            annotations=dict(t.annotations) or None,
        ),
        labels=dict(i.labels),
        created_at=_time(i, "created_at"),
        updated_at=_time(i, "updated_at"),
    )


def _image_pb(image: Image) -> images_pb2.Image:
    t = image.target
    return images_pb2.Image(
        name=image.name,
        labels=dict(image.labels),
        target=types_pb2.Descriptor(
            media_type=t.media_type,
            digest=t.digest,
            size=t.size,
            annotations=dict(t.annotations or {}),
        ),
    )


def _lease(x: leases_pb2.Lease) -> Lease:
    return Lease(id=x.id, labels=dict(x.labels), created_at=_time(x, "created_at"))


def _mounts(ms: Iterable[types_pb2.Mount]) -> list[Mount]:
    return [
        Mount(type=m.type, source=m.source, target=m.target, options=list(m.options)) for m in ms
    ]


def _mounts_pb(ms: Iterable[Mount]) -> list[types_pb2.Mount]:
    return [
        types_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
        for m in ms
    ]


def _snapshot_info(i: snapshots_pb2.Info) -> SnapshotInfo:
    return SnapshotInfo(
        name=i.name,
        parent=i.parent,
        kind=snapshots_pb2.Kind.Name(i.kind).lower(),
        labels=dict(i.labels),
        created_at=_time(i, "created_at"),
        updated_at=_time(i, "updated_at"),
    )


def _descriptor(d: types_pb2.Descriptor) -> Descriptor:
    return Descriptor(
        media_type=d.media_type,
        digest=d.digest,
        size=d.size,
        annotations=dict(d.annotations) or None,
    )


def _descriptor_pb(d: Descriptor) -> types_pb2.Descriptor:
    return types_pb2.Descriptor(
        media_type=d.media_type,
        digest=d.digest,
        size=d.size,
        annotations=dict(d.annotations or {}),
    )


def _container(c: containers_pb2.Container) -> Container:
    return Container(
        id=c.id,
        spec=c.spec.value,
        image=c.image,
        runtime=c.runtime.name,
        snapshotter=c.snapshotter,
        snapshot_key=c.snapshot_key,
        labels=dict(c.labels),
        created_at=_time(c, "created_at"),
        updated_at=_time(c, "updated_at"),
    )
