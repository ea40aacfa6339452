"""Profiles (records and prefetch lists), merged in the order given and matched to an image.

A record made for this very manifest (one with lines for it) is applied exactly as
ctr-remote does: by layer index, lines for other manifests ignored, so the TOCs stay equal
to upstream's. A record made only for other manifests (the image was rebuilt) is matched
by path instead, like a prefetch list: each path goes to the top-most layer of this image
that holds it, honouring whiteouts and opaque directories, unless the recorded layer is
known (the store holds the recorded manifest) and is in this image too, maybe elsewhere.
Across profiles the first occurrence of a file wins and repeats are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from estargz_opt import descriptor as d
from estargz_opt.descriptor import Manifest
from estargz_opt.format import tarfmt
from estargz_opt.prioritize.layerindex import LayerNames
from estargz_opt.prioritize.prefetch import expand_prefetch_list, read_prefetch_list
from estargz_opt.prioritize.record import read_record

log = logging.getLogger("estargz_opt")
#: how many paths a message names as examples
EXAMPLES = 5


class ProfileKind(Enum):
    """A record (ctr-remote's JSON lines, matched by layer or by path) or a prefetch list
    (paths and globs, matched by path)."""

    RECORD = "record"
    PREFETCH_LIST = "prefetch-list"

    @property
    def label(self) -> str:
        """How messages name a file of this kind."""
        return self.value.replace("-", " ")


@dataclass(frozen=True, slots=True)
class ProfileSource:
    """One record or prefetch-list file; a request merges them in the order given."""

    kind: ProfileKind
    path: Path


@dataclass(frozen=True, slots=True)
class LayerId:
    """What identifies a layer across images: its blob digest, or its DiffID."""

    digest: str
    diff_id: str

    def same(self, other: LayerId) -> bool:
        return self.digest == other.digest or bool(self.diff_id and self.diff_id == other.diff_id)


@dataclass(slots=True)
class Profile:
    """The profile's paths per layer digest of the host image, and what did not match."""

    manifest_digest: str
    prioritized: dict[str, list[str]] = field(default_factory=dict)
    #: distinct files the profile names
    files: int = 0
    #: files found in no layer, in profile order
    missing: list[str] = field(default_factory=list)
    #: per layer digest: recorded files of that layer the image no longer holds
    missing_by_layer: dict[str, int] = field(default_factory=dict)
    #: manifest digests of records that were not made for this image
    foreign_manifests: list[str] = field(default_factory=list)
    #: the prioritized paths in merged (access) order, each once: what a prefetch-list output holds
    order: list[str] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return sum(map(len, self.prioritized.values()))

    def empty_reason(self, sources: Sequence[ProfileSource]) -> str:
        """Why nothing is prioritized, in one line."""
        named = ", ".join(f"{s.kind.label} {s.path}" for s in sources)
        if self.files == 0:
            return f"the profile ({named}) lists no files"
        if not self.missing:  # every path is there, and none is a file to move first
            return (
                f"the profile ({named}): its {self.files} path(s) in the image "
                f"{self.manifest_digest} are directories only, no file to prioritize"
            )
        files = "its one file" if self.files == 1 else f"none of its {self.files} files"
        found = "is not" if self.files == 1 else "is"
        head = f"the profile ({named}): {files} {found} in the image {self.manifest_digest}"
        if self.foreign_manifests and len(self.missing) == self.files:
            made = ", ".join(self.foreign_manifests[:3])
            return f"{head}: the record was made for {made} (the wrong image?)"
        return f"{head} (e.g. {_examples(self.missing)})"


def match_profile(
    sources: Sequence[ProfileSource],
    manifest_digest: str,
    manifest: Manifest,
    layer_names: Callable[[], LayerNames],
    layer_ids: Callable[[str], list[LayerId] | None] = lambda _digest: None,
    from_manifest: str | None = None,
) -> Profile:
    """Merge the profiles in order and map each file to a layer of this host image.

    `layer_names` reads the layers' names; it is called only when some profile is matched
    by path (a prefetch list, or a record of another manifest). `layer_ids(digest)` gives
    the layers of a manifest (this one, or the one a record was made for) if the store
    holds it: a recorded file then stays in its recorded layer wherever that layer now is.
    `from_manifest`: of a record's lines for other manifests, only that one's are used
    (another platform's profile, applied by path).
    """
    layers = [x.digest for x in manifest.layers if x.media_type in d.LAYER_TYPES]
    profile = Profile(manifest_digest)
    ids: dict[str, list[LayerId] | None] = {}

    def same_layer(recorded_manifest: str, index: int) -> int | None:
        """This image's layer that is the record's layer `index`, if both are known."""
        for digest in (recorded_manifest, manifest_digest):
            if digest not in ids:
                ids[digest] = layer_ids(digest)
        old, new = ids[recorded_manifest], ids[manifest_digest]
        if old is None or new is None or index >= len(old):
            return None
        return next((j for j, lay in enumerate(new) if lay.same(old[index])), None)

    names: LayerNames | None = None
    placed: set[tuple[str, str]] = set()
    paths: set[str] = set()
    missing: set[str] = set()

    def index() -> LayerNames:
        nonlocal names
        if names is None:
            names = layer_names()
        return names

    def place(digest: str, path: str) -> None:
        if (digest, path) not in placed:
            placed.add((digest, path))
            clean = tarfmt.clean_name(path)
            if clean not in paths:
                paths.add(clean)
                profile.order.append(clean)
            profile.prioritized.setdefault(digest, []).append(path)

    def by_path(path: str, recorded_layer: str | None, same: int | None = None) -> int | None:
        clean = tarfmt.clean_name(path)
        if not clean or clean in paths:
            return None
        top = index().top_layer(clean)
        if top is not None and same is not None and clean in index().layers[same]:
            top = same
        if top is not None:
            place(layers[top], clean)
        elif clean not in missing:
            missing.add(clean)
            profile.missing.append(clean)
            if recorded_layer is not None:
                profile.missing_by_layer[recorded_layer] = (
                    profile.missing_by_layer.get(recorded_layer, 0) + 1
                )
        return top

    named: set[str] = set()
    for source in sources:
        if source.kind is ProfileKind.RECORD:
            entries = read_record(source.path)
            if from_manifest is not None:
                entries = [e for e in entries if e.manifest_digest == from_manifest]
            # A record with lines for this manifest was made for this image: it is applied
            # exactly as upstream does, lines for other manifests ignored (TOC parity).
            exact = any(e.manifest_digest == manifest_digest for e in entries)
            found: dict[int, int] = {}
            foreign = 0
            before = len(profile.missing)
            for e in entries:
                if e.manifest_digest == manifest_digest:
                    named.add(tarfmt.clean_name(e.path))
                    if e.layer_index < len(manifest.layers):
                        place(manifest.layers[e.layer_index].digest, e.path)
                    continue
                if exact:
                    continue
                named.add(tarfmt.clean_name(e.path))
                foreign += 1
                if e.manifest_digest not in profile.foreign_manifests:
                    profile.foreign_manifests.append(e.manifest_digest)
                recorded = layers[e.layer_index] if e.layer_index < len(layers) else None
                top = by_path(e.path, recorded, same_layer(e.manifest_digest, e.layer_index))
                if top is not None:
                    found[top] = found.get(top, 0) + 1
            if foreign:
                _warn_rebuilt(source, foreign, found, profile.missing[before:], manifest_digest)
        else:
            for path in expand_prefetch_list(read_prefetch_list(source.path), index()):
                named.add(tarfmt.clean_name(path))
                by_path(path, None)
    named.discard("")
    profile.files = len(named)
    return profile


def _warn_rebuilt(
    source: ProfileSource,
    files: int,
    found: dict[int, int],
    not_found: list[str],
    manifest_digest: str,
) -> None:
    per_layer = ", ".join(f"layer {i}: {n}" for i, n in sorted(found.items())) or "none"
    log.warning(
        "%s %s was recorded for another image than %s: its files are matched by path: "
        "%d of %d found (%s)%s",
        source.kind.label,
        source.path,
        manifest_digest,
        sum(found.values()),
        files,
        per_layer,
        f"; {len(not_found)} not found, e.g. {_examples(not_found)}" if not_found else "",
    )


def _examples(paths: Sequence[str]) -> str:
    return ", ".join(paths[:EXAMPLES]) + (" ..." if len(paths) > EXAMPLES else "")
