"""The per-service client: service objects over one connection, leases passed per call,
the ingest protocol step by step, and the gRPC error table, against a private containerd."""

from __future__ import annotations

import hashlib
import os
import secrets

import pytest

from estargz_opt.descriptor import OCI_CONFIG, OCI_MANIFEST, Descriptor, dump
from estargz_opt.stores.containerd.client import Client
from estargz_opt.stores.containerd.content import Ingest
from estargz_opt.stores.containerd.errors import (
    AlreadyExistsError,
    ContentNotFoundError,
    NotFoundError,
)
from estargz_opt.stores.containerd.model import Image

MiB = 1 << 20


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _ref(what: str) -> str:
    return f"services-test-{what}-{secrets.token_hex(6)}"


def _alive(client: Client, digest: str) -> bool:
    try:
        client.content.info(digest)
    except ContentNotFoundError:
        return False
    return True


def _collect(client: Client) -> None:
    """Run a garbage collection and wait for it (deleting any lease with sync does)."""
    client.leases.delete(client.leases.create().id, sync=True)


def test_services_share_one_connection(client: Client) -> None:
    """What one service object writes, the others see at once: a blob written through
    content is the target of an image created through images."""
    config = b"{}"
    name = f"example.test/services/{secrets.token_hex(4)}:1"
    with client.leases.hold() as lease:
        client.content.write(_ref("config"), config, _digest(config), len(config), lease=lease)
        doc = dump(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": _digest(config), "size": 2},
                "layers": [],
            }
        )
        client.content.write(_ref("manifest"), doc, _digest(doc), len(doc), lease=lease)
        target = Descriptor(OCI_MANIFEST, _digest(doc), len(doc))
        client.images.create(Image(name=name, target=target))
        try:
            assert client.images.get(name).target == target
        finally:
            client.images.delete(name)


def test_snapshots_are_per_snapshotter(client: Client) -> None:
    """client.snapshots(name) is the service of that snapshotter only."""
    key = _ref("native")
    with client.leases.hold(sync=True) as lease:
        native = client.snapshots("native")
        native.prepare(key, lease=lease)
        try:
            assert key in {s.name for s in native.list()}
            assert key not in {s.name for s in client.snapshots().list()}
            with pytest.raises(NotFoundError):
                client.snapshots("overlayfs").stat(key)
        finally:
            native.remove(key, missing_ok=True)


def test_lease_is_passed_per_call_not_kept(client: Client) -> None:
    """Inside hold(), only the calls given the lease are covered: a write without it on
    the same client is collected, and the lease's own writes go when it is deleted."""
    leased_data, bare_data = b"leased " + os.urandom(2048), b"bare " + os.urandom(2048)
    with client.leases.hold(sync=True) as lease:
        leased = client.content.write(
            _ref("leased"), leased_data, _digest(leased_data), len(leased_data), lease=lease
        ).digest
        bare = client.content.write(
            _ref("bare"), bare_data, _digest(bare_data), len(bare_data)
        ).digest
        _collect(client)
        assert _alive(client, leased)
        assert not _alive(client, bare), "a call without lease= was covered by the lease"
    assert not _alive(client, leased)


def test_two_leases_on_one_client_do_not_mix(client: Client) -> None:
    """Two users of one client (a conversion, a workload run) each keep their own lease."""
    a_data, b_data = b"a " + os.urandom(2048), b"b " + os.urandom(2048)
    with client.leases.hold(sync=True) as lease_a:
        with client.leases.hold(sync=True) as lease_b:
            a = client.content.write(_ref("a"), a_data, _digest(a_data), len(a_data), lease=lease_a)
            b = client.content.write(_ref("b"), b_data, _digest(b_data), len(b_data), lease=lease_b)
        # lease_b is gone (and its collection ran): b went with it, a stays.
        assert not _alive(client, b.digest)
        assert _alive(client, a.digest)


def test_ingest_steps(client: Client) -> None:
    """stat, resume, write, commit, each observable on its own."""
    data = os.urandom(3 * MiB)
    ref, digest = _ref("ingest"), _digest(data)
    with client.leases.hold() as lease:
        with Ingest(client.transport, ref, digest, len(data), lease) as ingest:
            held = ingest.stat()
            assert (held.offset, ingest.offset) == (0, 0)
            ingest.write([data[:MiB], data[MiB : 2 * MiB]])
            assert ingest.offset == 2 * MiB
        # Left without commit: containerd keeps the two MiB under the ref.
        status = client.content.status(ref)
        assert status is not None and status.offset == 2 * MiB

        with Ingest(client.transport, ref, digest, len(data), lease) as ingest:
            held = ingest.stat()
            assert held.offset == 2 * MiB and held.digest == _digest(data[: 2 * MiB])
            rest = list(ingest.resume(iter([data]), held))
            assert ingest.resumed_from == ingest.offset == 2 * MiB
            assert b"".join(rest) == data[2 * MiB :]
            ingest.write(rest)
            result = ingest.commit({"services-test": "1"})
        assert (result.digest, result.size, result.resumed_from) == (digest, len(data), 2 * MiB)
        assert client.content.info(digest).labels == {"services-test": "1"}
        assert client.content.status(ref) is None
        client.content.delete(digest)


def test_ingest_resume_restarts_on_other_bytes(client: Client) -> None:
    """An ingest holding bytes that are not a prefix of the data starts over from 0."""
    ref = _ref("restart")
    stale, data = os.urandom(MiB), os.urandom(2 * MiB)
    with client.leases.hold() as lease:
        with Ingest(client.transport, ref, None, None, lease) as ingest:
            ingest.write([stale])
        with Ingest(client.transport, ref, None, None, lease) as ingest:
            held = ingest.stat()
            assert held.offset == MiB
            rest = b"".join(ingest.resume(iter([data]), held))
            assert ingest.offset == 0 and rest == data  # replayed whole, from the spool
            ingest.write([rest])
            result = ingest.commit({})
        assert result.digest == _digest(data) and result.resumed_from == 0
        client.content.delete(result.digest)


def test_error_table(client: Client) -> None:
    """Each gRPC status containerd returns becomes the error class the table names."""
    lease = client.leases.create(f"services-test-dup-{secrets.token_hex(4)}")  # the namespace
    try:
        with pytest.raises(AlreadyExistsError, match=f"lease {lease.id} already exists"):
            client.leases.create(lease.id)
        missing = "sha256:" + "2" * 64
        with pytest.raises(ContentNotFoundError, match=f"content {missing} not found"):
            client.content.info(missing)
        with pytest.raises(NotFoundError, match="snapshot no-such-snapshot not found"):
            client.snapshots().stat("no-such-snapshot")
    finally:
        client.leases.delete(lease.id)
    with pytest.raises(NotFoundError, match="lease services-test-gone not found"):
        client.leases.delete("services-test-gone")
