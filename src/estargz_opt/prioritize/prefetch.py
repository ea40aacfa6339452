"""`--prefetch-list`: paths and doublestar globs resolved to record lines, no workload run.

Each line goes through the recorder, so a listed file lands in the top-most layer that
holds it, and a whiteout above drops it, exactly as for an accessed path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from estargz_opt.errors import BadInputError, EstargzOptError
from estargz_opt.format import atomic_output, tarfmt
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


def expand_prefetch_list(patterns: list[tuple[int, str]], names: LayerNames) -> list[str]:
    """The listed paths in list order, each glob expanded to its matches in sorted order."""
    out: list[str] = []
    all_names: list[str] | None = None
    for lineno, pattern in patterns:
        if not _is_glob(pattern):
            out.append(pattern)
            continue
        if all_names is None:
            all_names = names.all_names()
        regex = _glob_regex(tarfmt.clean_name(pattern))
        matched = [n for n in all_names if regex.fullmatch(n)]
        if not matched:
            log.warning("prefetch list line %d: %r matches no file in the image", lineno, pattern)
        out.extend(matched)
    return out


def record_from_prefetch_list(
    patterns: list[tuple[int, str]], names: LayerNames, manifest_digest: str
) -> list[RecordEntry]:
    """Resolve paths and globs to the top-most layer holding each, honouring whiteouts."""
    recorder = Recorder(names, manifest_digest)
    for path in expand_prefetch_list(patterns, names):
        recorder.record(path)
    return recorder.entries


def prefetch_list_line(path: str) -> str | None:
    """The line that makes read_prefetch_list give back exactly `path` (None: no such line).

    A line is a glob as soon as it holds `*?[`, and lines are trimmed and may be comments,
    so such paths are written as globs that match only themselves.
    """
    if "\n" in path or "\r" in path or not path:
        return None
    literal = not (_is_glob(path) or path.startswith("#") or path != path.strip())
    if literal:
        return path
    out = "".join("\\" + c if c in "*?[\\" else c for c in path)
    if out.startswith("#") or out[:1].isspace():
        out = "[" + out[0] + "]" + out[1:]
    if out[-1:].isspace():
        out = out[:-1] + "[" + out[-1] + "]"
    return out


def write_prefetch_list(path: Path, paths: Iterable[str], header: Sequence[str]) -> None:
    """Write a prefetch list: `#` header lines, then one path per line in access order."""
    lines = [f"# {h}" for h in header]
    for p in paths:
        line = prefetch_list_line(p)
        if line is None:
            log.warning("prefetch list: %r cannot be written as a line: left out", p)
            continue
        lines.append(line)
    try:
        with atomic_output(path) as f:
            f.write(("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape"))
    except OSError as exc:
        raise EstargzOptError(f"cannot write --prefetch-list-out {path}: {exc.strerror}") from None


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
