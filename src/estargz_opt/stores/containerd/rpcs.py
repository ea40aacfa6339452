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
    containers_pb2,
    content_pb2,
    diff_pb2,
    images_pb2,
    introspection_pb2,
    leases_pb2,
    namespaces_pb2,
    snapshots_pb2,
    tasks_pb2,
    version_pb2,
)

UNARY, SERVER_STREAM, BIDI = "unary_unary", "unary_stream", "stream_stream"
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


VERSION = Rpc(_VERSION, "Version", empty_pb2.Empty, version_pb2.VersionResponse)
PLUGINS = Rpc(
    _INTROSPECTION, "Plugins", introspection_pb2.PluginsRequest, introspection_pb2.PluginsResponse
)
SERVER = Rpc(_INTROSPECTION, "Server", empty_pb2.Empty, introspection_pb2.ServerResponse)
NAMESPACE_LIST = Rpc(
    _NAMESPACES, "List", namespaces_pb2.ListNamespacesRequest, namespaces_pb2.ListNamespacesResponse
)
CONTENT_INFO = Rpc(_CONTENT, "Info", content_pb2.InfoRequest, content_pb2.InfoResponse)
CONTENT_UPDATE = Rpc(_CONTENT, "Update", content_pb2.UpdateRequest, content_pb2.UpdateResponse)
CONTENT_DELETE = Rpc(_CONTENT, "Delete", content_pb2.DeleteContentRequest, empty_pb2.Empty)
CONTENT_READ = Rpc(
    _CONTENT, "Read", content_pb2.ReadContentRequest, content_pb2.ReadContentResponse, SERVER_STREAM
)
CONTENT_STATUS = Rpc(_CONTENT, "Status", content_pb2.StatusRequest, content_pb2.StatusResponse)
CONTENT_LIST_STATUSES = Rpc(
    _CONTENT, "ListStatuses", content_pb2.ListStatusesRequest, content_pb2.ListStatusesResponse
)
CONTENT_WRITE = Rpc(
    _CONTENT, "Write", content_pb2.WriteContentRequest, content_pb2.WriteContentResponse, BIDI
)
CONTENT_ABORT = Rpc(_CONTENT, "Abort", content_pb2.AbortRequest, empty_pb2.Empty)
IMAGE_GET = Rpc(_IMAGES, "Get", images_pb2.GetImageRequest, images_pb2.GetImageResponse)
IMAGE_LIST = Rpc(_IMAGES, "List", images_pb2.ListImagesRequest, images_pb2.ListImagesResponse)
IMAGE_CREATE = Rpc(_IMAGES, "Create", images_pb2.CreateImageRequest, images_pb2.CreateImageResponse)
IMAGE_UPDATE = Rpc(_IMAGES, "Update", images_pb2.UpdateImageRequest, images_pb2.UpdateImageResponse)
IMAGE_DELETE = Rpc(_IMAGES, "Delete", images_pb2.DeleteImageRequest, empty_pb2.Empty)
LEASE_CREATE = Rpc(_LEASES, "Create", leases_pb2.CreateRequest, leases_pb2.CreateResponse)
LEASE_DELETE = Rpc(_LEASES, "Delete", leases_pb2.DeleteRequest, empty_pb2.Empty)
LEASE_LIST = Rpc(_LEASES, "List", leases_pb2.ListRequest, leases_pb2.ListResponse)
LEASE_ADD_RESOURCE = Rpc(_LEASES, "AddResource", leases_pb2.AddResourceRequest, empty_pb2.Empty)
SNAPSHOT_PREPARE = Rpc(
    _SNAPSHOTS,
    "Prepare",
    snapshots_pb2.PrepareSnapshotRequest,
    snapshots_pb2.PrepareSnapshotResponse,
)
SNAPSHOT_VIEW = Rpc(
    _SNAPSHOTS, "View", snapshots_pb2.ViewSnapshotRequest, snapshots_pb2.ViewSnapshotResponse
)
SNAPSHOT_MOUNTS = Rpc(
    _SNAPSHOTS, "Mounts", snapshots_pb2.MountsRequest, snapshots_pb2.MountsResponse
)
SNAPSHOT_COMMIT = Rpc(_SNAPSHOTS, "Commit", snapshots_pb2.CommitSnapshotRequest, empty_pb2.Empty)
SNAPSHOT_REMOVE = Rpc(_SNAPSHOTS, "Remove", snapshots_pb2.RemoveSnapshotRequest, empty_pb2.Empty)
SNAPSHOT_STAT = Rpc(
    _SNAPSHOTS, "Stat", snapshots_pb2.StatSnapshotRequest, snapshots_pb2.StatSnapshotResponse
)
SNAPSHOT_LIST = Rpc(
    _SNAPSHOTS,
    "List",
    snapshots_pb2.ListSnapshotsRequest,
    snapshots_pb2.ListSnapshotsResponse,
    SERVER_STREAM,
)
CONTAINER_GET = Rpc(
    _CONTAINERS, "Get", containers_pb2.GetContainerRequest, containers_pb2.GetContainerResponse
)
CONTAINER_CREATE = Rpc(
    _CONTAINERS,
    "Create",
    containers_pb2.CreateContainerRequest,
    containers_pb2.CreateContainerResponse,
)
CONTAINER_DELETE = Rpc(
    _CONTAINERS, "Delete", containers_pb2.DeleteContainerRequest, empty_pb2.Empty
)
CONTAINER_LIST = Rpc(
    _CONTAINERS, "List", containers_pb2.ListContainersRequest, containers_pb2.ListContainersResponse
)
TASK_CREATE = Rpc(_TASKS, "Create", tasks_pb2.CreateTaskRequest, tasks_pb2.CreateTaskResponse)
TASK_START = Rpc(_TASKS, "Start", tasks_pb2.StartRequest, tasks_pb2.StartResponse)
TASK_DELETE = Rpc(_TASKS, "Delete", tasks_pb2.DeleteTaskRequest, tasks_pb2.DeleteResponse)
TASK_GET = Rpc(_TASKS, "Get", tasks_pb2.GetRequest, tasks_pb2.GetResponse)
TASK_KILL = Rpc(_TASKS, "Kill", tasks_pb2.KillRequest, empty_pb2.Empty)
TASK_WAIT = Rpc(_TASKS, "Wait", tasks_pb2.WaitRequest, tasks_pb2.WaitResponse)
TASK_CLOSE_IO = Rpc(_TASKS, "CloseIO", tasks_pb2.CloseIORequest, empty_pb2.Empty)
TASK_RESIZE_PTY = Rpc(_TASKS, "ResizePty", tasks_pb2.ResizePtyRequest, empty_pb2.Empty)
DIFF_APPLY = Rpc(_DIFF, "Apply", diff_pb2.ApplyRequest, diff_pb2.ApplyResponse)


#: Every declared method by constant name, for the test against the .proto files.
RPCS: dict[str, Rpc[Any, Any]] = {
    name: value for name, value in globals().items() if isinstance(value, Rpc)
}
