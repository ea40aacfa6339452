"""The record of accessed files (ctr-remote's --record-out format) and the recorder.

A record is JSON lines `{"path","manifestDigest","layerIndex"}`. The recorder makes one
from accessed paths (a workload run or a prefetch list); a record ends up as one list of
paths per layer digest, in first-access order, which the converter applies.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from estargz_opt import jsonlimits
from estargz_opt.descriptor import Manifest
from estargz_opt.errors import BadInputError, EstargzOptError
from estargz_opt.format import atomic_output, tarfmt
from estargz_opt.format.toc import go_escape
from estargz_opt.prioritize.layerindex import LayerNames

log = logging.getLogger("estargz_opt")


@dataclass(frozen=True, slots=True)
class RecordEntry:
    path: str
    manifest_digest: str
    layer_index: int

    def to_json(self) -> str:
        """Byte-compatible with ctr-remote's Go json.Encoder output (compact, HTML-escaped)."""
        doc = {
            "path": self.path,
            "manifestDigest": self.manifest_digest,
            "layerIndex": self.layer_index,
        }
        text = go_escape(json.dumps(doc, separators=(",", ":"), ensure_ascii=False))
        return text


def read_record(path: Path) -> list[RecordEntry]:
    entries = []
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        doc = jsonlimits.loads(line, f"{path}:{lineno}: record line")
        if not isinstance(doc, dict):
            raise BadInputError(f"{path}:{lineno}: record line is not a JSON object")
        p, m, i = doc.get("path"), doc.get("manifestDigest"), doc.get("layerIndex")
        if not isinstance(p, str) or not isinstance(m, str) or not isinstance(i, int) or i < 0:
            raise BadInputError(
                f"{path}:{lineno}: record line needs path, manifestDigest and layerIndex >= 0"
            )
        entries.append(RecordEntry(p, m, i))
    return entries


def prioritized_from_record(
    entries: Iterable[RecordEntry], manifest_digest: str, manifest: Manifest
) -> dict[str, list[str]]:
    """Paths per layer digest, for the lines that belong to this (host) manifest."""
    out: dict[str, list[str]] = {}
    seen: set[tuple[str, str]] = set()
    for e in entries:
        if e.manifest_digest != manifest_digest or e.layer_index >= len(manifest.layers):
            continue
        digest = manifest.layers[e.layer_index].digest
        if (digest, e.path) not in seen:
            seen.add((digest, e.path))
            out.setdefault(digest, []).append(e.path)
    return out


class Recorder:
    """Turns accessed paths into record lines, as ctr-remote's recorder does.

    Each path is mapped to the top-most layer that holds it; a whiteout of the file or an
    opaque marker in its parent above that rejects it. The first access wins and repeats
    are dropped, so the record lists each file once, in first-access order.
    """

    def __init__(self, names: LayerNames, manifest_digest: str) -> None:
        self.names = names
        self.manifest_digest = manifest_digest
        self.entries: list[RecordEntry] = []
        self._seen: set[str] = set()

    def record(self, name: str) -> RecordEntry | None:
        """Add one accessed path; the new line, or None if it is a repeat or not in a layer."""
        clean = tarfmt.clean_name(name)
        if not clean or clean in self._seen:
            return None
        layer = self.names.top_layer(clean)
        if layer is None:
            log.debug("not recorded: %s is in no layer (or deleted by a whiteout)", clean)
            return None
        self._seen.add(clean)
        entry = RecordEntry(clean, self.manifest_digest, layer)
        self.entries.append(entry)
        return entry


def check_record_out(path: Path, what: str = "record") -> None:
    """Fail before the workload runs if the record (or prefetch list) could not be
    written afterwards."""
    parent = path.parent
    if not parent.is_dir():
        raise EstargzOptError(f"cannot write the {what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EstargzOptError(f"cannot write the {what} {path}: {parent} is not writable")
    if path.is_dir():
        raise EstargzOptError(f"cannot write the {what} {path}: it is a directory")


def write_record(path: Path, entries: Iterable[RecordEntry]) -> None:
    """Write a record file (JSON lines, byte-compatible with ctr-remote's --record-out)."""
    try:
        with atomic_output(path) as f:
            for e in entries:
                f.write(e.to_json().encode("utf-8", errors="surrogateescape") + b"\n")
    except OSError as exc:
        raise EstargzOptError(f"cannot write --record-out {path}: {exc.strerror}") from None


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError as exc:
        raise EstargzOptError(f"cannot read {path}: {exc.strerror}") from None
