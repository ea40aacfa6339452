"""Unpacking an image's layers into committed snapshots named by chain ID.

Against the session's private containerd, under one lease (the committed snapshots carry
no gc.root label, as in a real sampler run). Every test removes the snapshots and blobs
it made, top-down, in a finally.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import imagefactory as f

from estargz_opt.descriptor import OCI_LAYER_GZIP, Descriptor
from estargz_opt.errors import BadInputError
from estargz_opt.stores.containerd.client import Client
from estargz_opt.workload.containerd.unpack import chain_ids, unpack


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.unit
def test_chain_ids_follow_the_oci_image_spec() -> None:
    a, b, c = (_sha(x) for x in (b"a", b"b", b"c"))
    # Written out by hand from the spec: ChainID(L0|..|Ln) = Digest(ChainID(..Ln-1) + " " + Ln).
    ab = "sha256:" + hashlib.sha256((a + " " + b).encode()).hexdigest()
    abc = "sha256:" + hashlib.sha256((ab + " " + c).encode()).hexdigest()
    assert chain_ids([a, b, c]) == [a, ab, abc]
    assert chain_ids([a]) == [a]
    assert chain_ids([]) == []


@pytest.fixture
def lease(client: Client) -> Iterator[str]:
    """One lease for the test's blobs and snapshots, deleted (synchronously) after it."""
    with client.leases.hold(sync=True) as lease_id:
        yield lease_id


def _store(client: Client, lease: str, blob: bytes) -> Descriptor:
    digest = _sha(blob)
    client.content.write(
        f"estargz-opt-test-unpack-{secrets.token_hex(6)}",
        blob,
        expected_digest=digest,
        expected_size=len(blob),
        lease=lease,
    )
    return Descriptor(media_type=OCI_LAYER_GZIP, digest=digest, size=len(blob))


def _snapshots(client: Client) -> dict[str, tuple[str, str]]:
    return {s.name: (s.parent, s.kind) for s in client.snapshots().list()}


def _ctr_snapshots(containerd) -> dict[str, tuple[str, str]]:
    out = containerd.ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    # KEY PARENT KIND; PARENT is empty for a bottom layer.
    return {r[0]: ("" if len(r) == 2 else r[1], r[-1].lower()) for r in rows}


def _cleanup(client: Client, chains: list[str], blobs: list[Descriptor], keep: set[str]) -> None:
    """Remove the test's snapshots top-down (a parent cannot go before its child).

    `keep`: snapshots that existed before the test (e.g. busybox's, unpacked by an
    image import elsewhere in the session) are not the test's to remove.
    """
    for chain in reversed(chains):
        if chain not in keep:
            client.snapshots().remove(chain, missing_ok=True)
    for blob in blobs:
        client.content.delete(blob.digest)


def test_unpack_two_layers_is_idempotent(
    client: Client, containerd, busybox_layer: Path, lease: str
) -> None:
    tars = [
        busybox_layer.read_bytes(),
        f.simple_layer({"etc/": None, "etc/estargz-opt-unpack": secrets.token_bytes(8)}),
    ]
    diff_ids = [_sha(t) for t in tars]
    chains = chain_ids(diff_ids)
    layers: list[Descriptor] = []
    before = _snapshots(client)
    try:
        layers = [_store(client, lease, f.gzip_layer(t)) for t in tars]
        top = unpack(client, layers, diff_ids, lease=lease)
        assert top == chains[-1]
        snaps = _snapshots(client)
        assert snaps[chains[0]] == ("", "committed")
        assert snaps[chains[1]] == (chains[0], "committed")
        ctr = _ctr_snapshots(containerd)
        assert ctr[chains[0]] == ("", "committed")
        assert ctr[chains[1]] == (chains[0], "committed")
        # Nothing else is left: no temporary active snapshot.
        assert set(snaps) - set(before) == set(chains) - set(before)

        created = {c: client.snapshots().stat(c).created_at for c in chains}
        assert unpack(client, layers, diff_ids, lease=lease) == top
        assert {c: client.snapshots().stat(c).created_at for c in chains} == created
        assert _snapshots(client) == snaps
    finally:
        _cleanup(client, chains, layers, set(before))
    assert not (set(chains) - set(before)) & set(_snapshots(client))


def test_unpack_refuses_a_layer_that_is_not_its_diff_id(client: Client, lease: str) -> None:
    tars = [
        f.simple_layer({"a": secrets.token_bytes(8)}),
        f.simple_layer({"b": secrets.token_bytes(8)}),
    ]
    wrong = _sha(b"not this layer")
    diff_ids = [_sha(tars[0]), wrong]
    chains = chain_ids(diff_ids)
    layers: list[Descriptor] = []
    before = _snapshots(client)
    try:
        layers = [_store(client, lease, f.gzip_layer(t)) for t in tars]
        with pytest.raises(BadInputError) as e:
            unpack(client, layers, diff_ids, lease=lease)
        assert layers[1].digest in str(e.value) and wrong in str(e.value)
        after = _snapshots(client)
        # The good bottom layer stays committed; the bad one left nothing behind.
        assert set(after) - set(before) == {chains[0]}
        assert chains[1] not in after
        assert not [k for k, (_, kind) in after.items() if kind == "active" and k not in before]
    finally:
        _cleanup(client, chains, layers, set(before))


def test_unpack_checks_layer_and_diff_id_counts(client: Client, lease: str) -> None:
    with pytest.raises(BadInputError, match="2 layers but its config lists 1"):
        unpack(client, [Descriptor(OCI_LAYER_GZIP, _sha(b"x"), 1)] * 2, [_sha(b"x")], lease=lease)
