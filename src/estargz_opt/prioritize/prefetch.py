"""`--prefetch-list`: paths and doublestar globs resolved to record lines, no workload run.

Each line goes through the recorder, so a listed file lands in the top-most layer that
holds it, and a whiteout above drops it, exactly as for an accessed path.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from estargz_opt.errors import BadInputError
from estargz_opt.format import tarfmt
from estargz_opt.prioritize.layerindex import LayerNames
from estargz_opt.prioritize.record import RecordEntry, Recorder, read_lines

log = logging.getLogger("estargz_opt")


def read_prefetch_list(path: Path) -> list[tuple[int, str]]:
    """(line number, pattern) pairs; blank lines and # comments are skipped."""
    out = []
    for lineno, raw in enumerate(read_lines(path), 1):
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
