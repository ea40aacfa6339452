"""The wire facts estargz-opt shares with other tools, each written once.

Media types, annotation and label keys, the names of the special tar entries in a layer,
the tag suffix of the external-TOC image, and the size limits and I/O block sizes the
modules share. These are fixed by the OCI image spec, containerd, the stargz-snapshotter
and containers/storage: changing one makes our images unreadable to them, so every
module imports them from here instead of spelling them.
"""

from __future__ import annotations

from typing import Final

# -- media types (OCI image spec; Docker's v2 schema 2) ---------------------------------
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_LAYER: Final = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP: Final = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD: Final = OCI_LAYER + "+zstd"
OCI_FOREIGN: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar"
DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER: Final = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP: Final = DOCKER_LAYER + ".gzip"
DOCKER_LAYER_ZSTD: Final = DOCKER_LAYER + ".zstd"  # containerd's name; docker has no zstd type
DOCKER_FOREIGN: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_FOREIGN_GZIP: Final = DOCKER_FOREIGN + ".gzip"
#: artifact types of signatures attached as OCI referrers: cosign's, sigstore's bundle
#: (cosign 2.5 --new-bundle-format) and notation's; they sign a digest, so never move
SIGNATURE_ARTIFACT_TYPES: Final = frozenset(
    {
        "application/vnd.dev.cosign.artifact.sig.v1+json",
        "application/vnd.dev.sigstore.bundle.v0.3+json",
        "application/vnd.cncf.notary.signature",
    }
)
#: cosign's tag suffixes beside an image: its signatures, its attestations
COSIGN_SIGNATURE_SUFFIX: Final = ".sig"
COSIGN_ATTESTATION_SUFFIX: Final = ".att"

# -- annotations (on descriptors) ----------------------------------------------------
#: the sha256 of a layer's TOC JSON: what the stargz snapshotter checks before lazy pulling
TOC_DIGEST_ANNOTATION: Final = "containerd.io/snapshot/stargz/toc.digest"
#: the size of a layer's tar, written beside the TOC digest (the DiffID cannot be checked
#: without reading the whole layer, the size can)
UNCOMPRESSED_SIZE_ANNOTATION: Final = "io.containers.estargz.uncompressed-size"
#: on a layer of the external-TOC image: the digest of the layer whose TOC it holds
TOC_LAYER_DIGEST_ANNOTATION: Final = "containerd.io/snapshot/stargz/layer.digest"
#: zstd:chunked: the digest of the compressed TOC, and where it sits in the blob
ZSTD_MANIFEST_CHECKSUM_ANNOTATION: Final = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION_ANNOTATION: Final = "io.containers.zstd-chunked.manifest-position"
#: an index entry's tag in an OCI image layout
REF_NAME_ANNOTATION: Final = "org.opencontainers.image.ref.name"
#: BuildKit's attestation entries in an index: their kind, and the manifest they describe
REFERENCE_TYPE_ANNOTATION: Final = "vnd.docker.reference.type"
REFERENCE_DIGEST_ANNOTATION: Final = "vnd.docker.reference.digest"
#: ours: on an attestation re-pointed at a converted manifest, the source manifest's digest
#: (what the attestation's subject names; the converted one has the same files, re-encoded)
SOURCE_DIGEST_ANNOTATION: Final = "io.github.estargz-opt.source.digest"

# -- containerd labels (on content and images) ----------------------------------------
UNCOMPRESSED_LABEL: Final = "containerd.io/uncompressed"
GC_CONTENT_LABEL: Final = "containerd.io/gc.ref.content"
GC_EXPIRE_LABEL: Final = "containerd.io/gc.expire"

# -- special entries inside a layer ------------------------------------------------------
#: the TOC's tar entry (eStargz: the last member holds it)
TOC_TAR_NAME: Final = "stargz.index.json"
#: the entry that ends the prioritized files: a lazy pull prefetches everything before it
PREFETCH_LANDMARK: Final = ".prefetch.landmark"
#: the entry first in a layer with no prioritized files: prefetch nothing
NO_PREFETCH_LANDMARK: Final = ".no.prefetch.landmark"
LANDMARKS: Final = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
#: the one byte a landmark holds (upstream's choice; readers do not look at it)
LANDMARK_CONTENTS: Final = b"\x0f"

# -- images -----------------------------------------------------------------------
#: the tag of the image that holds the TOCs of TAG's estargz-external-toc layers
TOC_IMAGE_SUFFIX: Final = "-esgztoc"

# -- sizes ----------------------------------------------------------------------------
#: bytes per chunk of a regular file in a converted layer (upstream's default)
DEFAULT_CHUNK_SIZE: Final = 4 << 20
#: a TOC bigger than this is refused (upstream and containers/storage refuse it too)
MAX_TOC_SIZE: Final = 150 << 20
#: a manifest, index or config bigger than this is refused: it names no image we can use
MAX_MANIFEST_SIZE: Final = 4 << 20
#: the block size of plain file and stream copies (big enough to amortise system calls,
#: small enough to keep memory flat)
IO_CHUNK: Final = 1 << 20
#: the converted-layer cache evicts least recently used entries beyond this many bytes
DEFAULT_CACHE_MAX_SIZE: Final = 10 << 30
