"""Write small OCI images (an image layout) from layer tars, for interop tests.

The layout has ``oci-layout``, ``index.json`` and ``blobs/sha256/``: one
manifest (OCI media types, tar+gzip layers compressed with mtime 0 and no file
name, so the same tars give the same blobs) and a config whose
``rootfs.diff_ids`` are the sha256 of the layer tars, os ``linux`` and the
host's GOARCH. ``index.json`` names the image with the
``io.containerd.image.name`` annotation, which ``ctr images import`` uses as
the image name.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
import tarfile
from dataclasses import dataclass
from pathlib import Path

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
IMAGE_NAME_ANNOTATION = "io.containerd.image.name"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

# platform.machine() -> Go's GOARCH
_GOARCH = {
    "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
    "armv7l": "arm", "armv6l": "arm", "i386": "386", "i686": "386",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
}


def host_goarch() -> str:
    machine = platform.machine().lower()
    try:
        return _GOARCH[machine]
    except KeyError as e:
        raise RuntimeError(f"no GOARCH known for machine {machine!r}") from e


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class OCIImage:
    """An image written by :func:`write_oci_layout`."""

    layout: Path
    ref: str
    manifest_digest: str
    layer_digests: tuple[str, ...]
    diff_ids: tuple[str, ...]

    def blob(self, digest: str) -> Path:
        algo, hexpart = digest.split(":", 1)
        return self.layout / "blobs" / algo / hexpart

    @property
    def layer_blobs(self) -> tuple[Path, ...]:
        """The compressed layer blobs, bottom layer first."""
        return tuple(self.blob(d) for d in self.layer_digests)

    def archive(self, out: Path) -> Path:
        """Write the layout as a tar (``ctr images import`` input)."""
        with tarfile.open(out, "w") as tar:
            for name in ("oci-layout", "index.json", "blobs"):
                tar.add(self.layout / name, arcname=name)
        return out


def write_oci_layout(directory: Path, layer_tars: list[bytes], ref: str,
                     image_config: dict | None = None) -> OCIImage:
    """Write an image layout to *directory* with *layer_tars* (bottom first)."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        (blobs / digest[7:]).write_bytes(data)
        return digest, len(data)

    layers, layer_digests, diff_ids = [], [], []
    for raw in layer_tars:
        digest, size = put(gzip.compress(raw, compresslevel=6, mtime=0))
        layers.append({"mediaType": MEDIA_LAYER_GZIP, "digest": digest, "size": size})
        layer_digests.append(digest)
        diff_ids.append(sha256_digest(raw))
    arch = host_goarch()
    config = {
        "architecture": arch,
        "os": "linux",
        "config": image_config or {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_digest, config_size = put(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layers,
    }
    manifest_digest, manifest_size = put(json.dumps(manifest).encode())
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {IMAGE_NAME_ANNOTATION: ref, REF_NAME_ANNOTATION: tag},
        }],
    }
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (directory / "index.json").write_text(json.dumps(index))
    return OCIImage(directory, ref, manifest_digest, tuple(layer_digests), tuple(diff_ids))


def import_image(containerd, image: OCIImage, archive: Path) -> None:
    """``ctr images import`` the layout into *containerd* (no unpacking) and
    check that the image exists under its ref with the expected manifest."""
    image.archive(archive)
    containerd.ctr("images", "import", "--no-unpack", "--all-platforms", str(archive))
    target = image_target(containerd, image.ref)
    assert target == image.manifest_digest, (
        f"imported {image.ref} points at {target}, expected {image.manifest_digest}")


def image_target(containerd, ref: str) -> str:
    """The target digest of image *ref* (from ``ctr images ls``)."""
    out = containerd.ctr("images", "ls", f"name=={ref}").stdout
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    matches = [row[2] for row in rows if row and row[0] == ref]
    assert len(matches) == 1, f"image {ref!r} not listed once by ctr images ls:\n{out}"
    return matches[0]


def read_manifest(containerd, digest: str, arch: str | None = None) -> dict:
    """The manifest at *digest*; an index is followed to its linux/*arch* entry."""
    doc = json.loads(containerd.ctr("content", "get", digest).stdout)
    if doc.get("mediaType") == MEDIA_INDEX or "manifests" in doc:
        arch = arch or host_goarch()
        picks = [m for m in doc["manifests"]
                 if m.get("platform", {}).get("os") == "linux"
                 and m.get("platform", {}).get("architecture") == arch]
        assert picks, f"index {digest} has no linux/{arch} manifest: {doc}"
        return read_manifest(containerd, picks[0]["digest"], arch)
    return doc
