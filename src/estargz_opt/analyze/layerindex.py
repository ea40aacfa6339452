"""Which names each layer of an image holds, to map an accessed path to its top-most layer."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from estargz_opt.format import tarfmt
from estargz_opt.format.source import open_tar

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass(frozen=True, slots=True)
class LayerNames:
    """The clean names in each layer, bottom (0) to top."""

    layers: list[frozenset[str]]

    @staticmethod
    def names_in(path: str) -> frozenset[str]:
        """The clean names of one layer blob (tar, tar+gzip or tar+zstd)."""
        with open_tar(path) as src:
            names = {tarfmt.clean_name(e.name) for e in tarfmt.iter_entries(src.f, src.size)}
        names.discard("")
        return frozenset(names)

    def top_layer(self, name: str) -> int | None:
        """The layer that provides name, or None if absent or deleted by a whiteout above."""
        name = tarfmt.clean_name(name)
        if not name:
            return None
        parent, base = posixpath.split(name)
        whiteout = posixpath.join(parent, WHITEOUT_PREFIX + base)
        opaque = posixpath.join(parent, OPAQUE)
        for i in range(len(self.layers) - 1, -1, -1):
            names = self.layers[i]
            if name in names:
                return i
            if whiteout in names or opaque in names:
                return None
        return None

    def all_names(self) -> list[str]:
        """Every name in any layer, sorted (so glob matches come in a stable order)."""
        out: set[str] = set()
        for names in self.layers:
            out.update(n for n in names if not posixpath.basename(n).startswith(WHITEOUT_PREFIX))
        return sorted(out)
