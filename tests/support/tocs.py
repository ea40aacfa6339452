"""TOCs as tests read them: our CLI's `layer toc`, the prioritized files before the landmark,
and the comparison with the reference converter's TOC (offsets dropped, elided names filled).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from support.cli import invoke
from support.imagefactory import blob_path, platform_manifests, resolve_tag

LANDMARK = ".prefetch.landmark"
NO_LANDMARK = ".no.prefetch.landmark"
#: TOC fields that depend on the compressed bytes (our encoders are not Go's)
VOLATILE_FIELDS = ("offset", "innerOffset")


def normalize(toc: dict) -> dict:
    """Drop offsets; fill elided userName/groupName from the last one seen."""
    users: dict[int, str] = {}
    groups: dict[int, str] = {}
    entries = []
    for raw in toc.get("entries", []):
        e = {k: v for k, v in raw.items() if k not in VOLATILE_FIELDS}
        if e.get("type") != "chunk":
            for key, idkey, seen in (("userName", "uid", users), ("groupName", "gid", groups)):
                ident = e.get(idkey, 0)
                if e.get(key):
                    seen[ident] = e[key]
                elif ident in seen:
                    e[key] = seen[ident]
        entries.append(e)
    return {"version": toc.get("version"), "entries": entries}


def _key(e: dict) -> str:
    return f"{e.get('type')} {e.get('name')!r}" + (
        f" @{e['chunkOffset']}" if e.get("chunkOffset") else "")


_ABSENT = "<absent>"


def _field_diff(ours: dict, ref: dict) -> list[str]:
    return [f"      {f}: ours={ours.get(f, _ABSENT)!r} ctr-remote={ref.get(f, _ABSENT)!r}"
            for f in sorted(set(ours) | set(ref)) if ours.get(f, _ABSENT) != ref.get(f, _ABSENT)]


def describe_mismatch(label: str, ours: dict, ref: dict, max_entries: int = 8) -> str | None:
    """None if the normalized TOCs are equal, else a readable report."""
    if ours == ref:
        return None
    lines = [f"{label}: TOCs differ (ours {len(ours['entries'])} entries, "
             f"ctr-remote {len(ref['entries'])})"]
    if ours["version"] != ref["version"]:
        lines.append(f"  version: ours={ours['version']!r} ctr-remote={ref['version']!r}")
    ours_keys = [_key(e) for e in ours["entries"]]
    ref_keys = [_key(e) for e in ref["entries"]]
    if ours_keys != ref_keys:
        lines.append("  entry order/names/types differ (- ctr-remote, + ours):")
        diff = list(difflib.unified_diff(ref_keys, ours_keys, "ctr-remote", "ours",
                                         n=2, lineterm=""))
        lines += ["    " + d for d in diff[2:62]]
        if len(diff) > 62:
            lines.append(f"    ... {len(diff) - 62} more diff lines")
    # Field differences, entries paired by key (first occurrence).
    ref_by_key: dict[str, tuple[int, dict]] = {}
    for i, e in enumerate(ref["entries"]):
        ref_by_key.setdefault(_key(e), (i, e))
    shown = 0
    for i, e in enumerate(ours["entries"]):
        pair = ref_by_key.get(_key(e))
        if pair is None or pair[1] == e:
            continue
        if shown == 0:
            lines.append("  field differences:")
        lines.append(f"    entry {_key(e)} (ours #{i}, ctr-remote #{pair[0]}):")
        lines += _field_diff(e, pair[1])
        shown += 1
        if shown >= max_entries:
            lines.append("    ... (more entries differ)")
            break
    return "\n".join(lines)


def our_toc(blob: Path) -> dict:
    """The TOC of a converted layer blob, as `estargz-opt layer toc` prints it."""
    return json.loads(invoke("layer", "toc", blob, check=True).stdout)


def prioritized_files(toc: dict) -> list[str]:
    """Non-directory entries before the landmark, in TOC order ([] after a leading
    no-prefetch landmark); a TOC with neither landmark, or both, fails the test."""
    entries = [e for e in toc["entries"] if e.get("type") != "chunk"]
    names = [e["name"] for e in entries]
    if names and names[0] == NO_LANDMARK:
        assert LANDMARK not in names, names
        return []
    assert LANDMARK in names and NO_LANDMARK not in names, \
        f"TOC has neither a leading {NO_LANDMARK} nor a {LANDMARK}: {names[:12]}"
    return [e["name"] for e in entries[:names.index(LANDMARK)] if e.get("type") != "dir"]


def per_layer(dst: Path, tag: str, printed: str) -> list[list[str]]:
    """Prioritized files of each layer of the image at DST:TAG (whose digest the run
    printed last), bottom first."""
    digest = printed.strip().splitlines()[-1]
    assert resolve_tag(dst, tag)["digest"] == digest, \
        f"printed {digest}, {dst}:{tag} is {resolve_tag(dst, tag)}"
    [(_plat, _desc, manifest)] = platform_manifests(dst, tag)
    return [prioritized_files(our_toc(blob_path(dst, layer["digest"])))
            for layer in manifest["layers"]]
