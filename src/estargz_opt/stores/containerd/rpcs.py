"""The containerd API methods we call, declared by hand.

Generated *_pb2_grpc.py stubs would pin the grpcio release that generated them; these
declarations need only the message classes. tests check them against the .proto files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from estargz_opt.stores.containerd._pb import (
    containers_pb2 as ctr,
    content_pb2 as cs,
    diff_pb2 as diff,
    images_pb2 as img,
    introspection_pb2 as intro,
    leases_pb2 as lease,
    namespaces_pb2 as ns,
    snapshots_pb2 as snap,
    tasks_pb2 as task,
    version_pb2 as ver,
)

UNARY, SERVER_STREAM, BIDI = "unary_unary", "unary_stream", "stream_stream"

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


@dataclass(frozen=True, slots=True)
class Rpc(Generic[Req, Resp]):
    """One method: its service, name, message classes and streaming kind."""

    service: str
    method: str
    request: type[Req]
    response: type[Resp]
    kind: str = UNARY

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"


@dataclass(frozen=True, slots=True)
class _Api:
    """One containerd service, whose methods are declared below."""

    service: str

    def rpc(self, method: str, request: type[Req], response: type[Resp]) -> Rpc[Req, Resp]:
        return Rpc(self.service, method, request, response, UNARY)

    def stream(self, method: str, request: type[Req], response: type[Resp]) -> Rpc[Req, Resp]:
        """A method that answers with a stream of responses."""
        return Rpc(self.service, method, request, response, SERVER_STREAM)

    def bidi(self, method: str, request: type[Req], response: type[Resp]) -> Rpc[Req, Resp]:
        """A method whose requests and responses are both streams."""
        return Rpc(self.service, method, request, response, BIDI)


_content = _Api("containerd.services.content.v1.Content")
_images = _Api("containerd.services.images.v1.Images")
_leases = _Api("containerd.services.leases.v1.Leases")
_namespaces = _Api("containerd.services.namespaces.v1.Namespaces")
_introspection = _Api("containerd.services.introspection.v1.Introspection")
_version = _Api("containerd.services.version.v1.Version")
_snapshot = _Api("containerd.services.snapshots.v1.Snapshots")
_container = _Api("containerd.services.containers.v1.Containers")
_tasks = _Api("containerd.services.tasks.v1.Tasks")
_diff = _Api("containerd.services.diff.v1.Diff")

VERSION = _version.rpc("Version", empty_pb2.Empty, ver.VersionResponse)
PLUGINS = _introspection.rpc("Plugins", intro.PluginsRequest, intro.PluginsResponse)
SERVER = _introspection.rpc("Server", empty_pb2.Empty, intro.ServerResponse)
NAMESPACE_LIST = _namespaces.rpc("List", ns.ListNamespacesRequest, ns.ListNamespacesResponse)
CONTENT_INFO = _content.rpc("Info", cs.InfoRequest, cs.InfoResponse)
CONTENT_UPDATE = _content.rpc("Update", cs.UpdateRequest, cs.UpdateResponse)
CONTENT_DELETE = _content.rpc("Delete", cs.DeleteContentRequest, empty_pb2.Empty)
CONTENT_READ = _content.stream("Read", cs.ReadContentRequest, cs.ReadContentResponse)
CONTENT_STATUS = _content.rpc("Status", cs.StatusRequest, cs.StatusResponse)
CONTENT_STATUSES = _content.rpc("ListStatuses", cs.ListStatusesRequest, cs.ListStatusesResponse)
CONTENT_WRITE = _content.bidi("Write", cs.WriteContentRequest, cs.WriteContentResponse)
CONTENT_ABORT = _content.rpc("Abort", cs.AbortRequest, empty_pb2.Empty)
IMAGE_GET = _images.rpc("Get", img.GetImageRequest, img.GetImageResponse)
IMAGE_LIST = _images.rpc("List", img.ListImagesRequest, img.ListImagesResponse)
IMAGE_CREATE = _images.rpc("Create", img.CreateImageRequest, img.CreateImageResponse)
IMAGE_UPDATE = _images.rpc("Update", img.UpdateImageRequest, img.UpdateImageResponse)
IMAGE_DELETE = _images.rpc("Delete", img.DeleteImageRequest, empty_pb2.Empty)
LEASE_CREATE = _leases.rpc("Create", lease.CreateRequest, lease.CreateResponse)
LEASE_DELETE = _leases.rpc("Delete", lease.DeleteRequest, empty_pb2.Empty)
LEASE_LIST = _leases.rpc("List", lease.ListRequest, lease.ListResponse)
LEASE_ADD_RESOURCE = _leases.rpc("AddResource", lease.AddResourceRequest, empty_pb2.Empty)
SNAPSHOT_PREPARE = _snapshot.rpc(
    "Prepare", snap.PrepareSnapshotRequest, snap.PrepareSnapshotResponse
)
SNAPSHOT_MOUNTS = _snapshot.rpc("Mounts", snap.MountsRequest, snap.MountsResponse)
SNAPSHOT_COMMIT = _snapshot.rpc("Commit", snap.CommitSnapshotRequest, empty_pb2.Empty)
SNAPSHOT_REMOVE = _snapshot.rpc("Remove", snap.RemoveSnapshotRequest, empty_pb2.Empty)
SNAPSHOT_STAT = _snapshot.rpc("Stat", snap.StatSnapshotRequest, snap.StatSnapshotResponse)
SNAPSHOT_LIST = _snapshot.stream("List", snap.ListSnapshotsRequest, snap.ListSnapshotsResponse)
CONTAINER_GET = _container.rpc("Get", ctr.GetContainerRequest, ctr.GetContainerResponse)
CONTAINER_CREATE = _container.rpc("Create", ctr.CreateContainerRequest, ctr.CreateContainerResponse)
CONTAINER_DELETE = _container.rpc("Delete", ctr.DeleteContainerRequest, empty_pb2.Empty)
CONTAINER_LIST = _container.rpc("List", ctr.ListContainersRequest, ctr.ListContainersResponse)
TASK_CREATE = _tasks.rpc("Create", task.CreateTaskRequest, task.CreateTaskResponse)
TASK_START = _tasks.rpc("Start", task.StartRequest, task.StartResponse)
TASK_DELETE = _tasks.rpc("Delete", task.DeleteTaskRequest, task.DeleteResponse)
TASK_GET = _tasks.rpc("Get", task.GetRequest, task.GetResponse)
TASK_KILL = _tasks.rpc("Kill", task.KillRequest, empty_pb2.Empty)
TASK_WAIT = _tasks.rpc("Wait", task.WaitRequest, task.WaitResponse)
TASK_CLOSE_IO = _tasks.rpc("CloseIO", task.CloseIORequest, empty_pb2.Empty)
TASK_RESIZE_PTY = _tasks.rpc("ResizePty", task.ResizePtyRequest, empty_pb2.Empty)
DIFF_APPLY = _diff.rpc("Apply", diff.ApplyRequest, diff.ApplyResponse)


#: Every declared method by constant name, for the test against the .proto files.
RPCS: dict[str, Rpc[Any, Any]] = {
    name: value for name, value in globals().items() if isinstance(value, Rpc)
}
