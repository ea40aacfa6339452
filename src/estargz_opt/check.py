"""`verify` and `inspect`: what a converted image will do under lazy pulling, before it is pushed.

Conversions that "succeed" often produce images that never lazy-pull (no TOC digest
annotation, Docker media types, min-chunk TOCs, layers that are not eStargz). `verify`
checks each layer the way the snapshotter will, and more (DiffID, sizes, landmarks);
`inspect` reports what a lazy pull prefetches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

from estargz_opt import descriptor as d
from estargz_opt.constants import (
    LANDMARKS,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    TOC_IMAGE_SUFFIX,
    TOC_LAYER_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    ZSTD_MANIFEST_CHECKSUM_ANNOTATION,
    ZSTD_MANIFEST_POSITION_ANNOTATION,
)
from estargz_opt.descriptor import Descriptor, Manifest
from estargz_opt.digest import sha256_digest
from estargz_opt.errors import EstargzOptError, MissingExternalTOCError
from estargz_opt.format import open_layer, zchunked_verify
from estargz_opt.format.reader import Layer
from estargz_opt.platforms import Matcher
from estargz_opt.stores import Store, StoreOptions, open_store
from estargz_opt.stores.oci import OCILayout
from estargz_opt.walk import check_selection, images


@dataclass(slots=True)
class LayerCheck:
    """One layer as `verify` and `inspect` see it; errors fail `verify`."""

    platform: str
    index: int
    digest: str
    media_type: str
    format: str = ""
    size: int = 0
    uncompressed_size: int = 0
    entries: int = 0
    chunks: int = 0
    prioritized: list[str] = field(default_factory=list)
    landmark: str = ""
    prefetch_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def prefetch_share(self) -> float:
        return self.prefetch_bytes / self.size if self.size else 0.0

    def to_json(self) -> dict[str, Any]:
        """The layer in `verify --json`/`inspect --json`: camelCase keys, as every report."""
        out = {_camel(k): v for k, v in asdict(self).items()}
        out["ok"] = self.ok
        out["prefetchShare"] = round(self.prefetch_share, 4)
        return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.capitalize() for word in rest)


@dataclass(slots=True)
class ImageReport:
    """What `verify` or `inspect` found: the image (root digest) and each layer."""

    image: str
    digest: str
    layers: list[LayerCheck] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(layer.ok for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        layers = [layer.to_json() for layer in self.layers]
        return {"image": self.image, "digest": self.digest, "ok": self.ok} | {
            "warnings": self.warnings,
            "layers": layers,
        }


def check_image(
    store: Store,
    name: str,
    root: Descriptor,
    matcher: Matcher,
    *,
    deep: bool,
    toc_image: Descriptor | None = None,
) -> ImageReport:
    """Check (deep: every chunk, DiffID and size too) or just describe every layer."""
    report = ImageReport(image=name, digest=root.digest)
    check_selection(
        store, root, matcher, name, "choose with --platform, or give none to check every one"
    )
    external = _external_tocs(store, toc_image) if toc_image else {}
    for image in images(store, root, matcher):
        manifest = image.manifest
        label = image.platform or "image"
        config = d.load_json(store.read(manifest.config, f"config of {label}"), "config")
        rootfs = config.get("rootfs")
        diff_ids = (rootfs.get("diff_ids") if isinstance(rootfs, dict) else None) or []
        if d.is_docker(manifest.config.media_type) or any(
            d.is_docker(x.media_type) for x in manifest.layers
        ):
            _note(
                report,
                f"{label}: Docker media types cannot carry annotations; "
                "lazy pulling needs OCI types (convert with --oci)",
            )
        layers = [x for x in manifest.layers if x.media_type in d.LAYER_TYPES]
        for i, layer in enumerate(layers):
            diff_id = diff_ids[i] if i < len(diff_ids) else None
            check = _check_layer(store, label, i, layer, diff_id, deep, external)
            report.layers.append(check)
            for w in check.warnings:
                _note(report, f"{label} layer {i}: {w}")
    if not report.layers:
        raise EstargzOptError(f"{name}: no image manifest matches the platform selection")
    return report


def _note(report: ImageReport, message: str) -> None:
    if message not in report.warnings:
        report.warnings.append(message)


def _external_tocs(store: Store, toc_image: Descriptor) -> dict[str, bytes]:
    manifest = Manifest.parse(store.read(toc_image, "TOC image"), toc_image.digest)
    out = {}
    for layer in manifest.layers:
        target = (layer.annotations or {}).get(TOC_LAYER_DIGEST_ANNOTATION)
        if target:
            out[target] = store.read(layer, f"TOC blob for {target}")
    return out


def _check_layer(
    store: Store,
    platform: str,
    i: int,
    desc: Descriptor,
    diff_id: str | None,
    deep: bool,
    external: dict[str, bytes],
) -> LayerCheck:
    ann = desc.annotations or {}
    check = LayerCheck(platform, i, desc.digest, desc.media_type, size=desc.size)
    with ExitStack() as stack:
        path = stack.enter_context(store.local_file(desc, f"layer {i} of {platform}"))
        if zchunked_verify.is_containers_path(path):
            return _check_containers(check, path, ann, diff_id, deep)
        try:
            layer: Layer = stack.enter_context(
                open_layer(path, external_toc=external.get(desc.digest))
            )
        except EstargzOptError as exc:
            check.format = "not eStargz"
            check.errors.append(_unreadable(exc, ann, desc.digest in external, bool(external)))
            if not ann.get(TOC_DIGEST_ANNOTATION):
                check.warnings.append("layer is not eStargz (was the image converted?)")
            return check
        check.format = layer.format
        toc = layer.toc
        check.entries = sum(1 for e in toc.entries if e.type != "chunk")
        check.chunks = len(layer.chunks())
        names = [e.name for e in toc.entries if e.type != "chunk"]
        landmark = next((n for n in names if n in LANDMARKS), "")
        check.landmark = landmark
        if landmark == PREFETCH_LANDMARK:
            check.prioritized = [n for n in names[: names.index(landmark)] if not n.endswith("/")]
            entry = next(e for e in toc.entries if e.name == landmark)
            check.prefetch_bytes = entry.offset
        elif landmark == NO_PREFETCH_LANDMARK:
            check.prefetch_bytes = 0
        else:
            check.errors.append("no prefetch landmark: the layer was not built by an optimizer")
        want = ann.get(TOC_DIGEST_ANNOTATION)
        if not want:
            check.errors.append(
                f"missing annotation {TOC_DIGEST_ANNOTATION}: lazy pull cannot "
                "verify the TOC and falls back to a full pull"
            )
        elif want != layer.toc_digest:
            check.errors.append(f"TOC digest {layer.toc_digest} != annotation {want}")
        offsets = [c.offset for c in layer.chunks()]
        if len(offsets) != len(set(offsets)):
            check.warnings.append(
                "min-chunk-size TOC (chunks share offsets): upstream's "
                "VerifyTOC rejects it, so it is never reused"
            )
        if layer.format == "zstdchunked":
            check.errors.extend(_zstd_annotations(layer, ann))
        if not deep:
            check.uncompressed_size = int(ann.get(UNCOMPRESSED_SIZE_ANNOTATION, "0") or 0)
            return check
        try:
            payload = layer.verify()  # its full pass also measures the DiffID
        except EstargzOptError as exc:
            check.errors.append(str(exc))
            return check
        got_diff, usize = payload.diff_id, payload.uncompressed_size
        check.uncompressed_size = usize
        if diff_id and got_diff != diff_id:
            check.errors.append(f"DiffID {got_diff} != config rootfs.diff_ids[{i}] {diff_id}")
        size_ann = ann.get(UNCOMPRESSED_SIZE_ANNOTATION)
        if size_ann is None:
            check.errors.append(f"missing annotation {UNCOMPRESSED_SIZE_ANNOTATION}")
        elif size_ann != str(usize):
            check.errors.append(f"{UNCOMPRESSED_SIZE_ANNOTATION} {size_ann} != {usize} bytes")
    return check


def _check_containers(
    check: LayerCheck,
    path: str | os.PathLike[str],
    ann: dict[str, str],
    diff_id: str | None,
    deep: bool,
) -> LayerCheck:
    """A containers-flavour zstd:chunked layer, checked as c/storage will (deep) or described."""
    check.format = "zstdchunked-containers"
    if deep:
        r = zchunked_verify.verify_containers_layer(path, ann, diff_id)
        check.entries, check.chunks, check.errors = r.entries, r.chunks, r.errors
        check.uncompressed_size = r.uncompressed_size
        return check
    try:
        with open(path, "rb") as f:
            layer = zchunked_verify.open_containers_layer(f)
    except (EstargzOptError, ValueError) as exc:
        check.errors.append(f"unreadable containers zstd:chunked layer: {exc}")
        return check
    check.errors.extend(zchunked_verify.check_annotations(layer, ann))
    check.entries = sum(1 for e in layer.entries if e.get("type") != "chunk")
    check.chunks = sum(1 for e in layer.entries if e.get("type") in ("reg", "chunk"))
    return check


def _unreadable(exc: EstargzOptError, ann: dict[str, str], has_toc: bool, toc_image: bool) -> str:
    """Why a layer cannot be opened: external TOC problems, damage, or never converted."""
    message = str(exc)
    if isinstance(exc, MissingExternalTOCError):
        if toc_image and not has_toc:
            return f"external TOC: the TOC image ({TOC_IMAGE_SUFFIX}) has no TOC for this layer"
        return f"external TOC: the TOC image ({TOC_IMAGE_SUFFIX}) is missing"
    if ann.get(TOC_DIGEST_ANNOTATION):
        return f"damaged eStargz layer (annotated, but unreadable): {message}"
    return "not an eStargz or zstd:chunked layer: a lazy pull fetches it whole"


def _zstd_annotations(layer: Layer, ann: dict[str, str]) -> list[str]:
    footer = layer.footer
    raw = layer.read_at(footer.toc_offset or 0, footer.toc_size)
    want = {
        ZSTD_MANIFEST_POSITION_ANNOTATION: (
            f"{footer.toc_offset}:{footer.toc_size}:{len(layer.toc_json)}:1",
            "footer ",
        ),
        ZSTD_MANIFEST_CHECKSUM_ANNOTATION: (sha256_digest(raw), ""),
    }
    errors = []
    for key, (value, what) in want.items():
        if ann.get(key) != value:
            errors.append(f"{key} {ann.get(key)!r} != {what}{value}")
    return errors


def verify(
    image: str, *, platforms: Sequence[str] = (), store: StoreOptions | None = None
) -> ImageReport:
    """Check every layer of `image` the way a lazy pull and a full pull will read it
    (footer, TOC digest, every chunk, DiffID, sizes, landmark, annotations, the external
    TOC image); `ImageReport.ok` says whether all pass. `platforms`: only these (default:
    all); `image` is a containerd name, oci:DIR:TAG, oci-archive:PATH, docker://…"""
    return check_ref(image, store or StoreOptions(), _matcher(platforms), deep=True)


def inspect(
    image: str, *, platforms: Sequence[str] = (), store: StoreOptions | None = None
) -> ImageReport:
    """Describe what a lazy pull of `image` prefetches, per layer (no chunk is checked)."""
    return check_ref(image, store or StoreOptions(), _matcher(platforms), deep=False)


def _matcher(specs: Sequence[str]) -> Matcher:
    from estargz_opt import platforms

    return platforms.matcher(tuple(specs), not specs)


def check_ref(
    ref_text: str, store_opts: StoreOptions, matcher: Matcher, *, deep: bool
) -> ImageReport:
    """Open the image named ref_text (containerd name, oci:DIR:TAG, docker://…) and check
    it."""
    from estargz_opt import reference

    ref = reference.parse(ref_text)
    with open_store(ref, store_opts, create=False) as store:
        root = store.resolve(ref.tag)
        toc_image = None
        if ref.tag:
            try:
                toc_image = store.resolve(ref.tag + TOC_IMAGE_SUFFIX)
            except EstargzOptError:
                toc_image = None
        report = check_image(store, str(ref), root, matcher, deep=deep, toc_image=toc_image)
        if deep and isinstance(store, OCILayout):
            _note_unreferenced(report, store)
        return report


def _note_unreferenced(report: ImageReport, layout: OCILayout) -> None:
    """Blobs that no image uses: what an interrupted run (or one still running) left."""
    blobs = layout.unreferenced()
    if blobs:
        _note(
            report,
            f"{len(blobs)} blob(s) ({sum(size for _, size in blobs)} bytes) in {layout.root} "
            "are referenced by no image in its index.json (left by an interrupted or "
            f"still running conversion?): {', '.join(digest for digest, _ in blobs[:5])}"
            + (", …" if len(blobs) > 5 else ""),
        )
