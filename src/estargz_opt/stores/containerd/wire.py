"""Conversions between containerd's protobuf messages and our dataclasses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TypedDict

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from estargz_opt.descriptor import Descriptor
from estargz_opt.stores.containerd._pb import (
    containers_pb2,
    content_pb2,
    images_pb2,
    leases_pb2,
    snapshots_pb2,
    types_pb2,
)
from estargz_opt.stores.containerd.model import (
    Container,
    ContentInfo,
    Image,
    IngestStatus,
    Lease,
    Mount,
    SnapshotInfo,
)


def time(msg: Message, name: str) -> datetime | None:
    """The timestamp field `name` of `msg`; None where containerd left it unset or the
    message has no such field."""
    if name not in msg.DESCRIPTOR.fields_by_name or not msg.HasField(name):
        return None
    stamp: Timestamp = getattr(msg, name)
    return stamp.ToDatetime(tzinfo=UTC)


class _RecordFields(TypedDict):
    labels: dict[str, str]
    created_at: datetime | None
    updated_at: datetime | None


def record(msg: Message) -> _RecordFields:
    """The labels and timestamps every containerd object message carries."""
    labels: Mapping[str, str] = getattr(msg, "labels")  # noqa: B009 - each message its own
    return _RecordFields(
        labels=dict(labels),
        created_at=time(msg, "created_at"),
        updated_at=time(msg, "updated_at"),
    )


def info(i: content_pb2.Info) -> ContentInfo:
    return ContentInfo(
        digest=i.digest,
        size=i.size,
        **record(i),
    )


def status(s: content_pb2.Status) -> IngestStatus:
    return IngestStatus(
        ref=s.ref,
        offset=s.offset,
        total=s.total,
        expected=s.expected,
        started_at=time(s, "started_at"),
        updated_at=time(s, "updated_at"),
    )


def image(i: images_pb2.Image) -> Image:
    return Image(
        name=i.name,
        target=descriptor(i.target),
        **record(i),
    )


def image_pb(image: Image) -> images_pb2.Image:
    return images_pb2.Image(
        name=image.name, labels=dict(image.labels), target=descriptor_pb(image.target)
    )


def lease(x: leases_pb2.Lease) -> Lease:
    return Lease(id=x.id, **record(x))


def mounts(ms: Iterable[types_pb2.Mount]) -> list[Mount]:
    return [
        Mount(type=m.type, source=m.source, target=m.target, options=list(m.options)) for m in ms
    ]


def mounts_pb(ms: Iterable[Mount]) -> list[types_pb2.Mount]:
    return [
        types_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
        for m in ms
    ]


def snapshot_info(i: snapshots_pb2.Info) -> SnapshotInfo:
    return SnapshotInfo(
        name=i.name,
        parent=i.parent,
        kind=snapshots_pb2.Kind.Name(i.kind).lower(),
        **record(i),
    )


def descriptor(d: types_pb2.Descriptor) -> Descriptor:
    return Descriptor(
        media_type=d.media_type,
        digest=d.digest,
        size=d.size,
        annotations=dict(d.annotations) or None,
    )


def descriptor_pb(d: Descriptor) -> types_pb2.Descriptor:
    return types_pb2.Descriptor(
        media_type=d.media_type,
        digest=d.digest,
        size=d.size,
        annotations=dict(d.annotations or {}),
    )


def container(c: containers_pb2.Container) -> Container:
    return Container(
        id=c.id,
        spec=c.spec.value,
        image=c.image,
        runtime=c.runtime.name,
        snapshotter=c.snapshotter,
        snapshot_key=c.snapshot_key,
        **record(c),
    )
