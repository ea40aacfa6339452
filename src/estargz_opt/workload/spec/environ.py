"""The process environment: containerd's merge of env lists, and `--env-file`."""

from __future__ import annotations

from estargz_opt.errors import BadInputError, literal
from estargz_opt.workload.options import check_env_entry


def merge_env(base: list[str], overrides: list[str]) -> list[str]:
    """containerd's env merge: an override replaces the same key in place or is appended;
    a bare `KEY` (no '=') unsets KEY. Order of first appearance is kept."""
    result: list[str | None] = list(base)
    index: dict[str, int] = {}
    for i, e in enumerate(base):
        index.setdefault(e.partition("=")[0], i)
    for e in overrides:
        key, sep, _ = e.partition("=")
        if not sep:
            if key in index:
                result[index.pop(key)] = None
            continue
        if key in index:
            result[index[key]] = e
        else:
            index[key] = len(result)
            result.append(e)
    return [e for e in result if e is not None]


def read_env_file(path: str) -> list[str]:
    """The env_file option: one K=V per line; empty lines and lines starting with "#" are
    skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise BadInputError.with_terms(
            "cannot read {env_file} " + literal(f"{path}: {e.strerror or e}"), env_file="env_file"
        ) from None
    except UnicodeDecodeError:
        raise BadInputError.with_terms(
            "{env_file} " + literal(path) + " is not UTF-8 text", env_file="env_file"
        ) from None
    out = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        check_env_entry("env_file", line)
        out.append(line)
    return out
