"""The containerd gRPC client: its generated modules, its wire numbers, and its calls
against a private containerd (content, images, leases, errors)."""

from __future__ import annotations

import ast
import hashlib
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

import estargz_opt
from estargz_opt.descriptor import OCI_CONFIG, OCI_MANIFEST, Descriptor, dump
from estargz_opt.stores.containerd import _pb
from estargz_opt.stores.containerd.client import Client
from estargz_opt.stores.containerd.errors import (
    ContainerdError,
    ContainerdUnavailableError,
    ContentNotFoundError,
    FailedPreconditionError,
    ImageNotFoundError,
    NamespaceNotFoundError,
)
from estargz_opt.stores.containerd.model import Image
from estargz_opt.stores.containerd.rpcs import RPCS
from estargz_opt.stores.containerd.services import GC_EXPIRE_LABEL

REPO = Path(__file__).resolve().parent.parent
GEN = REPO / "scripts" / "gen-protos.sh"
PB_DIR = Path(_pb.__file__).parent
GC_ROOT = "containerd.io/gc.root"
MiB = 1 << 20


def _same_package_env() -> dict[str, str]:
    """Environment for a child Python that imports the estargz_opt under test."""
    src = str(Path(estargz_opt.__file__).resolve().parent.parent)
    path = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- generated code


def _serialized_descriptor(module: Path) -> bytes:
    """The FileDescriptorProto a generated module registers (read, not imported)."""
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return node.args[0].value
    raise AssertionError(f"{module.name} registers no descriptor")


@pytest.mark.unit
def test_generated_modules_match_protos(tmp_path: Path) -> None:
    """Committed _pb/ modules hold exactly what scripts/gen-protos.sh makes of protos/.

    Descriptors are compared, not text, so another grpcio-tools release (whose
    generated code is laid out differently) does not count as drift.
    """
    out = tmp_path / "pb"
    subprocess.run(["bash", str(GEN), str(out)], check=True, capture_output=True, text=True,
                   env={**os.environ, "PYTHON": sys.executable})
    fresh = sorted(p.name for p in out.glob("*_pb2.py"))
    committed = sorted(p.name for p in PB_DIR.glob("*_pb2.py"))
    assert committed == fresh, "run scripts/gen-protos.sh: the set of modules changed"
    for name in fresh:
        assert _serialized_descriptor(PB_DIR / name) == _serialized_descriptor(out / name), (
            f"{name} is stale: run scripts/gen-protos.sh"
        )
        # Neither copy may pin the protobuf release that generated it.
        assert "_runtime_version" not in (PB_DIR / name).read_text()


# containerd 1.6's field numbers for every field we define (api/services/*/v1, api/types).
WIRE = """
containerd.types.Descriptor media_type=1 digest=2 size=3 annotations=5
containerd.types.Platform os=1 architecture=2 variant=3
containerd.services.version.v1.VersionResponse version=1 revision=2
containerd.services.introspection.v1.Plugin type=1 id=2 requires=3 platforms=4 exports=5
    capabilities=6
containerd.services.introspection.v1.PluginsRequest filters=1
containerd.services.introspection.v1.PluginsResponse plugins=1
containerd.services.introspection.v1.ServerResponse uuid=1
containerd.services.namespaces.v1.Namespace name=1 labels=2
containerd.services.namespaces.v1.ListNamespacesRequest filter=1
containerd.services.namespaces.v1.ListNamespacesResponse namespaces=1
containerd.services.content.v1.Info digest=1 size=2 created_at=3 updated_at=4 labels=5
containerd.services.content.v1.InfoRequest digest=1
containerd.services.content.v1.InfoResponse info=1
containerd.services.content.v1.UpdateRequest info=1 update_mask=2
containerd.services.content.v1.UpdateResponse info=1
containerd.services.content.v1.DeleteContentRequest digest=1
containerd.services.content.v1.ReadContentRequest digest=1 offset=2 size=3
containerd.services.content.v1.ReadContentResponse offset=1 data=2
containerd.services.content.v1.Status started_at=1 updated_at=2 ref=3 offset=4 total=5
    expected=6
containerd.services.content.v1.StatusRequest ref=1
containerd.services.content.v1.StatusResponse status=1
containerd.services.content.v1.ListStatusesRequest filters=1
containerd.services.content.v1.ListStatusesResponse statuses=1
containerd.services.content.v1.WriteContentRequest action=1 ref=2 total=3 expected=4 offset=5
    data=6 labels=7
containerd.services.content.v1.WriteContentResponse action=1 started_at=2 updated_at=3
    offset=4 total=5 digest=6
containerd.services.content.v1.AbortRequest ref=1
containerd.services.images.v1.Image name=1 labels=2 target=3 created_at=7 updated_at=8
containerd.services.images.v1.GetImageRequest name=1
containerd.services.images.v1.GetImageResponse image=1
containerd.services.images.v1.ListImagesRequest filters=1
containerd.services.images.v1.ListImagesResponse images=1
containerd.services.images.v1.CreateImageRequest image=1
containerd.services.images.v1.CreateImageResponse image=1
containerd.services.images.v1.UpdateImageRequest image=1 update_mask=2
containerd.services.images.v1.UpdateImageResponse image=1
containerd.services.images.v1.DeleteImageRequest name=1 sync=2
containerd.services.leases.v1.Lease id=1 created_at=2 labels=3
containerd.services.leases.v1.CreateRequest id=1 labels=3
containerd.services.leases.v1.CreateResponse lease=1
containerd.services.leases.v1.DeleteRequest id=1 sync=2
containerd.services.leases.v1.ListRequest filters=1
containerd.services.leases.v1.ListResponse leases=1
containerd.services.leases.v1.Resource id=1 type=2
containerd.services.leases.v1.AddResourceRequest id=1 resource=2
containerd.types.Mount type=1 source=2 target=3 options=4
containerd.services.snapshots.v1.PrepareSnapshotRequest snapshotter=1 key=2 parent=3 labels=4
containerd.services.snapshots.v1.PrepareSnapshotResponse mounts=1
containerd.services.snapshots.v1.ViewSnapshotRequest snapshotter=1 key=2 parent=3 labels=4
containerd.services.snapshots.v1.ViewSnapshotResponse mounts=1
containerd.services.snapshots.v1.MountsRequest snapshotter=1 key=2
containerd.services.snapshots.v1.MountsResponse mounts=1
containerd.services.snapshots.v1.CommitSnapshotRequest snapshotter=1 name=2 key=3 labels=4
containerd.services.snapshots.v1.RemoveSnapshotRequest snapshotter=1 key=2
containerd.services.snapshots.v1.StatSnapshotRequest snapshotter=1 key=2
containerd.services.snapshots.v1.Info name=1 parent=2 kind=3 created_at=4 updated_at=5 labels=6
containerd.services.snapshots.v1.StatSnapshotResponse info=1
containerd.services.snapshots.v1.ListSnapshotsRequest snapshotter=1 filters=2
containerd.services.snapshots.v1.ListSnapshotsResponse info=1
containerd.services.containers.v1.Container id=1 labels=2 image=3 runtime=4 spec=5
    snapshotter=6 snapshot_key=7 created_at=8 updated_at=9
containerd.services.containers.v1.Container.Runtime name=1 options=2
containerd.services.containers.v1.GetContainerRequest id=1
containerd.services.containers.v1.GetContainerResponse container=1
containerd.services.containers.v1.CreateContainerRequest container=1
containerd.services.containers.v1.CreateContainerResponse container=1
containerd.services.containers.v1.DeleteContainerRequest id=1
containerd.services.tasks.v1.CreateTaskRequest container_id=1 rootfs=3 stdin=4 stdout=5
    stderr=6 terminal=7 options=9
containerd.runc.v1.Options binary_name=6
containerd.services.tasks.v1.CreateTaskResponse container_id=1 pid=2
containerd.services.tasks.v1.StartRequest container_id=1 exec_id=2
containerd.services.tasks.v1.StartResponse pid=1
containerd.services.tasks.v1.DeleteTaskRequest container_id=1
containerd.services.tasks.v1.DeleteResponse id=1 pid=2 exit_status=3 exited_at=4
containerd.services.tasks.v1.GetRequest container_id=1 exec_id=2
containerd.services.tasks.v1.GetResponse process=1
containerd.services.tasks.v1.Process container_id=1 id=2 pid=3 status=4 stdin=5 stdout=6
    stderr=7 terminal=8 exit_status=9 exited_at=10
containerd.services.tasks.v1.KillRequest container_id=1 exec_id=2 signal=3 all=4
containerd.services.tasks.v1.WaitRequest container_id=1 exec_id=2
containerd.services.tasks.v1.WaitResponse exit_status=1 exited_at=2
containerd.services.diff.v1.ApplyRequest diff=1 mounts=2
containerd.services.diff.v1.ApplyResponse applied=1
"""


@pytest.mark.unit
def test_field_numbers_are_containerds() -> None:
    pool = descriptor_pool.Default()
    expected: dict[str, dict[str, int]] = {}
    for line in WIRE.replace("\n    ", " ").strip().splitlines():
        message, *fields = line.split()
        expected[message] = {k: int(v) for k, v in (f.split("=") for f in fields)}
    for message, fields in expected.items():
        got = {f.name: f.number for f in pool.FindMessageTypeByName(message).fields}
        assert got == fields, message
    enum = pool.FindEnumTypeByName("containerd.services.content.v1.WriteAction")
    assert {v.name: v.number for v in enum.values} == {"STAT": 0, "WRITE": 1, "COMMIT": 2}
    kind = pool.FindEnumTypeByName("containerd.services.snapshots.v1.Kind")
    assert {v.name: v.number for v in kind.values} == {
        "UNKNOWN": 0,
        "VIEW": 1,
        "ACTIVE": 2,
        "COMMITTED": 3,
    }
    status = pool.FindEnumTypeByName("containerd.services.tasks.v1.Status")
    assert [(v.name, v.number) for v in status.values] == [
        (name, i)
        for i, name in enumerate(["UNKNOWN", "CREATED", "RUNNING", "STOPPED", "PAUSED", "PAUSING"])
    ]


@pytest.mark.unit
def test_rpc_table_matches_protos() -> None:
    """rpcs.py's hand-declared stubs agree with the services in the .proto files."""
    pool = descriptor_pool.Default()
    kinds = {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, True): "stream_stream",
    }
    for name, rpc in RPCS.items():
        method = pool.FindServiceByName(rpc.service).methods_by_name[rpc.method]
        proto = descriptor_pb2.MethodDescriptorProto()
        method.CopyToProto(proto)
        assert method.input_type.full_name == rpc.request.DESCRIPTOR.full_name, name
        assert method.output_type.full_name == rpc.response.DESCRIPTOR.full_name, name
        assert kinds[proto.client_streaming, proto.server_streaming] == rpc.kind, name


# ---------------------------------------------------------------- errors without a daemon


@pytest.mark.unit
def test_missing_socket_says_how_to_point_at_containerd(tmp_path: Path) -> None:
    address = str(tmp_path / "nothing.sock")
    with Client(address) as client, pytest.raises(ContainerdUnavailableError) as err:
        client.version()
    message = str(err.value)
    assert address in message
    assert "-a/--address" in message and "CONTAINERD_ADDRESS" in message
    assert "start" in message and "\n" not in message


@pytest.mark.unit
def test_refused_socket(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # bound, never listening: connect() is refused
        with Client(f"unix://{path}") as client, pytest.raises(ContainerdUnavailableError) as err:
            client.version()
    assert str(path) in str(err.value) and "refused" in str(err.value)


@pytest.mark.unit
def test_bad_address_and_namespace() -> None:
    with pytest.raises(ContainerdError, match="unix socket"):
        Client("tcp://127.0.0.1:1234")
    with pytest.raises(ContainerdError, match="-n/--namespace"):
        Client("/run/containerd/containerd.sock", namespace="")


# ---------------------------------------------------------------- against containerd


@pytest.fixture
def lease(client: Client) -> Iterator[str]:
    """A lease for the test's writes: containerd may collect unreferenced content at any
    time after any deletion, e.g. another test's."""
    with client.leases.hold() as lease_id:
        yield lease_id


@pytest.fixture
def bare_client(containerd) -> Iterator[Client]:
    """A client without a lease, for the tests of garbage collection itself."""
    with Client(containerd.address, "default", timeout=60) as c:
        yield c


def test_version(client: Client, containerd) -> None:
    version = client.version()
    assert version.version and version.revision
    assert version.version in containerd.ctr("version").stdout
    assert client.introspection.server_uuid()
    assert any(p.type == "io.containerd.content.v1" for p in client.introspection.plugins())


def test_write_with_labels_info_and_read_back(client: Client, containerd, lease: str) -> None:
    data = os.urandom(3 * MiB + 123)  # several Write messages
    digest = _digest(data)
    labels = {GC_ROOT: "test", "estargz-opt.test/kind": "blob"}
    result = client.content.write(
        "client-test-labels", data, digest, len(data), labels, lease=lease
    )
    assert (result.digest, result.size, result.existed) == (digest, len(data), False)

    info = client.content.info(digest)
    assert info.size == len(data) and info.labels == labels and info.created_at
    listed = [
        line for line in containerd.ctr("content", "ls").stdout.splitlines() if digest in line
    ]
    assert listed and "estargz-opt.test/kind=blob" in listed[0]

    assert client.content.read_all(digest) == data
    assert (
        b"".join(client.content.read(digest, offset=MiB + 5, size=100)) == data[MiB + 5 : MiB + 105]
    )

    # The same blob again: nothing to write, and the new label is added.
    again = client.content.write(
        "client-test-labels", iter([data]), digest, len(data), {"x": "1"}, lease=lease
    )
    assert again.existed and again.digest == digest
    assert client.content.info(digest).labels == {**labels, "x": "1"}
    assert client.content.update_labels(digest, {"x": ""}).labels == labels
    client.content.delete(digest)
    with pytest.raises(ContentNotFoundError, match=digest):
        client.content.info(digest)


def test_write_without_expected_digest(client: Client, lease: str) -> None:
    data = os.urandom(MiB // 2)
    first = client.content.write("client-test-nodigest", [data[:1000], data[1000:]], lease=lease)
    assert first.digest == _digest(data) and not first.existed
    second = client.content.write("client-test-nodigest", data, labels={"y": "2"}, lease=lease)
    assert second.existed and client.content.info(first.digest).labels == {"y": "2"}
    client.content.delete(first.digest)


def _dies_after(data: bytes, limit: int) -> Iterator[bytes]:
    """Yield data in 256 KiB pieces, then fail as an interrupted run would."""
    for start in range(0, limit, 256 << 10):
        yield data[start : min(start + (256 << 10), limit)]
    raise KeyboardInterrupt


def test_interrupted_write_resumes(client: Client, containerd, lease: str) -> None:
    data = os.urandom(5 * MiB)
    digest, ref = _digest(data), "client-test-resume"
    with pytest.raises(KeyboardInterrupt):
        client.content.write(ref, _dies_after(data, 3 * MiB), digest, len(data), lease=lease)
    status = client.content.status(ref)
    assert status is not None and status.offset == 3 * MiB and status.total == len(data)
    assert ref in containerd.ctr("content", "active").stdout

    result = client.content.write(ref, data, digest, len(data), {GC_ROOT: "test"}, lease=lease)
    assert result.resumed_from == 3 * MiB and result.digest == digest
    assert client.content.status(ref) is None
    assert client.content.read_all(digest) == data
    client.content.delete(digest)


def test_write_killed_mid_blob_then_rerun(client: Client, containerd, lease: str) -> None:
    """A writer process killed outright leaves its ingest; a rerun picks it up."""
    ref, size = "client-test-killed", 4 * MiB
    code = (
        "import os, random, signal, sys\n"
        "from estargz_opt.stores.containerd.client import Client\n"
        "data = random.Random(7).randbytes(int(sys.argv[2]))\n"
        "def pieces():\n"
        "    for start in range(0, len(data) // 2, 1 << 18):\n"
        "        yield data[start : start + (1 << 18)]\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "Client(sys.argv[1]).content.write(sys.argv[3], pieces(), None, len(data))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, containerd.address, str(size), ref],
        env=_same_package_env(),
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == -9, res.stderr
    data = random.Random(7).randbytes(size)
    result = client.content.write(ref, data, _digest(data), size, lease=lease)
    assert result.resumed_from == size // 2 and result.digest == _digest(data)
    assert client.content.read_all(result.digest) == data
    client.content.delete(result.digest)


def test_stale_ingest_with_other_bytes_is_restarted(client: Client, lease: str) -> None:
    """A rerun whose bytes differ from the interrupted run's (stargz#246) still commits."""
    ref = "client-test-stale"
    stale = os.urandom(2 * MiB)
    with pytest.raises(KeyboardInterrupt):
        client.content.write(ref, _dies_after(stale, MiB + 7), lease=lease)
    data = os.urandom(3 * MiB)
    result = client.content.write(ref, data, _digest(data), len(data), lease=lease)
    assert result.resumed_from == 0 and result.digest == _digest(data)
    assert client.content.read_all(result.digest) == data
    client.content.delete(result.digest)


def test_abort_then_rewrite(client: Client, lease: str) -> None:
    data = os.urandom(2 * MiB)
    ref = "client-test-abort"
    with pytest.raises(KeyboardInterrupt):
        client.content.write(ref, _dies_after(data, MiB), _digest(data), len(data), lease=lease)
    assert any(s.ref == ref for s in client.content.list_statuses())
    client.content.abort(ref)
    assert client.content.status(ref) is None
    client.content.abort(ref)  # already gone: fine
    result = client.content.write(ref, data, _digest(data), len(data), lease=lease)
    assert result.resumed_from == 0 and client.content.read_all(result.digest) == data
    client.content.delete(result.digest)


def test_wrong_digest_fails_precondition(client: Client, lease: str) -> None:
    ref = "client-test-mismatch"
    with pytest.raises(FailedPreconditionError, match="unexpected commit digest"):
        client.content.write(ref, b"some bytes", "sha256:" + "0" * 64, 10, lease=lease)
    client.content.abort(ref)


def _small_image(client: Client, lease: str) -> Descriptor:
    """A config and a manifest (no layers) in the store; the manifest's descriptor."""
    config = dump({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}})
    config_digest = client.content.write(
        "client-test-config", config, _digest(config), len(config), lease=lease
    ).digest
    manifest = dump(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [],
        }
    )
    client.content.write(
        "client-test-manifest",
        manifest,
        _digest(manifest),
        len(manifest),
        {"containerd.io/gc.ref.content.config": config_digest},
        lease=lease,
    )
    return Descriptor(OCI_MANIFEST, _digest(manifest), len(manifest))


def test_image_round_trip(client: Client, containerd, lease: str) -> None:
    name = "example.test/estargz-opt/client:v1"
    target = _small_image(client, lease)
    created = client.images.create(
        Image(name=name, target=target, labels={"estargz-opt.test": "a"})
    )
    assert created.name == name and created.target.digest == target.digest
    assert name in containerd.ctr("images", "ls", "-q").stdout.split()

    got = client.images.get(name)
    assert got.target.media_type == OCI_MANIFEST and got.target.size == target.size
    assert got.labels == {"estargz-opt.test": "a"} and got.created_at

    annotated = target.with_changes(annotations={"org.example": "yes"})
    updated = client.images.update(
        Image(name=name, target=annotated, labels={"estargz-opt.test": "b"})
    )
    assert updated.target.annotations == {"org.example": "yes"}
    assert updated.labels == {"estargz-opt.test": "b"}
    only_label = client.images.update(
        Image(name=name, target=target, labels={"extra": "1"}), ["labels.extra"]
    )
    assert only_label.labels == {"estargz-opt.test": "b", "extra": "1"}
    assert only_label.target.annotations == {"org.example": "yes"}
    assert client.images.put(Image(name=name, target=target)).target.annotations is None
    assert [i.name for i in client.images.list(f"name=={name}")] == [name]

    client.images.delete(name)
    assert name not in containerd.ctr("images", "ls", "-q").stdout.split()
    with pytest.raises(ImageNotFoundError) as err:
        client.images.get(name)
    assert name in str(err.value) and "'default'" in str(err.value)


def test_lease_keeps_content_through_gc(bare_client: Client, containerd) -> None:
    client = bare_client

    def put(tag: str, labels: dict[str, str] | None = None, lease: str | None = None) -> str:
        data = tag.encode() + os.urandom(4096)
        return client.content.write(
            f"client-test-gc-{tag}", data, _digest(data), len(data), labels, lease=lease
        ).digest

    def alive(digest: str) -> bool:
        try:
            client.content.info(digest)
        except ContentNotFoundError:
            return False
        return True

    def collect() -> None:
        # Deleting any lease with sync=True runs (and waits for) a garbage collection.
        client.leases.delete(client.leases.create().id, sync=True)

    # Written outside any lease. containerd collects in the background too, some time
    # after any deletion, so "added" is held by a gc.root label until the lease holds it.
    unheld, added = put("unheld"), put("added", {GC_ROOT: "until-leased"})
    with client.leases.hold(sync=True) as lease_id:
        leases = containerd.ctr("leases", "ls").stdout
        assert lease_id in leases and GC_EXPIRE_LABEL in leases
        leased = put("leased", lease=lease_id)
        client.leases.add_resource(lease_id, added)
        client.content.update_labels(added, {GC_ROOT: ""})  # now only the lease holds it
        assert client.content.info(added).labels == {}
        collect()
        assert alive(leased) and alive(added)
        assert not alive(unheld)  # so a collection did run
    assert lease_id not in containerd.ctr("leases", "ls").stdout
    assert not alive(leased) and not alive(added)


def test_not_found_names_what_is_missing(client: Client, containerd) -> None:
    with pytest.raises(ImageNotFoundError, match="no/such:image"):
        client.images.get("no/such:image")
    missing = "sha256:" + "1" * 64
    with pytest.raises(ContentNotFoundError, match=missing):
        client.content.read_all(missing)
    with (
        Client(containerd.address, "estargz-opt-no-such-ns") as other,
        pytest.raises(NamespaceNotFoundError, match="'estargz-opt-no-such-ns' does not exist"),
    ):
        other.images.get("any")


def test_permission_denied_on_socket(containerd) -> None:
    """A user who may not open the socket is told so (not 'containerd is down')."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")
    code = (
        "import os, sys\n"
        "from estargz_opt.stores.containerd.client import Client\n"
        "from estargz_opt.stores.containerd.errors import ContainerdPermissionError\n"
        "client = Client(sys.argv[1])\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        "    client.version()\n"
        "except ContainerdPermissionError as e:\n"
        "    print(e)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, containerd.address],
        env=_same_package_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert f"permission denied on containerd socket {containerd.address}" in res.stdout


def test_calls_carry_the_namespace(client: Client, containerd) -> None:
    """What a client writes in one namespace is invisible from another."""
    data = os.urandom(1000)
    with Client(containerd.address, "estargz-opt-client-ns", timeout=60) as other:
        other.content.write("client-test-ns", data, _digest(data), len(data), {GC_ROOT: "t"})
        assert other.content.info(_digest(data)).size == len(data)
        with pytest.raises(ContentNotFoundError):
            client.content.info(_digest(data))
        assert "estargz-opt-client-ns" in other.namespaces()
        other.content.delete(_digest(data))


def test_rpc_error_is_not_leaked_as_grpc(client: Client) -> None:
    """Callers see our errors, never grpc.RpcError."""
    with pytest.raises(ContainerdError) as err:
        client.leases.delete("estargz-opt-no-such-lease")
    assert not isinstance(err.value, grpc.RpcError)
