"""Client calls that run a container: snapshots, diff apply, containers and tasks.

Against the session's private containerd. Every test removes what it creates
(snapshots, containers, tasks, blobs) in a finally, and checks that nothing of
it is left.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from estargz_opt.descriptor import Descriptor
from estargz_opt.stores.containerd.client import Client
from estargz_opt.stores.containerd.errors import NotFoundError
from estargz_opt.stores.containerd.model import Container
from estargz_opt.stores.containerd.services import SPEC_TYPE_URL

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


@pytest.fixture
def lease(client: Client) -> Iterator[str]:
    """One lease for the test's blobs and snapshots, as a sample container's must have.

    Without a lease, containerd's garbage collector may remove a snapshot that
    nothing references yet (e.g. while a layer is being applied to it). The lease
    is gone after the test.
    """
    with client.leases.hold(sync=True) as lease_id:
        yield lease_id
    assert lease_id not in {x.id for x in client.leases.list()}


def _key(what: str) -> str:
    return f"estargz-opt-test-{what}-{secrets.token_hex(6)}"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _store(client: Client, lease: str, data: bytes, media_type: str) -> Descriptor:
    digest = _digest(data)
    # Held by the test's lease; each test also deletes it.
    client.content.write(
        _key("blob"), data, expected_digest=digest, expected_size=len(data), lease=lease
    )
    return Descriptor(media_type=media_type, digest=digest, size=len(data))


def _snapshot_keys(client: Client) -> set[str]:
    return {s.name for s in client.snapshots().list()}


def _mounted(path_part: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if path_part in line]


def _spec(args: list[str]) -> bytes:
    """A minimal OCI runtime spec runc accepts: own namespaces, /proc, no capabilities."""
    return json.dumps(
        {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": ["PATH=/bin:/usr/bin"],
                "cwd": "/",
                "noNewPrivileges": True,
            },
            "root": {"path": "rootfs"},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            },
        }
    ).encode()


# ---------------------------------------------------------------- snapshots


def test_snapshot_prepare_mounts_stat_remove(client: Client, lease: str) -> None:
    key = _key("snap")
    try:
        mounts = client.snapshots().prepare(key, labels={"estargz-opt/test": "1"}, lease=lease)
        assert mounts, "an active snapshot has at least one mount"
        assert mounts[0].source and mounts[0].type in {"bind", "overlay"}
        assert "rw" in mounts[0].options
        assert client.snapshots().mounts(key) == mounts
        info = client.snapshots().stat(key)
        assert (info.name, info.parent, info.kind) == (key, "", "active")
        assert info.labels == {"estargz-opt/test": "1"}
        assert info.created_at is not None
        assert key in _snapshot_keys(client)
    finally:
        client.snapshots().remove(key, missing_ok=True)
    assert key not in _snapshot_keys(client)
    with pytest.raises(NotFoundError, match=key):
        client.snapshots().stat(key)
    client.snapshots().remove(key, missing_ok=True)  # a second remove is quiet when asked


# ---------------------------------------------------------------- diff


def test_apply_gzip_layer_onto_prepared_snapshot(
    client: Client, tmp_path: Path, lease: str
) -> None:
    tar = _tar({"hello.txt": b"hello from a layer\n", "etc/os-release": b"ID=test\n"})
    layer = _store(client, lease, gzip.compress(tar, mtime=0), LAYER_GZIP)
    key = _key("apply")
    try:
        mounts = client.snapshots().prepare(key, lease=lease)
        applied = client.diff.apply(layer, mounts, lease=lease)
        assert applied.digest == _digest(tar)  # the DiffID
        assert applied.media_type == LAYER_TAR
        # The files are in the snapshot: read them through a read-only view.
        assert mounts[0].type == "bind", "no parent: the snapshot is a plain directory"
        root = Path(mounts[0].source)
        assert (root / "hello.txt").read_bytes() == b"hello from a layer\n"
        assert (root / "etc" / "os-release").read_bytes() == b"ID=test\n"
    finally:
        client.snapshots().remove(key, missing_ok=True)
        client.content.delete(layer.digest)
    assert key not in _snapshot_keys(client)
    assert not _mounted(key)


# ---------------------------------------------------------------- containers


def test_container_create_get_delete(client: Client) -> None:
    cid = _key("ctr")
    spec = _spec(["/bin/sh", "-c", "true"])
    try:
        made = client.containers.create(
            Container(
                id=cid,
                spec=spec,
                labels={"estargz-opt/test": "1"},
                snapshotter="overlayfs",
                snapshot_key=cid,
                image="example.com/x:1",
            )
        )
        assert made.id == cid and made.created_at is not None
        got = client.containers.get(cid)
        assert json.loads(got.spec) == json.loads(spec)
        assert got.runtime == "io.containerd.runc.v2"
        assert (got.snapshotter, got.snapshot_key, got.image) == (
            "overlayfs",
            cid,
            "example.com/x:1",
        )
        assert got.labels == {"estargz-opt/test": "1"}
    finally:
        client.containers.delete(cid, missing_ok=True)
    with pytest.raises(NotFoundError, match=cid):
        client.containers.get(cid)


def test_container_spec_is_stored_with_containerds_type_url(client: Client, containerd) -> None:
    cid = _key("ctr")
    try:
        client.containers.create(Container(id=cid, spec=_spec(["/bin/true"])))
        # ctr decodes the spec by its type URL (SPEC_TYPE_URL); with another URL
        # it could not print the spec as an object.
        out = containerd.ctr("containers", "info", cid).stdout
        assert json.loads(out)["Spec"]["process"]["args"] == ["/bin/true"]
        assert SPEC_TYPE_URL == "types.containerd.io/opencontainers/runtime-spec/1/Spec"
    finally:
        client.containers.delete(cid, missing_ok=True)


# ---------------------------------------------------------------- tasks


def test_task_runs_busybox_to_exit(
    client: Client, busybox_layer: Path, tmp_path: Path, lease: str
) -> None:
    layer = _store(client, lease, busybox_layer.read_bytes(), LAYER_TAR)
    key = cid = _key("task")
    out = tmp_path / "stdout"
    created = {"snapshot": False, "container": False, "task": False}
    try:
        mounts = client.snapshots().prepare(key, lease=lease)
        created["snapshot"] = True
        client.diff.apply(layer, mounts, lease=lease)
        client.containers.create(
            Container(
                id=cid,
                spec=_spec(["/bin/sh", "-c", "echo hello; exit 3"]),
                snapshotter="overlayfs",
                snapshot_key=key,
            )
        )
        created["container"] = True
        pid = client.tasks.create(cid, mounts, stdout=f"file://{out}", stderr=f"file://{out}")
        created["task"] = True
        assert pid > 0
        assert client.tasks.get(cid).status == "created"
        assert client.tasks.start(cid) == pid
        exit_ = client.tasks.wait(cid, timeout=60)
        assert exit_.exit_status == 3
        state = client.tasks.get(cid)
        assert (state.status, state.exit_status) == ("stopped", 3)
        deleted = client.tasks.delete(cid)
        created["task"] = False
        assert deleted is not None and deleted.exit_status == 3
        assert out.read_text() == "hello\n"
    finally:
        if created["task"]:
            try:
                client.tasks.kill(cid, 9, all=True)
                client.tasks.wait(cid, timeout=30)
            except NotFoundError:
                pass
            client.tasks.delete(cid, missing_ok=True)
        if created["container"]:
            client.containers.delete(cid, missing_ok=True)
        if created["snapshot"]:
            client.snapshots().remove(key, missing_ok=True)
        client.content.delete(layer.digest)
    assert key not in _snapshot_keys(client)
    assert not _mounted(cid)
    with pytest.raises(NotFoundError):
        client.tasks.get(cid)


def test_kill_stops_a_long_running_task(client: Client, busybox_layer: Path, lease: str) -> None:
    layer = _store(client, lease, busybox_layer.read_bytes(), LAYER_TAR)
    key = cid = _key("kill")
    task = False
    try:
        mounts = client.snapshots().prepare(key, lease=lease)
        client.diff.apply(layer, mounts, lease=lease)
        # As pid 1, sh ignores SIGTERM unless it traps it.
        client.containers.create(
            Container(
                id=cid,
                spec=_spec(["/bin/sh", "-c", "trap 'exit 7' TERM; while :; do :; done"]),
                snapshotter="overlayfs",
                snapshot_key=key,
            )
        )
        client.tasks.create(cid, mounts)
        task = True
        client.tasks.start(cid)
        assert client.tasks.get(cid).status == "running"
        client.tasks.kill(cid, 15)
        assert client.tasks.wait(cid, timeout=60).exit_status == 7
        client.tasks.delete(cid)
        task = False
    finally:
        if task:
            try:
                client.tasks.kill(cid, 9, all=True)
                client.tasks.wait(cid, timeout=30)
            except NotFoundError:
                pass
            client.tasks.delete(cid, missing_ok=True)
        client.containers.delete(cid, missing_ok=True)
        client.snapshots().remove(key, missing_ok=True)
        client.content.delete(layer.digest)
    assert key not in _snapshot_keys(client)
    assert not _mounted(cid)


def test_missing_objects_are_not_found(client: Client) -> None:
    name = _key("missing")
    for call in (
        client.tasks.get,
        client.containers.get,
        client.snapshots().stat,
        client.snapshots().mounts,
    ):
        with pytest.raises(NotFoundError):
            call(name)
    assert client.tasks.delete(name, missing_ok=True) is None
