"""Unpack an image's layers into containerd snapshots, one committed snapshot per layer.

The sample container's rootfs is a snapshot prepared on the image's top chain ID, so every
layer must first exist as a committed snapshot named by its chain ID (the OCI image spec's
name for "this layer on top of all the layers below it"). That naming makes unpacking
idempotent and shareable: a chain that is already committed (by us, or by containerd's
own unpacker for a pulled image) is reused as is.

Each missing layer is applied through containerd's diff service into an active snapshot
with a temporary key, checked against the image config's diff ID, and committed as its
chain ID. Nothing here sets a gc.root label: the caller passes the lease that keeps the
new snapshots alive until it has prepared the rootfs snapshot on top of them (or has
finished with them).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence

from estargz_opt.descriptor import Descriptor
from estargz_opt.digest import sha256_digest
from estargz_opt.errors import BadInputError
from estargz_opt.stores.containerd.client import Client
from estargz_opt.stores.containerd.errors import (
    AlreadyExistsError,
    ContainerdError,
    NotFoundError,
)
from estargz_opt.stores.containerd.model import DEFAULT_SNAPSHOTTER
from estargz_opt.stores.containerd.services import SnapshotsService

log = logging.getLogger(__name__)


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain ID of each layer (OCI image spec, "ChainID"), bottom layer first.

    chain[0] is diff_ids[0]; chain[i] is the sha256 of "chain[i-1] diff_ids[i]". A chain
    ID names a whole stack of layers, so it is the name of that stack's snapshot.
    """
    chain: list[str] = []
    for diff_id in diff_ids:
        if chain:
            text = f"{chain[-1]} {diff_id}".encode()
            chain.append(sha256_digest(text))
        else:
            chain.append(diff_id)
    return chain


def unpack(
    client: Client,
    layers: Sequence[Descriptor],
    diff_ids: Sequence[str],
    snapshotter: str = DEFAULT_SNAPSHOTTER,
    *,
    lease: str | None,
) -> str:
    """Make sure each layer is a committed snapshot named by its chain ID; the top one's.

    `layers` are the manifest's layer descriptors (their blobs in the content store) and
    `diff_ids` the config's rootfs.diff_ids, in the same order. Pass a lease
    (`client.leases.hold()`): the snapshots it commits carry no gc.root label.

    A layer whose applied (uncompressed) digest is not its diff ID is refused, so the
    snapshot named by a chain ID always holds what that chain ID promises.
    """
    if not layers:
        raise BadInputError("the image has no layers to unpack")
    if len(layers) != len(diff_ids):
        raise BadInputError(
            f"the image has {len(layers)} layers but its config lists {len(diff_ids)} diff IDs"
        )
    parent = ""
    snapshots = client.snapshots(snapshotter)
    for layer, diff_id, chain_id in zip(layers, diff_ids, chain_ids(diff_ids), strict=True):
        if not _exists(snapshots, chain_id):
            _unpack_layer(client, snapshots, layer, diff_id, chain_id, parent, lease)
        parent = chain_id
    return parent


def _exists(snapshots: SnapshotsService, key: str) -> bool:
    try:
        snapshots.stat(key)
    except NotFoundError:
        return False
    return True


def _unpack_layer(
    client: Client,
    snapshots: SnapshotsService,
    layer: Descriptor,
    diff_id: str,
    chain_id: str,
    parent: str,
    lease: str | None,
) -> None:
    # A unique key: another unpack of the same image may be running concurrently, and an
    # active snapshot left by a crashed run must not block this one.
    key = f"extract-{secrets.token_hex(8)} {chain_id}"
    log.debug("unpacking layer %s as snapshot %s", layer.digest, chain_id)
    mounts = snapshots.prepare(key, parent, lease=lease)
    try:
        applied = client.diff.apply(layer, mounts, lease=lease)
        if applied.digest != diff_id:
            raise BadInputError(
                f"layer {layer.digest} unpacks to {applied.digest}, but the image config"
                f" says its diff ID is {diff_id}"
            )
        snapshots.commit(chain_id, key, lease=lease)
    except AlreadyExistsError:
        # A concurrent unpack committed the same chain first: same content, reuse it.
        log.debug("snapshot %s was committed concurrently", chain_id)
        snapshots.remove(key, missing_ok=True)
    except BaseException:
        # Leave no half-applied active snapshot behind; keep the original error.
        try:
            snapshots.remove(key, missing_ok=True)
        except ContainerdError:
            log.warning("could not remove the active snapshot %r", key, exc_info=True)
        raise
