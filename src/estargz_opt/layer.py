"""`convert_layer`: one layer file in, one converted layer file (and its TOC file) out.

The format engine (estargz_opt.format) writes one blob; this adds what a caller with a
file wants around it: the external TOC written beside the blob, the converted-layer
cache, and nothing left behind on failure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from estargz_opt import cache
from estargz_opt.atomic import atomic_output
from estargz_opt.errors import OptionsError
from estargz_opt.format import Format, LayerOptions, LayerResult, convert_layer as build_file
from estargz_opt.format.build import ProgressFn


@dataclass(frozen=True, slots=True)
class LayerConversion:
    """What `convert_layer` wrote: the layer's facts, where its external TOC went, and
    whether the cache served it."""

    layer: LayerResult
    #: the external TOC file (estargz-external-toc only)
    toc_file: Path | None = None
    #: "hit", "miss" or "off" (the cache could not be used) with a cache; None without
    cache: str | None = None

    def summary(self) -> dict[str, object]:
        """The result as a JSON object (what `layer convert` prints)."""
        r = self.layer
        out = r.summary()
        if self.cache is not None:
            out["cache"] = self.cache
        out["prioritizedEntries"] = r.prioritized_entries
        out["skippedPrioritized"] = len(r.missing_prioritized)
        if self.toc_file is not None:
            out["tocBlob"] = str(self.toc_file)
        return out


def default_toc_file(out: str | os.PathLike[str]) -> Path:
    """Where an external TOC goes unless told: beside the blob, as OUT.toc."""
    path = Path(out)
    return path.with_name(path.name + ".toc")


def convert_layer(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: LayerOptions | None = None,
    *,
    toc_out: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
) -> LayerConversion:
    """Convert the layer file `src` (tar, tar+gzip or tar+zstd) into `out`.

    `options.prioritized` go first, before the prefetch landmark; paths the layer does
    not hold are listed in `layer.missing_prioritized`. An estargz-external-toc layer's
    TOC is written to `toc_out` (default: OUT.toc). With `cache_dir`, the layer is taken
    from (and added to) that converted-layer cache. `progress(bytes_in, bytes_out)` is
    called as the conversion goes (without a cache). `out` and the TOC file appear
    only if everything succeeds.
    """
    opts = options or LayerOptions()
    if toc_out is not None and opts.format is not Format.EXTERNAL_TOC:
        raise OptionsError(
            "{toc} applies to {fmt} only", toc="toc_out", fmt=f"format={Format.EXTERNAL_TOC.value}"
        )
    state = None
    if cache_dir is None:
        result = build_file(src, out, opts, progress)
    else:
        result, state = cache.convert_file(
            cache.LayerCache(Path(cache_dir)), Path(src), Path(out), opts
        )
    toc_file = None
    if result.toc_blob is not None:
        toc_file = Path(toc_out) if toc_out is not None else default_toc_file(out)
        try:
            with atomic_output(toc_file) as f:
                f.write(result.toc_blob)
        except BaseException:
            Path(out).unlink(missing_ok=True)
            raise
    return LayerConversion(result, toc_file, state)
