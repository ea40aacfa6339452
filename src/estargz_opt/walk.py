"""Walking an image: index -> manifests, with one rule for what is not a platform's image.

An index lists platform images, and beside them entries that are not images to convert
or check:
- attestations: BuildKit's manifests annotated `vnd.docker.reference.type`; they describe
  the manifest named by `vnd.docker.reference.digest` (its provenance, its SBOM);
- artifacts: manifests whose config is not an image config (signatures, Helm charts…).
The converter passes artifacts through untouched and re-points attestations at the
converted manifest; verify/inspect and the host-manifest lookup
skip them.

A single manifest (no index) has the platform its config names: it is selected by the same
rules as an index entry, so an arm64 image is never taken for the amd64 host's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from estargz_opt import descriptor as d
from estargz_opt.constants import REFERENCE_DIGEST_ANNOTATION, REFERENCE_TYPE_ANNOTATION
from estargz_opt.descriptor import Descriptor, Index, Manifest, Platform
from estargz_opt.errors import PlatformError
from estargz_opt.platforms import Matcher
from estargz_opt.stores import Store


def is_attestation(child: Descriptor) -> bool:
    """An index entry that describes another manifest rather than being a platform image."""
    return bool((child.annotations or {}).get(REFERENCE_TYPE_ANNOTATION))


def attested(child: Descriptor) -> str | None:
    """The digest of the manifest an attestation describes."""
    return (child.annotations or {}).get(REFERENCE_DIGEST_ANNOTATION)


def is_image(manifest: Manifest) -> bool:
    """An image manifest (its config is an image config); anything else is an artifact."""
    return manifest.config.media_type in (d.OCI_CONFIG, d.DOCKER_CONFIG)


def read_index(store: Store, desc: Descriptor) -> Index:
    return Index.parse(store.read(desc, "index"), f"index {desc.digest}")


def read_manifest(store: Store, desc: Descriptor, platform: str = "") -> Manifest:
    where = f"manifest {desc.digest}" + (f" ({platform})" if platform else "")
    return Manifest.parse(store.read(desc, where), where)


def config_platform(store: Store, manifest: Manifest, where: str) -> Platform | None:
    """The platform an image's config names (os, architecture, variant), as containerd
    reads it; None if it names no os or architecture (then nothing can be checked)."""
    what = f"config of {where}"
    config = d.load_json(store.read(manifest.config, what), what)
    os_, arch, variant = (config.get(k) for k in ("os", "architecture", "variant"))
    if not (isinstance(os_, str) and os_ and isinstance(arch, str) and arch):
        return None
    return Platform(os=os_, architecture=arch, variant=variant if isinstance(variant, str) else "")


def root_platform(store: Store, root: Descriptor, manifest: Manifest) -> Platform | None:
    """A single manifest's platform: its config's, else its descriptor's (an OCI layout's
    index.json may give one), else None (unknown, so accepted as any platform)."""
    where = str(root.platform) if root.platform else f"manifest {root.digest}"
    return config_platform(store, manifest, where) or root.platform


def no_match(image: str, matcher: Matcher, index: Index, hint: str = "") -> PlatformError:
    """An index none of whose images the matcher selects."""
    available = ", ".join(str(m.platform) for m in index.manifests if m.platform) or "none"
    return PlatformError(
        f"{image} has no image for {matcher.describe()}; it has: {available} "
        f"({hint or 'choose with --platform or --all-platforms'})"
    )


def check_selection(
    store: Store, root: Descriptor, matcher: Matcher, image: str, hint: str = ""
) -> None:
    """Fail before any work (a workload run, a download) if the matcher selects nothing:
    an index with no entry for the platforms, or a single manifest of another platform.
    `hint` replaces the advice on --platform (for commands that have no such option)."""
    if root.media_type in d.MANIFEST_TYPES:
        manifest = read_manifest(store, root)
        if not is_image(manifest):
            return
        platform = root_platform(store, root, manifest)
        if platform is not None and not matcher.matches(platform):
            raise PlatformError(
                f"{image} is an image for {platform}, not for {matcher.describe()}; "
                + (hint or f"convert it with --platform {platform} or --all-platforms")
            )
    elif root.media_type in d.INDEX_TYPES:
        index = read_index(store, root)
        if not any(
            child.platform is None or matcher.matches(child.platform)
            for child in index.manifests
            if not is_attestation(child) and child.media_type in d.INDEX_TYPES | d.MANIFEST_TYPES
        ):
            raise no_match(image, matcher, index, hint)


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
    lookup wants a manifest that says it runs here); a bare root manifest counts if its
    config's platform is selected or unknown.
    """
    yield from _walk(store, root, str(root.platform or ""), matcher, need_platform, root=True)


def _walk(
    store: Store,
    desc: Descriptor,
    platform: str,
    matcher: Matcher,
    need_platform: bool,
    root: bool = False,
) -> Iterator[PlatformImage]:
    if desc.media_type in d.MANIFEST_TYPES:
        manifest = read_manifest(store, desc, platform)
        if not is_image(manifest):
            return
        if root:
            own = root_platform(store, desc, manifest)
            if own is not None and not matcher.matches(own):
                return
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
