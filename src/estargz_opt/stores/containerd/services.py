"""containerd's services other than content, one object each, over one shared Transport.

Calls that create what garbage collection could take (snapshots, applied layers) take the
lease that must hold it: a lease is passed to each call, never kept on the object.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from google.protobuf import any_pb2, empty_pb2, field_mask_pb2

from estargz_opt.constants import GC_EXPIRE_LABEL as GC_EXPIRE_LABEL
from estargz_opt.descriptor import Descriptor
from estargz_opt.stores.containerd import rpcs, wire
from estargz_opt.stores.containerd._pb import (
    containers_pb2,
    diff_pb2,
    images_pb2,
    introspection_pb2,
    leases_pb2,
    runcoptions_pb2,
    snapshots_pb2,
    tasks_pb2,
)
from estargz_opt.stores.containerd.errors import (
    AlreadyExistsError,
    ContainerdError,
    NotFoundError,
)
from estargz_opt.stores.containerd.model import (
    DEFAULT_LEASE_EXPIRY,
    DEFAULT_SNAPSHOTTER,
    Container,
    Image,
    Lease,
    Mount,
    Plugin,
    SnapshotInfo,
    TaskExit,
    TaskState,
)
from estargz_opt.stores.containerd.transport import Service, Subject, Transport

log = logging.getLogger("estargz_opt.stores.containerd")

#: The type URL containerd gives an OCI runtime spec (JSON) inside a container record.
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"


class ImagesService(Service):
    """Image records: names pointing at a manifest or index descriptor."""

    def get(self, name: str) -> Image:
        r = self._t.unary(
            rpcs.IMAGE_GET, images_pb2.GetImageRequest(name=name), Subject("image", name)
        )
        return wire.image(r.image)

    def list(self, *filters: str) -> list[Image]:
        r = self._t.unary(rpcs.IMAGE_LIST, images_pb2.ListImagesRequest(filters=filters))
        return [wire.image(i) for i in r.images]

    def create(self, image: Image) -> Image:
        req = images_pb2.CreateImageRequest(image=wire.image_pb(image))
        return wire.image(self._t.unary(rpcs.IMAGE_CREATE, req, Subject("image", image.name)).image)

    def update(self, image: Image, fields: Sequence[str] = ()) -> Image:
        """Update an image record; `fields` limits which (e.g. "target", "labels.<key>").

        With no fields, the target and all labels are replaced.
        """
        req = images_pb2.UpdateImageRequest(
            image=wire.image_pb(image), update_mask=field_mask_pb2.FieldMask(paths=list(fields))
        )
        return wire.image(self._t.unary(rpcs.IMAGE_UPDATE, req, Subject("image", image.name)).image)

    def put(self, image: Image) -> Image:
        """Create the image record, or point the existing one at the new target and labels."""
        try:
            return self.create(image)
        except AlreadyExistsError:
            return self.update(image)

    def delete(self, name: str, *, sync: bool = False) -> None:
        """Delete an image record; sync=True also waits for garbage collection."""
        req = images_pb2.DeleteImageRequest(name=name, sync=sync)
        self._t.unary(rpcs.IMAGE_DELETE, req, Subject("image", name))


class LeasesService(Service):
    """Leases: what keeps content and snapshots from garbage collection while in use."""

    def create(self, lease_id: str | None = None, labels: Mapping[str, str] | None = None) -> Lease:
        lease_id = lease_id or f"estargz-opt-{int(time.time())}-{secrets.token_hex(4)}"
        req = leases_pb2.CreateRequest(id=lease_id, labels=dict(labels or {}))
        return wire.lease(self._t.unary(rpcs.LEASE_CREATE, req, Subject("lease", lease_id)).lease)

    def delete(self, lease_id: str, *, sync: bool = False) -> None:
        """Delete a lease; sync=True also waits for the garbage collection it allows."""
        req = leases_pb2.DeleteRequest(id=lease_id, sync=sync)
        self._t.unary(rpcs.LEASE_DELETE, req, Subject("lease", lease_id))

    def list(self, *filters: str) -> list[Lease]:
        r = self._t.unary(rpcs.LEASE_LIST, leases_pb2.ListRequest(filters=filters))
        return [wire.lease(x) for x in r.leases]

    def add_resource(self, lease_id: str, resource_id: str, type: str = "content") -> None:
        """Make a lease hold an existing object too (type "content": a blob digest)."""
        req = leases_pb2.AddResourceRequest(
            id=lease_id, resource=leases_pb2.Resource(id=resource_id, type=type)
        )
        self._t.unary(rpcs.LEASE_ADD_RESOURCE, req, Subject("lease", lease_id))

    @contextlib.contextmanager
    def hold(
        self,
        expire: timedelta = DEFAULT_LEASE_EXPIRY,
        labels: Mapping[str, str] | None = None,
        *,
        sync: bool = False,
    ) -> Iterator[str]:
        """A lease for the block; yields its id, to pass to the calls it must cover.

        What those calls create is safe from garbage collection until the block ends
        (the lease is then deleted) or, if the process dies, until `expire` has passed.
        """
        until = (datetime.now(UTC) + expire).strftime("%Y-%m-%dT%H:%M:%SZ")
        lease = self.create(labels={GC_EXPIRE_LABEL: until, **(labels or {})})
        ok = False
        try:
            yield lease.id
            ok = True
        finally:
            try:
                self.delete(lease.id, sync=sync)
            except ContainerdError:
                if ok:
                    raise
                # Keep the original error; the lease expires on its own.
                log.debug("could not delete lease %s", lease.id, exc_info=True)


class SnapshotsService(Service):
    """The snapshots of one snapshotter (containerd's SnapshotService(name))."""

    def __init__(self, transport: Transport, snapshotter: str = DEFAULT_SNAPSHOTTER) -> None:
        super().__init__(transport)
        self.snapshotter = snapshotter

    def prepare(
        self,
        key: str,
        parent: str = "",
        *,
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> list[Mount]:
        """Create the active (writable) snapshot `key` on `parent` ("" for none); its mounts.

        Pass a lease: containerd may garbage-collect a snapshot that no lease, container
        or gc.root label holds, even while a layer is applied to it.
        """
        req = snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=dict(labels or {})
        )
        r = self._t.unary(rpcs.SNAPSHOT_PREPARE, req, Subject("snapshot", key), lease=lease)
        return wire.mounts(r.mounts)

    def mounts(self, key: str) -> list[Mount]:
        req = snapshots_pb2.MountsRequest(snapshotter=self.snapshotter, key=key)
        return wire.mounts(
            self._t.unary(rpcs.SNAPSHOT_MOUNTS, req, Subject("snapshot", key)).mounts
        )

    def commit(
        self,
        name: str,
        key: str,
        *,
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> None:
        """Commit the active snapshot `key` as the read-only snapshot `name`.

        `key` no longer exists afterwards. An unpacked layer becomes a parent for
        the next one only once committed (an active snapshot cannot be a parent).
        """
        req = snapshots_pb2.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=dict(labels or {})
        )
        self._t.unary(rpcs.SNAPSHOT_COMMIT, req, Subject("snapshot", key), lease=lease)

    def stat(self, key: str) -> SnapshotInfo:
        req = snapshots_pb2.StatSnapshotRequest(snapshotter=self.snapshotter, key=key)
        r = self._t.unary(rpcs.SNAPSHOT_STAT, req, Subject("snapshot", key))
        return wire.snapshot_info(r.info)

    def remove(self, key: str, *, missing_ok: bool = False) -> None:
        req = snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key)
        try:
            self._t.unary(rpcs.SNAPSHOT_REMOVE, req, Subject("snapshot", key))
        except NotFoundError:
            if not missing_ok:
                raise

    def list(self, *filters: str) -> list[SnapshotInfo]:
        req = snapshots_pb2.ListSnapshotsRequest(snapshotter=self.snapshotter, filters=filters)
        stream = self._t.server_stream(
            rpcs.SNAPSHOT_LIST, req, Subject("snapshotter", self.snapshotter)
        )
        return [wire.snapshot_info(i) for resp in stream for i in resp.info]


class DiffService(Service):
    """Applying layer blobs onto mounts."""

    def apply(
        self, layer: Descriptor, mounts: Sequence[Mount], *, lease: str | None = None
    ) -> Descriptor:
        """Unpack the layer blob `layer` (in the content store) onto `mounts`.

        Returns the applied, uncompressed layer: its digest is the layer's DiffID.
        """
        req = diff_pb2.ApplyRequest(diff=wire.descriptor_pb(layer), mounts=wire.mounts_pb(mounts))
        r = self._t.unary(
            rpcs.DIFF_APPLY, req, Subject("layer", layer.digest), lease=lease, timeout=None
        )
        return wire.descriptor(r.applied)


class ContainersService(Service):
    """Container records: what a task is created from."""

    def create(self, container: Container) -> Container:
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
        r = self._t.unary(rpcs.CONTAINER_CREATE, req, Subject("container", c.id))
        return wire.container(r.container)

    def get(self, container_id: str) -> Container:
        req = containers_pb2.GetContainerRequest(id=container_id)
        r = self._t.unary(rpcs.CONTAINER_GET, req, Subject("container", container_id))
        return wire.container(r.container)

    def list(self, *filters: str) -> list[Container]:
        """Container records matching containerd filters (e.g. 'labels."x"==y')."""
        req = containers_pb2.ListContainersRequest(filters=filters)
        return [wire.container(c) for c in self._t.unary(rpcs.CONTAINER_LIST, req).containers]

    def delete(self, container_id: str, *, missing_ok: bool = False) -> None:
        req = containers_pb2.DeleteContainerRequest(id=container_id)
        try:
            self._t.unary(rpcs.CONTAINER_DELETE, req, Subject("container", container_id))
        except NotFoundError:
            if not missing_ok:
                raise


RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"


class TasksService(Service):
    """Tasks: a container's running init process."""

    def create(
        self,
        container_id: str,
        rootfs: Sequence[Mount] = (),
        *,
        stdin: str = "",
        stdout: str = "",
        stderr: str = "",
        terminal: bool = False,
        runtime_binary: str = "",
    ) -> int:
        """Create the container's task (its init process, not yet started); its pid.

        stdin/stdout/stderr are paths of FIFOs or files the shim opens ("" for none).
        runtime_binary: the OCI runtime the runc shim runs instead of `runc` (its
        BinaryName option), e.g. crun or a path.
        """
        req = tasks_pb2.CreateTaskRequest(
            container_id=container_id,
            rootfs=wire.mounts_pb(rootfs),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            terminal=terminal,
        )
        if runtime_binary:
            # typeurl's name for it, as ctr's --runc-binary sends it (no URL prefix)
            req.options.type_url = RUNC_OPTIONS_TYPE
            req.options.value = runcoptions_pb2.Options(
                binary_name=runtime_binary
            ).SerializeToString()
        return self._t.unary(rpcs.TASK_CREATE, req, Subject("task", container_id)).pid

    def start(self, container_id: str) -> int:
        req = tasks_pb2.StartRequest(container_id=container_id)
        return self._t.unary(rpcs.TASK_START, req, Subject("task", container_id)).pid

    def kill(self, container_id: str, signal: int, *, all: bool = False) -> None:
        """Send `signal` to the task's init process (all=True: to every process in it)."""
        req = tasks_pb2.KillRequest(container_id=container_id, signal=signal, all=all)
        self._t.unary(rpcs.TASK_KILL, req, Subject("task", container_id))

    def get(self, container_id: str) -> TaskState:
        req = tasks_pb2.GetRequest(container_id=container_id)
        p = self._t.unary(rpcs.TASK_GET, req, Subject("task", container_id)).process
        return TaskState(
            container_id=p.container_id or container_id,
            pid=p.pid,
            status=tasks_pb2.Status.Name(p.status).lower(),
            exit_status=p.exit_status,
            exited_at=wire.time(p, "exited_at"),
        )

    def wait(self, container_id: str, timeout: float | None = None) -> TaskExit:
        """Block until the task exits (at most `timeout` seconds; None: no limit)."""
        req = tasks_pb2.WaitRequest(container_id=container_id)
        r = self._t.unary(rpcs.TASK_WAIT, req, Subject("task", container_id), timeout=timeout)
        return TaskExit(exit_status=r.exit_status, exited_at=wire.time(r, "exited_at"))

    def close_stdin(self, container_id: str) -> None:
        """Close the task's stdin, so that it reads end-of-file (the shim keeps the FIFO)."""
        req = tasks_pb2.CloseIORequest(container_id=container_id, stdin=True)
        self._t.unary(rpcs.TASK_CLOSE_IO, req, Subject("task", container_id))

    def resize_pty(self, container_id: str, width: int, height: int) -> None:
        """Set the size of the task's terminal (created with terminal=True)."""
        req = tasks_pb2.ResizePtyRequest(container_id=container_id, width=width, height=height)
        self._t.unary(rpcs.TASK_RESIZE_PTY, req, Subject("task", container_id))

    def delete(self, container_id: str, *, missing_ok: bool = False) -> TaskExit | None:
        """Delete a stopped task; its exit (None if missing_ok and there was no task)."""
        req = tasks_pb2.DeleteTaskRequest(container_id=container_id)
        try:
            r = self._t.unary(rpcs.TASK_DELETE, req, Subject("task", container_id))
        except NotFoundError:
            if missing_ok:
                return None
            raise
        return TaskExit(exit_status=r.exit_status, exited_at=wire.time(r, "exited_at"))


class IntrospectionService(Service):
    """What the daemon is: its plugins and its instance UUID."""

    def server_uuid(self) -> str:
        return self._t.unary(rpcs.SERVER, empty_pb2.Empty()).uuid

    def plugins(self, *filters: str) -> list[Plugin]:
        r = self._t.unary(rpcs.PLUGINS, introspection_pb2.PluginsRequest(filters=filters))
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
