"""The layer format engine: build and read eStargz, external-TOC and zstd:chunked blobs.

It knows nothing of images, registries, containerd or the CLI: a layer file goes in, a
converted layer file (and its descriptor facts) comes out.
"""

from __future__ import annotations

import os

from estargz_opt.atomic import atomic_output
from estargz_opt.constants import (
    DEFAULT_CHUNK_SIZE,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
)
from estargz_opt.format.build import (
    OUTPUT_VERSION,
    Format,
    LayerOptions,
    LayerResult,
    ProgressFn,
    ZstdFlavor,
    build_layer,
)
from estargz_opt.format.reader import Layer, open_layer
from estargz_opt.format.source import open_tar
from estargz_opt.format.toc import TOC, TOCEntry

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "OUTPUT_VERSION",
    "TOC",
    "TOC_DIGEST_ANNOTATION",
    "UNCOMPRESSED_SIZE_ANNOTATION",
    "Format",
    "Layer",
    "LayerOptions",
    "LayerResult",
    "TOCEntry",
    "ZstdFlavor",
    "atomic_output",
    "build_layer",
    "convert_layer",
    "open_layer",
]


def convert_layer(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    opts: LayerOptions | None = None,
    progress: ProgressFn | None = None,
    tmp_dir: str | None = None,
) -> LayerResult:
    """Convert src (tar, tar+gzip or tar+zstd) into out, which appears only on success."""
    opts = opts or LayerOptions()
    opts.validate()
    with open_tar(src, tmp_dir) as tar, atomic_output(out) as f:
        return build_layer(tar, f, opts, progress)
