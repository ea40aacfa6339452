"""The record of accessed files (ctr-remote's --record-out format) and prefetch lists.

A record is JSON lines `{"path","manifestDigest","layerIndex"}`. Both sources end up as
one list of paths per layer digest, in first-access order, which the converter applies.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from estargz_opt.analyze.layerindex import LayerNames
from estargz_opt.descriptor import Manifest
from estargz_opt.errors import BadInputError, EstargzOptError
from estargz_opt.format import atomic_output, tarfmt
from estargz_opt.format.toc import go_escape

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
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{path}:{lineno}: not a JSON record line ({exc.msg})") from None
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


def read_prefetch_list(path: Path) -> list[tuple[int, str]]:
    """(line number, pattern) pairs; blank lines and # comments are skipped."""
    out = []
    for lineno, raw in enumerate(_lines(path), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "\0" in line:
            raise BadInputError(f"{path}:{lineno}: NUL byte in prefetch list line")
        if _is_glob(line):
            try:
                _glob_regex(line)
            except ValueError as exc:
                raise BadInputError(f"{path}:{lineno}: bad glob {line!r}: {exc}") from None
        out.append((lineno, line))
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


def check_record_out(path: Path) -> None:
    """Fail before the workload runs if the record could not be written afterwards."""
    parent = path.parent
    if not parent.is_dir():
        raise EstargzOptError(f"cannot write --record-out {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EstargzOptError(f"cannot write --record-out {path}: {parent} is not writable")
    if path.is_dir():
        raise EstargzOptError(f"cannot write --record-out {path}: it is a directory")


def write_record(path: Path, entries: Iterable[RecordEntry]) -> None:
    """Write a record file (JSON lines, byte-compatible with ctr-remote's --record-out)."""
    try:
        with atomic_output(path) as f:
            for e in entries:
                f.write(e.to_json().encode("utf-8", errors="surrogateescape") + b"\n")
    except OSError as exc:
        raise EstargzOptError(f"cannot write --record-out {path}: {exc.strerror}") from None


def record_from_prefetch_list(
    patterns: list[tuple[int, str]], names: LayerNames, manifest_digest: str
) -> list[RecordEntry]:
    """Resolve paths and globs to the top-most layer holding each, honouring whiteouts."""
    recorder = Recorder(names, manifest_digest)
    all_names: list[str] | None = None
    for lineno, pattern in patterns:
        if not _is_glob(pattern):
            recorder.record(pattern)
            continue
        if all_names is None:
            all_names = names.all_names()
        regex = _glob_regex(tarfmt.clean_name(pattern))
        matched = [n for n in all_names if regex.fullmatch(n)]
        if not matched:
            log.warning("prefetch list line %d: %r matches no file in the image", lineno, pattern)
        for n in matched:
            recorder.record(n)
    return recorder.entries


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """doublestar semantics: `**` spans directories, `*` and `?` stay within one."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            at_start = i == 0 or pattern[i - 1] == "/"
            at_end = i + 2 == len(pattern) or pattern[i + 2] == "/"
            if at_start and pattern.startswith("**/", i):
                out.append("(?:.*/)?")
                i += 3
                continue
            if at_start and at_end:
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "^") else i + 1)
            if end < 0:
                raise ValueError("unterminated [ class")
            body = pattern[i + 1 : end]
            if body[:1] in ("!", "^"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        elif c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    try:
        return re.compile("".join(out))
    except re.error as exc:
        raise ValueError(str(exc)) from None


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError as exc:
        raise EstargzOptError(f"cannot read {path}: {exc.strerror}") from None
