"""A small, typed containerd client: one object per service over one shared connection,
the way containerd's Go client hands them out (client.content, client.images,
client.snapshots("overlayfs"), …).

A lease is passed to the calls it must cover (`lease=`), never stored on the client, so
two users of one client (the store's conversion, the workload runner's snapshots) cannot
see each other's lease.
"""

from __future__ import annotations

from google.protobuf import empty_pb2

from estargz_opt.stores.containerd import rpcs
from estargz_opt.stores.containerd.content import ContentService
from estargz_opt.stores.containerd.errors import NamespaceNotFoundError
from estargz_opt.stores.containerd.model import (
    DEFAULT_ADDRESS,
    DEFAULT_NAMESPACE,
    DEFAULT_SNAPSHOTTER,
    Version,
)
from estargz_opt.stores.containerd.services import (
    ContainersService,
    DiffService,
    ImagesService,
    IntrospectionService,
    LeasesService,
    SnapshotsService,
    TasksService,
)
from estargz_opt.stores.containerd.transport import Transport


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
        self.transport = Transport(address, namespace, timeout)
        self.content = ContentService(self.transport)
        self.images = ImagesService(self.transport)
        self.leases = LeasesService(self.transport)
        self.containers = ContainersService(self.transport)
        self.tasks = TasksService(self.transport)
        self.diff = DiffService(self.transport)
        self.introspection = IntrospectionService(self.transport)

    @property
    def address(self) -> str:
        return self.transport.address

    @property
    def namespace(self) -> str:
        return self.transport.namespace

    def snapshots(self, snapshotter: str = DEFAULT_SNAPSHOTTER) -> SnapshotsService:
        """The snapshots of one snapshotter."""
        return SnapshotsService(self.transport, snapshotter)

    def version(self) -> Version:
        r = self.transport.unary(rpcs.VERSION, empty_pb2.Empty())
        return Version(version=r.version, revision=r.revision)

    def namespaces(self) -> list[str]:
        return self.transport.namespaces()

    def check_namespace(self) -> None:
        """Raise NamespaceNotFoundError unless the client's namespace exists (creating a
        lease in a missing namespace would create the namespace)."""
        if self.namespace not in self.namespaces():
            raise NamespaceNotFoundError(self.transport.no_namespace_message())

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
