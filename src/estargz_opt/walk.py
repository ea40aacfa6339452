"""Walking an image: index -> manifests, with one rule for what is not a platform's image.

An index lists platform images, and beside them entries that are not images to convert
or check:
- attestations: BuildKit's manifests annotated `vnd.docker.reference.type`; they describe
  the manifest named by `vnd.docker.reference.digest` (its provenance, its SBOM);
- artifacts: manifests whose config is not an image config (signatures, Helm charts…).
The converter passes both through untouched; verify/inspect and the host-manifest lookup
skip them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from estargz_opt import descriptor as d
from estargz_opt.descriptor import Descriptor, Index, Manifest
from estargz_opt.platforms import Matcher
from estargz_opt.stores import Store

REFERENCE_TYPE = "vnd.docker.reference.type"
REFERENCE_DIGEST = "vnd.docker.reference.digest"


def is_attestation(child: Descriptor) -> bool:
    """An index entry that describes another manifest rather than being a platform image."""
    return bool((child.annotations or {}).get(REFERENCE_TYPE))


def attested(child: Descriptor) -> str | None:
    """The digest of the manifest an attestation describes."""
    return (child.annotations or {}).get(REFERENCE_DIGEST)


def is_image(manifest: Manifest) -> bool:
    """An image manifest (its config is an image config); anything else is an artifact."""
    return manifest.config.media_type in (d.OCI_CONFIG, d.DOCKER_CONFIG)


def read_index(store: Store, desc: Descriptor) -> Index:
    return Index.parse(store.read(desc, "index"), f"index {desc.digest}")


def read_manifest(store: Store, desc: Descriptor, platform: str = "") -> Manifest:
    where = f"manifest {desc.digest}" + (f" ({platform})" if platform else "")
    return Manifest.parse(store.read(desc, where), where)


@dataclass(frozen=True, slots=True)
class PlatformImage:
    """An image manifest reached from the root, with the platform its index gives it."""

    desc: Descriptor
    #: the platform of the index entry (or root descriptor) that led here ("" if none)
    platform: str
    manifest: Manifest


def images(
    store: Store, root: Descriptor, matcher: Matcher, *, need_platform: bool = False
) -> Iterator[PlatformImage]:
    """Every image manifest under `root` whose platform the matcher selects, in index order.

    Index entries without a platform are followed unless `need_platform` (the host-manifest
    lookup wants a manifest that says it runs here); a bare root manifest always counts.
    """
    yield from _walk(store, root, str(root.platform or ""), matcher, need_platform)


def _walk(
    store: Store, desc: Descriptor, platform: str, matcher: Matcher, need_platform: bool
) -> Iterator[PlatformImage]:
    if desc.media_type in d.MANIFEST_TYPES:
        manifest = read_manifest(store, desc, platform)
        if is_image(manifest):
            yield PlatformImage(desc, platform, manifest)
        return
    if desc.media_type not in d.INDEX_TYPES:
        return
    for child in read_index(store, desc).manifests:
        if is_attestation(child) or child.media_type not in d.INDEX_TYPES | d.MANIFEST_TYPES:
            continue
        if child.platform is None:
            if need_platform:
                continue
        elif not matcher.matches(child.platform):
            continue
        here = str(child.platform) if child.platform else platform
        yield from _walk(store, child, here, matcher, need_platform)
