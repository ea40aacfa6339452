"""The one bounded JSON parser (estargz_opt.jsonlimits), and every parser that uses it.

Python's json recurses once per nesting level: a few hundred kilobytes of `[[[[` end in a
RecursionError wherever they are parsed. Each parser of a document from someone else
must turn them, and an oversized document, into one EstargzOptError naming the document.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from estargz_opt import jsonlimits
from estargz_opt.cache.files import Damaged, result_from_json
from estargz_opt.descriptor import Index, Manifest, load_json
from estargz_opt.errors import BadInputError, EstargzOptError
from estargz_opt.format.toc import parse_toc
from estargz_opt.prioritize.record import read_record
from estargz_opt.stores import dockerarchive
from estargz_opt.stores.registry import credentials
from estargz_opt.workload.options import parse_json_array

pytestmark = pytest.mark.unit

DEEP = "[" * 200_000 + "]" * 200_000


@pytest.mark.parametrize("text, depth", [
    ("1", 0), ('"[[["', 0), ('["[[]]", [1]]', 2), ("[]", 1), ("[[], [[]]]", 3),
    ('{"a": "[[[[", "b": [1]}', 2),
    ('{"a": "\\"[[[", "b": {}}', 2),       # an escaped quote ends no string
    ('["\\\\", [[1]]]', 3),                 # an escaped backslash, then a real quote
])
def test_depth_is_measured_outside_strings(text: str, depth: int) -> None:
    assert jsonlimits.nesting_depth(text.encode()) == depth
    assert jsonlimits.loads(text, "x") == json.loads(text)


def test_limits_and_malformed_input_are_bad_input() -> None:
    with pytest.raises(BadInputError, match=r"^doc: JSON nested deeper than 64 levels$"):
        jsonlimits.loads(DEEP, "doc")
    with pytest.raises(BadInputError, match=r"^doc: JSON document too large \(12 bytes"):
        jsonlimits.loads(b'"0123456789"', "doc", max_size=10)
    with pytest.raises(BadInputError, match=r"^doc: malformed JSON"):
        jsonlimits.loads(b"\xff", "doc")
    with pytest.raises(BadInputError, match=r"^doc: malformed JSON \(not an object\)"):
        jsonlimits.loads_object("[]", "doc")


def _file(tmp: Path, name: str, data: str) -> Path:
    path = tmp / name
    path.write_text(data)
    return path


OBJECT = '{"a": ' + DEEP + "}"
PARSERS: dict[str, Callable[[Path], object]] = {
    "manifest": lambda _: Manifest.parse(OBJECT.encode(), "manifest m"),
    "index": lambda _: Index.parse(OBJECT.encode(), "index i"),
    "config": lambda _: load_json(OBJECT.encode(), "config c"),
    "toc": lambda _: parse_toc(OBJECT.encode()),
    "record": lambda tmp: read_record(_file(tmp, "r.jsonl", OBJECT)),
    "json-flag": lambda _: parse_json_array("--args", DEEP),
    "auth-file": lambda tmp: credentials._read_json(_file(tmp, "auth.json", OBJECT)),
    "docker-manifest.json": lambda _: dockerarchive._parse_manifest(DEEP.encode(), "d.tar"),
}


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_parser_refuses_deep_json_in_one_error(name: str, tmp_path: Path) -> None:
    with pytest.raises(EstargzOptError) as caught:
        PARSERS[name](tmp_path)
    message = str(caught.value)
    assert "nested deeper than 64 levels" in message and "\n" not in message, message


def test_cache_metadata_deep_or_mistyped_is_damage_not_a_crash() -> None:
    for data in (OBJECT, '{"key": "k", "size": "big"}', "[]", "\x00"):
        with pytest.raises(Damaged):
            result_from_json(data.encode(), "k")
