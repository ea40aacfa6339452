"""Build OCI image layouts on disk for the ``estargz-opt optimize`` tests.

Shared by several test modules: keep the public API stable (add, don't change).

A layout is ``DIR/oci-layout``, ``DIR/index.json`` and ``DIR/blobs/sha256/``.
Every image is tagged in ``index.json`` with the
``org.opencontainers.image.ref.name`` annotation (skopeo's ``oci:DIR:TAG``).
Layers are tar+gzip with gzip mtime 0 and no file name, so the same tars
always give the same blobs; configs are written with sorted keys.

Main entry points (all return digests as ``"sha256:<hex>"``):

* :func:`write_layout` -- one single-platform image, tagged; returns the
  manifest digest.
* :func:`write_index` -- a multi-platform image index, tagged; returns the
  index digest. Optionally with an attestation manifest (platform
  unknown/unknown, an ``application/vnd.in-toto+json`` layer) and an artifact
  manifest of an unknown media type.
* :func:`write_busybox_image` -- a runnable busybox image whose Cmd prints
  :data:`BUSYBOX_HELLO`.
* Reading back: :func:`resolve_tag`, :func:`read_blob`, :func:`read_json`,
  :func:`platform_manifests`, :func:`layout_state`, :func:`tmp_files`,
  :func:`archive_for_ctr`.

Platforms are given as ``("linux", "arm64")``, ``("linux", "arm", "v7")``,
``"linux/arm64"`` or a dict; :data:`HOST_PLATFORM` is linux/<host GOARCH>.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.ociimage import host_goarch

# --- media types and annotations ------------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

IN_TOTO_LAYER = "application/vnd.in-toto+json"
# The OCI 1.1 release candidates' artifact manifest, dropped from the final
# spec: a manifest media type a converter does not know.
UNKNOWN_ARTIFACT_MANIFEST = "application/vnd.oci.artifact.manifest.v1+json"
UNKNOWN_ARTIFACT_TYPE = "application/vnd.example.estargz-opt-test.sbom+json"
UNKNOWN_BLOB = "application/vnd.example.estargz-opt-test.blob"

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_IMAGE_NAME = "io.containerd.image.name"
REFERENCE_TYPE = "vnd.docker.reference.type"
REFERENCE_DIGEST = "vnd.docker.reference.digest"
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
ZSTD_MANIFEST_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION = "io.containers.zstd-chunked.manifest-position"
TOC_LAYER_DIGEST = "containerd.io/snapshot/stargz/layer.digest"

HOST_PLATFORM: tuple[str, str] = ("linux", host_goarch())
UNKNOWN_PLATFORM: tuple[str, str] = ("unknown", "unknown")

BUSYBOX_HELLO = "hello-from-image"
BUSYBOX_CMD = ["/bin/busybox", "echo", BUSYBOX_HELLO]

# Fixed mtime for entries of :func:`simple_layer`: 2023-11-14T22:13:20Z.
LAYER_MTIME = 1_700_000_000

PlatformLike = tuple[str, ...] | str | Mapping[str, str]


# --- small helpers ------------------------------------------------------------------------------

def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def platform_dict(p: PlatformLike) -> dict[str, str]:
    """``("linux", "arm", "v7")`` / ``"linux/arm/v7"`` / dict -> OCI platform object."""
    if isinstance(p, Mapping):
        return dict(p)
    parts = p.split("/") if isinstance(p, str) else list(p)
    if len(parts) not in (2, 3):
        raise ValueError(f"platform {p!r}: want os/arch[/variant]")
    out = {"architecture": parts[1], "os": parts[0]}
    if len(parts) == 3 and parts[2]:
        out["variant"] = parts[2]
    return out


def platform_str(p: PlatformLike) -> str:
    d = platform_dict(p)
    return "/".join(x for x in (d["os"], d["architecture"], d.get("variant")) if x)


def gzip_layer(tar: bytes) -> bytes:
    """Deterministic tar+gzip: level 6, gzip mtime 0, no file name."""
    return gzip.compress(tar, compresslevel=6, mtime=0)


def simple_layer(files: Mapping[str, bytes | None]) -> bytes:
    """A small PAX layer tar: ``name -> bytes`` (regular file) or ``name -> None``
    (directory). Names ending in ``/`` are directories too. Order is kept, so
    list parent directories first."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name.rstrip("/") if data is None else name)
            info.mtime = LAYER_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if data is None or name.endswith("/"):
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = 0o644
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def blob_path(layout: Path | str, digest: str) -> Path:
    algo, hexpart = digest.split(":", 1)
    return Path(layout) / "blobs" / algo / hexpart


def put_blob(layout: Path | str, data: bytes) -> tuple[str, int]:
    """Store *data* under ``blobs/sha256``; return (digest, size)."""
    digest = sha256_digest(data)
    path = blob_path(layout, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return digest, len(data)


def put_json(layout: Path | str, doc: Any, *, sort_keys: bool = False) -> tuple[str, int]:
    return put_blob(layout, json.dumps(doc, sort_keys=sort_keys,
                                       separators=(",", ":")).encode())


def descriptor(media_type: str, digest: str, size: int, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    d.update({k: v for k, v in extra.items() if v is not None})
    return d


def read_blob(layout: Path | str, digest: str) -> bytes:
    return blob_path(layout, digest).read_bytes()


def read_json(layout: Path | str, digest: str) -> Any:
    return json.loads(read_blob(layout, digest))


def read_index_json(layout: Path | str) -> dict[str, Any]:
    return json.loads((Path(layout) / "index.json").read_text())


# --- index.json -------------------------------------------------------------------------------

def init_layout(layout: Path | str) -> Path:
    """Create an empty layout (oci-layout, empty index.json) if none is there."""
    layout = Path(layout)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    if not (layout / "oci-layout").exists():
        (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    if not (layout / "index.json").exists():
        (layout / "index.json").write_text(json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}))
    return layout


def tag_descriptor(layout: Path | str, tag: str, desc: Mapping[str, Any]) -> None:
    """Point *tag* in ``index.json`` at *desc* (an existing entry for the tag
    is replaced; other entries are kept in order)."""
    layout = init_layout(layout)
    index = read_index_json(layout)
    entry = dict(desc)
    entry["annotations"] = {**entry.get("annotations", {}), REF_NAME: tag}
    manifests = [m for m in index.get("manifests", [])
                 if m.get("annotations", {}).get(REF_NAME) != tag]
    manifests.append(entry)
    index["manifests"] = manifests
    (layout / "index.json").write_text(json.dumps(index))


def resolve_tag(layout: Path | str, tag: str) -> dict[str, Any]:
    """The ``index.json`` entry tagged *tag* (AssertionError unless exactly one)."""
    entries = [m for m in read_index_json(layout).get("manifests", [])
               if m.get("annotations", {}).get(REF_NAME) == tag]
    assert len(entries) == 1, f"{layout}: tag {tag!r} found {len(entries)} times in index.json"
    return entries[0]


def tags(layout: Path | str) -> list[str]:
    return [m.get("annotations", {}).get(REF_NAME) for m in
            read_index_json(layout).get("manifests", [])]


# --- manifests --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ManifestInfo:
    """What :func:`put_image_manifest` wrote (handy for assertions)."""

    descriptor: dict[str, Any]  # manifest descriptor, with platform
    config_digest: str
    layer_digests: tuple[str, ...]
    diff_ids: tuple[str, ...]

    @property
    def digest(self) -> str:
        return self.descriptor["digest"]


def put_image_manifest(layout: Path | str, layers: Sequence[bytes],
                       config_extra: Mapping[str, Any] | None = None,
                       platform: PlatformLike = HOST_PLATFORM,
                       docker_media_types: bool = False,
                       layer_annotations: Sequence[Mapping[str, str] | None] | None = None,
                       ) -> ManifestInfo:
    """Write layer blobs (gzip of each tar in *layers*, bottom first), a config
    and a manifest. Nothing is tagged. *config_extra* is merged into the
    config's top level (e.g. ``{"config": {"Cmd": [...]}}``)."""
    layout = init_layout(layout)
    plat = platform_dict(platform)
    layer_type = DOCKER_LAYER_GZIP if docker_media_types else OCI_LAYER_GZIP
    layer_descs, layer_digests, diff_ids = [], [], []
    for i, raw in enumerate(layers):
        digest, size = put_blob(layout, gzip_layer(raw))
        ann = layer_annotations[i] if layer_annotations else None
        layer_descs.append(descriptor(layer_type, digest, size,
                                      annotations=dict(ann) if ann else None))
        layer_digests.append(digest)
        diff_ids.append(sha256_digest(raw))
    config: dict[str, Any] = {
        "architecture": plat["architecture"],
        "os": plat["os"],
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    if "variant" in plat:
        config["variant"] = plat["variant"]
    config.update(config_extra or {})
    config_digest, config_size = put_json(layout, config, sort_keys=True)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker_media_types else OCI_MANIFEST,
        "config": descriptor(DOCKER_CONFIG if docker_media_types else OCI_CONFIG,
                             config_digest, config_size),
        "layers": layer_descs,
    }
    m_digest, m_size = put_json(layout, manifest)
    desc = descriptor(manifest["mediaType"], m_digest, m_size, platform=plat)
    return ManifestInfo(desc, config_digest, tuple(layer_digests), tuple(diff_ids))


def put_attestation_manifest(layout: Path | str, subject_digest: str) -> dict[str, Any]:
    """A BuildKit-style attestation manifest for *subject_digest*: OCI manifest
    with one ``application/vnd.in-toto+json`` layer. Returns its index
    descriptor (platform unknown/unknown, ``vnd.docker.reference.*``)."""
    statement = {
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://spdx.dev/Document",
        "subject": [{"name": "estargz-opt-test",
                     "digest": {"sha256": subject_digest.split(":", 1)[1]}}],
        "predicate": {"spdxVersion": "SPDX-2.3", "name": "estargz-opt-test"},
    }
    raw = json.dumps(statement, sort_keys=True).encode()
    l_digest, l_size = put_blob(layout, raw)
    config = {"architecture": "unknown", "os": "unknown", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [l_digest]}}
    c_digest, c_size = put_json(layout, config, sort_keys=True)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, c_digest, c_size),
        "layers": [descriptor(IN_TOTO_LAYER, l_digest, l_size,
                              annotations={"in-toto.io/predicate-type":
                                           "https://spdx.dev/Document"})],
    }
    m_digest, m_size = put_json(layout, manifest)
    return descriptor(OCI_MANIFEST, m_digest, m_size,
                      annotations={REFERENCE_DIGEST: subject_digest,
                                   REFERENCE_TYPE: "attestation-manifest"},
                      platform=platform_dict(UNKNOWN_PLATFORM))


def put_artifact_manifest(layout: Path | str, subject: Mapping[str, Any] | None = None,
                          media_type: str = UNKNOWN_ARTIFACT_MANIFEST,
                          platform: PlatformLike | None = None) -> dict[str, Any]:
    """A manifest of a media type converters do not know (default: the
    withdrawn OCI artifact manifest) with one blob of an unknown type. Returns
    its index descriptor (no platform unless *platform* is given)."""
    payload = b'{"sbom":"estargz-opt test artifact"}\n'
    b_digest, b_size = put_blob(layout, payload)
    doc: dict[str, Any] = {
        "mediaType": media_type,
        "artifactType": UNKNOWN_ARTIFACT_TYPE,
        "blobs": [descriptor(UNKNOWN_BLOB, b_digest, b_size)],
    }
    if subject is not None:
        doc["subject"] = descriptor(subject["mediaType"], subject["digest"], subject["size"])
    m_digest, m_size = put_json(layout, doc)
    return descriptor(media_type, m_digest, m_size, artifactType=UNKNOWN_ARTIFACT_TYPE,
                      platform=platform_dict(platform) if platform is not None else None)


def put_index(layout: Path | str, manifests: Sequence[Mapping[str, Any]],
              docker_media_types: bool = False) -> dict[str, Any]:
    """Write an image index (Docker manifest list if *docker_media_types*)
    listing *manifests*; return its descriptor (untagged)."""
    media_type = DOCKER_LIST if docker_media_types else OCI_INDEX
    doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": [dict(m) for m in manifests]}
    digest, size = put_json(layout, doc)
    return descriptor(media_type, digest, size)


# --- one-call builders ----------------------------------------------------------------------

def write_layout(layout: Path | str, tag: str, layers: Sequence[bytes],
                 config_extra: Mapping[str, Any] | None = None,
                 platform: PlatformLike = HOST_PLATFORM,
                 docker_media_types: bool = False) -> str:
    """Write a single-platform image into *layout* (created if missing),
    tag it *tag* in ``index.json`` and return the manifest digest."""
    info = put_image_manifest(layout, layers, config_extra, platform, docker_media_types)
    tag_descriptor(layout, tag, info.descriptor)
    return info.digest


def write_index(layout: Path | str, tag: str,
                images: Sequence[tuple[PlatformLike, Sequence[bytes]]],
                config_extra: Mapping[str, Any] | None = None,
                docker_media_types: bool = False,
                attestation: bool = False,
                artifact: bool = False) -> str:
    """Write a multi-platform image: one manifest per ``(platform, layers)``,
    in order, in an image index tagged *tag*; return the index digest.

    *attestation* appends an attestation manifest (unknown/unknown, in-toto
    layer) for the first image; *artifact* appends a manifest of an unknown
    media type (no platform) whose subject is the first image."""
    infos = [put_image_manifest(layout, layers, config_extra, plat, docker_media_types)
             for plat, layers in images]
    descs = [i.descriptor for i in infos]
    if attestation:
        descs.append(put_attestation_manifest(layout, infos[0].digest))
    if artifact:
        descs.append(put_artifact_manifest(layout, subject=infos[0].descriptor))
    index = put_index(layout, descs, docker_media_types)
    tag_descriptor(layout, tag, index)
    return index["digest"]


def busybox_config(cmd: Sequence[str] = tuple(BUSYBOX_CMD)) -> dict[str, Any]:
    return {"config": {"Cmd": list(cmd), "Env": ["PATH=/bin"], "WorkingDir": "/"}}


def write_busybox_image(layout: Path | str, tag: str, busybox_tar: Path | bytes,
                        extra_layers: Sequence[bytes] = (),
                        cmd: Sequence[str] = tuple(BUSYBOX_CMD),
                        platform: PlatformLike = HOST_PLATFORM,
                        docker_media_types: bool = False) -> str:
    """A runnable image: the busybox layer (the ``busybox_layer`` fixture)
    then *extra_layers*, Cmd *cmd* (default prints :data:`BUSYBOX_HELLO`).
    Returns the manifest digest."""
    raw = busybox_tar.read_bytes() if isinstance(busybox_tar, Path) else busybox_tar
    return write_layout(layout, tag, [raw, *extra_layers], busybox_config(cmd),
                        platform, docker_media_types)


# --- reading back -----------------------------------------------------------------------------

def is_index(desc_or_doc: Mapping[str, Any]) -> bool:
    return desc_or_doc.get("mediaType") in (OCI_INDEX, DOCKER_LIST) or (
        "manifests" in desc_or_doc and "layers" not in desc_or_doc)


def platform_manifests(layout: Path | str, tag: str) -> list[tuple[dict | None, dict, dict]]:
    """``(platform, manifest descriptor, manifest document)`` for every image
    manifest behind *tag* (an index is followed one level; entries that are not
    image manifests are skipped)."""
    top = resolve_tag(layout, tag)
    if top["mediaType"] in (OCI_MANIFEST, DOCKER_MANIFEST):
        return [(top.get("platform"), top, read_json(layout, top["digest"]))]
    doc = read_json(layout, top["digest"])
    return [(m.get("platform"), m, read_json(layout, m["digest"]))
            for m in doc.get("manifests", [])
            if m.get("mediaType") in (OCI_MANIFEST, DOCKER_MANIFEST)]


def referenced_digests(layout: Path | str, tag: str | None = None) -> set[str]:
    """Every digest reachable from *tag* (or from all of ``index.json``),
    whose blob exists or not."""
    roots = ([resolve_tag(layout, tag)] if tag is not None
             else read_index_json(layout).get("manifests", []))
    seen: set[str] = set()
    stack = [dict(d) for d in roots]
    while stack:
        d = stack.pop()
        if d["digest"] in seen:
            continue
        seen.add(d["digest"])
        mt = d.get("mediaType", "")
        if mt in (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST) and \
                blob_path(layout, d["digest"]).exists():
            doc = read_json(layout, d["digest"])
            stack.extend(doc.get("manifests", []))
            if "config" in doc:
                stack.append(doc["config"])
            stack.extend(doc.get("layers", []))
    return seen


def layout_state(layout: Path | str) -> dict[str, str]:
    """``relative path -> sha256`` of every regular file under *layout*
    (compare before/after to prove a failed run left DST untouched)."""
    layout = Path(layout)
    out = {}
    for p in sorted(layout.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[p.relative_to(layout).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tmp_files(layout: Path | str) -> list[str]:
    """Leftover temporary files: any name containing ``.tmp`` (``x.tmp``, ``x.tmp.123``)."""
    layout = Path(layout)
    if not layout.exists():
        return []
    return sorted(p.relative_to(layout).as_posix() for p in layout.rglob("*")
                  if ".tmp" in p.name)


def archive_for_ctr(layout: Path | str, tag: str, image_name: str, out: Path | str) -> Path:
    """Tar *layout* for ``ctr images import``: ``index.json`` in the archive
    holds only *tag*'s entry, named *image_name* with the
    ``io.containerd.image.name`` annotation; blobs reachable from it only."""
    layout, out = Path(layout), Path(out)
    entry = dict(resolve_tag(layout, tag))
    entry["annotations"] = {**entry.get("annotations", {}), CONTAINERD_IMAGE_NAME: image_name}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}

    def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(out, "w") as tar:
        add_bytes(tar, "oci-layout", (layout / "oci-layout").read_bytes())
        add_bytes(tar, "index.json", json.dumps(index).encode())
        for digest in sorted(referenced_digests(layout, tag)):
            path = blob_path(layout, digest)
            if path.exists():
                tar.add(path, arcname=os.path.relpath(path, layout))
    return out


def all_layer_descriptors(layout: Path | str, tag: str) -> Iterable[tuple[dict, dict]]:
    """``(manifest descriptor, layer descriptor)`` for every layer behind *tag*."""
    for _plat, mdesc, manifest in platform_manifests(layout, tag):
        for layer in manifest.get("layers", []):
            yield mdesc, layer
