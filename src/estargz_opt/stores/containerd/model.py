"""containerd's records as plain dataclasses, and the defaults every part of the
project shares (ctr's socket, namespace, snapshotter and runtime).

No grpc here: the privileged monitor helper and the CLI import these without loading the
gRPC stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from estargz_opt.descriptor import Descriptor

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"
DEFAULT_SNAPSHOTTER = "overlayfs"
DEFAULT_RUNTIME = "io.containerd.runc.v2"
#: How long a lease outlives a run that dies without deleting it.
DEFAULT_LEASE_EXPIRY = timedelta(hours=6)


@dataclass(frozen=True, slots=True)
class Version:
    """The daemon's release and the commit it was built from."""

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


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """What containerd keeps with every object: its labels and when it changed."""

    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ContentInfo(Record):
    digest: str
    size: int


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


@dataclass(frozen=True, slots=True)
class Image(Record):
    """An image record: a name pointing at a descriptor (manifest or index), plus labels."""

    name: str
    target: Descriptor


@dataclass(frozen=True, slots=True)
class Lease(Record):
    id: str


@dataclass(frozen=True, slots=True)
class Mount:
    """A mount as snapshotters return it and runtimes take it (mount(8) terms)."""

    type: str
    source: str
    target: str = ""
    options: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SnapshotInfo(Record):
    name: str
    parent: str
    #: "view", "active" or "committed"
    kind: str


@dataclass(frozen=True, slots=True)
class Container(Record):
    """A container record: what a task is created from."""

    id: str
    #: the OCI runtime spec, as JSON bytes
    spec: bytes
    image: str = ""
    runtime: str = DEFAULT_RUNTIME
    snapshotter: str = ""
    snapshot_key: str = ""


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


@dataclass(frozen=True, slots=True)
class ContainerdOptions:
    """ctr's global options: where containerd listens and which namespace to use."""

    address: str = DEFAULT_ADDRESS
    namespace: str = DEFAULT_NAMESPACE
    #: seconds each unary call may take (None: no limit)
    timeout: float | None = None
