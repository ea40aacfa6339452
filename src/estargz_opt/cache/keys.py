"""Keying: which converted layer an entry holds, and where the cache lives.

The format engine is deterministic: one source layer, one set of byte-changing options
and one prioritized file list always give the same blob. So the key is made of exactly
those inputs, plus the engine's OUTPUT_VERSION.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from estargz_opt.format import OUTPUT_VERSION, LayerOptions

ENV_DIR = "ESTARGZ_OPT_CACHE_DIR"


def default_dir(env: Mapping[str, str] = os.environ) -> Path:
    """$ESTARGZ_OPT_CACHE_DIR, else $XDG_CACHE_HOME/estargz-opt, else /var/cache/estargz-opt
    for root and ~/.cache/estargz-opt for anyone else."""
    if env.get(ENV_DIR):
        return Path(env[ENV_DIR])
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "estargz-opt"
    if os.geteuid() == 0:
        return Path("/var/cache/estargz-opt")
    return Path.home() / ".cache" / "estargz-opt"


def layer_key(source_digest: str, opts: LayerOptions, engine: int = OUTPUT_VERSION) -> str:
    """The key of a converted layer: every input that can change its bytes.

    `workers` is left out on purpose: the thread count never changes the output.
    """
    fields = {
        "engine": engine,
        "source": source_digest,
        "format": opts.format.value,
        "level": opts.level,
        "chunkSize": opts.chunk_size,
        "minChunkSize": opts.min_chunk_size,
        "prioritized": list(opts.prioritized),
    }
    if opts.containers:  # stargz-flavour keys stay what they were
        fields["zstdFlavor"] = opts.zstd_flavor.value
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def fill_kind(key: str) -> str:
    """The temporary name's kind of a fill of `key` (a waiting run watches it grow)."""
    return f"fill-{key}"
