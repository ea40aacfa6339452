"""``estargz-opt optimize --prefetch-list FILE``: which files go first, in which layer.

No container runs and no daemon is needed: the list is resolved against the
layers' own tar contents:

* one path or glob per line; lines are trimmed, empty lines and ``#``
  comments skipped; a path is cleaned (``/x`` and ``./x`` are ``x``);
* globs use doublestar rules: ``*``, ``?`` and ``[...]`` stay inside one path
  component, ``**`` spans directories (``a/**/b`` also matches ``a/b``);
* each path goes to the top-most layer that holds it; ``.wh.<name>`` in a
  layer above deletes it, and so does ``.wh..wh..opq`` in its immediate
  parent directory, so such a path is prioritized nowhere;
* the first occurrence of a path wins; a glob's matches come in sorted order
  (upstream iterates a Go map, so its order is random: ours must not be);
* a glob matching nothing is a warning, not an error.

What a layer prioritizes is read back from its TOC (``estargz-opt layer
toc``): the non-directory entries before ``.prefetch.landmark``, or nothing
when the TOC starts with ``.no.prefetch.landmark``. Parent directories that
move along with a file are left out of that list on purpose.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.cli import invoke
from support.imagefactory import (
    layout_state,
    platform_manifests,
    write_layout,
)
from support.tarfactory import build_tar, dir_, reg
from support.tocs import per_layer

pytestmark = pytest.mark.unit

LANDMARK = ".prefetch.landmark"
NO_LANDMARK = ".no.prefetch.landmark"
TAG = "v1"


def _layers() -> list[bytes]:
    """Three docker-style layers (every parent directory has an entry)."""
    bottom = [
        dir_("data/"),
        # Deliberately not in sorted order: glob matches must come out sorted.
        reg("data/c.txt", b"c\n"), reg("data/a.txt", b"a\n"), reg("data/b.txt", b"b\n"),
        reg("data/x2.log", b"2\n"), reg("data/x10.log", b"10\n"), reg("data/x1.log", b"1\n"),
        dir_("data/sub/"), reg("data/sub/deep.txt", b"deep\n"),
        dir_("logs/"),
        reg("logs/c.log", b"c\n"), reg("logs/b.log", b"b\n"), reg("logs/a.log", b"a\n"),
        dir_("lib/"), reg("lib/top.so", b"so\n"),
        dir_("lib/one/"), reg("lib/one/readme", b"not a .so\n"),
        dir_("lib/one/two/"), reg("lib/one/two/deep.so", b"deep so\n"),
        dir_("shadow/"), reg("shadow/file", b"bottom version\n"),
        dir_("wh/"), reg("wh/gone", b"deleted above\n"), reg("wh/back", b"deleted, re-added\n"),
        dir_("opq/"), reg("opq/old", b"hidden by an opaque dir above\n"),
        reg("base.txt", b"only in the bottom layer\n"),
    ]
    middle = [
        dir_("wh/"), reg("wh/.wh.gone"), reg("wh/.wh.back"),
        dir_("opq/"), reg("opq/.wh..wh..opq"), reg("opq/new", b"new in the opaque dir\n"),
        reg("mid.txt", b"middle\n"),
    ]
    top = [
        dir_("shadow/"), reg("shadow/file", b"top version wins\n"),
        dir_("wh/"), reg("wh/back", b"back again\n"),
        reg("top.txt", b"top\n"),
    ]
    return [build_tar(layer) for layer in (bottom, middle, top)]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout = tmp_path_factory.mktemp("prefetch") / "src"
    write_layout(layout, TAG, _layers())
    return layout


def optimize(src: Path, dst: Path, prefetch: str | bytes, *extra: str,
             check: bool = True):
    lst = dst.parent / f"{dst.name}.prefetch"
    if isinstance(prefetch, bytes):
        lst.write_bytes(prefetch)
    else:
        lst.write_text(prefetch)
    return invoke("optimize", "--oci", "--prefetch-list", str(lst), *extra,
                  f"oci:{src}:{TAG}", f"oci:{dst}:{TAG}", check=check)


def test_paths_comments_blank_lines_and_cleaning(source: Path, tmp_path: Path) -> None:
    listing = "\n".join([
        "# the app's start-up files",
        "",
        "data/b.txt",
        "   /base.txt   ",        # trimmed, leading / cleaned away
        "\t./mid.txt",            # ./ cleaned away
        "   # an indented comment: still a comment",
        "top.txt",
        "",
        "data/b.txt",             # again: the first occurrence counts
        "data/../data/a.txt",     # cleaned to data/a.txt
        "not/in/the/image",       # skipped quietly, as upstream
        "",
    ]) + "\n"
    res = optimize(source, tmp_path / "out", listing)
    assert per_layer(tmp_path / "out", TAG, res.stdout) == [
        ["data/b.txt", "base.txt", "data/a.txt"],
        ["mid.txt"],
        ["top.txt"],
    ]


def test_top_most_layer_and_whiteouts(source: Path, tmp_path: Path) -> None:
    listing = "shadow/file\nwh/gone\nwh/back\nopq/old\nopq/new\nbase.txt\n"
    res = optimize(source, tmp_path / "out", listing)
    assert per_layer(tmp_path / "out", TAG, res.stdout) == [
        # shadow/file is in the bottom layer too, but the top one provides it;
        # wh/gone (.wh.gone above) and opq/old (opaque dir above): nowhere.
        ["base.txt"],
        ["opq/new"],
        ["shadow/file", "wh/back"],
    ]


def test_globs_honour_whiteouts(source: Path, tmp_path: Path) -> None:
    # wh/* sees wh/gone (deleted) and wh/back (top layer); opq/* sees opq/old
    # (hidden by the opaque dir) and opq/new; shadow/* only the top copy.
    res = optimize(source, tmp_path / "out", "opq/*\nwh/*\nshadow/*\n")
    assert per_layer(tmp_path / "out", TAG, res.stdout) == [
        [],
        ["opq/new"],
        ["wh/back", "shadow/file"],
    ]


@pytest.mark.parametrize("listing", [
    "wh/gone\nopq/old\n",          # all deleted by whiteouts above
    "# nothing but comments\n\n",  # an empty list: no prioritized files at all
    "data/\nopq/\n",                # directories only: found, but no file to move
], ids=["deleted", "comments-only", "directories-only"])
def test_nothing_to_prioritize(source: Path, tmp_path: Path, listing: str) -> None:
    # A list that prioritizes nothing is an error: one line, exit 1, nothing written...
    res = optimize(source, tmp_path / "out", listing, check=False)
    assert res.returncode == 1, res
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "nothing written" in errors[0], res.stderr
    assert "e.g. )" not in errors[0] and "()" not in errors[0], errors[0]
    assert not (tmp_path / "out").exists() or not layout_state(tmp_path / "out"), \
        "a failed conversion left files behind"
    # ...and a warning with --allow-empty-profile.
    res = optimize(source, tmp_path / "out", listing, "--allow-empty-profile")
    assert "WARNING" in res.stderr and "--allow-empty-profile" in res.stderr, res.stderr
    assert per_layer(tmp_path / "out", TAG, res.stdout) == [[], [], []]


def test_glob_forms_in_sorted_order(source: Path, tmp_path: Path) -> None:
    listing = "\n".join([
        "data/*.txt",        # a, b, c (tar order c, a, b); not data/sub/deep.txt
        "data/x?.log",       # x1, x2; not x10
        "logs/[ab].log",     # a, b; not c
        "logs/[!ab].log",    # c
        "lib/**/*.so",       # lib/one/two/deep.so and, ** = no directory, lib/top.so
        "**/deep.txt",       # data/sub/deep.txt
        "data/x*.log",       # x10 is new; x1, x2 already listed above
    ]) + "\n"
    res = optimize(source, tmp_path / "out", listing)
    assert per_layer(tmp_path / "out", TAG, res.stdout) == [
        ["data/a.txt", "data/b.txt", "data/c.txt",
         "data/x1.log", "data/x2.log",
         "logs/a.log", "logs/b.log",
         "logs/c.log",
         "lib/one/two/deep.so", "lib/top.so",
         "data/sub/deep.txt",
         "data/x10.log"],
        [],
        [],
    ]


def test_glob_matching_nothing_warns_and_succeeds(source: Path, tmp_path: Path) -> None:
    res = optimize(source, tmp_path / "out", "nothing/*.bin\ntop.txt\n")
    assert "nothing/*.bin" in res.stderr, \
        f"no warning names the glob that matched nothing; stderr:\n{res.stderr}"
    assert per_layer(tmp_path / "out", TAG, res.stdout) == [[], [], ["top.txt"]]


def test_glob_order_is_deterministic(source: Path, tmp_path: Path) -> None:
    listing = "**/*.txt\nlogs/*\ndata/x*\n"
    first = optimize(source, tmp_path / "one", listing)
    second = optimize(source, tmp_path / "two", listing)
    d1, d2 = (r.stdout.strip().splitlines()[-1] for r in (first, second))
    assert d1 == d2, "two runs with the same globs gave different images"
    got = per_layer(tmp_path / "one", TAG, first.stdout)
    txt = sorted(["data/a.txt", "data/b.txt", "data/c.txt", "data/sub/deep.txt", "base.txt"])
    assert got == [
        [*txt, "logs/a.log", "logs/b.log", "logs/c.log",
         "data/x1.log", "data/x10.log", "data/x2.log"],
        ["mid.txt"],
        ["top.txt"],
    ]


def _error_line(res) -> str:
    assert res.returncode != 0, f"expected a failure; stdout:\n{res.stdout}"
    # Progress lines (INFO, WARNING) may come first; the error is one line, the last.
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("estargz-opt: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], \
        f"want one 'estargz-opt: error: ...' line, last; got stderr:\n{res.stderr}"
    return errors[0]


def _existing_dst(tmp_path: Path) -> Path:
    """A DST layout that already holds an image: a failed run must leave it as is."""
    dst = tmp_path / "dst"
    write_layout(dst, "other", [build_tar([reg("keep.txt", b"keep\n")])])
    return dst


def test_prefetch_list_with_no_optimize_is_a_usage_error(source: Path, tmp_path: Path) -> None:
    dst = _existing_dst(tmp_path)
    before = layout_state(dst)
    res = optimize(source, dst, "top.txt\n", "--no-optimize", check=False)
    line = _error_line(res)
    assert "--prefetch-list" in line and "--no-optimize" in line, line
    assert layout_state(dst) == before


@pytest.mark.parametrize("listing, lineno", [
    # An unterminated character class is a bad glob.
    (b"# header\n\nlogs/[ab.log\ntop.txt\n", 3),
    # A NUL byte cannot be part of a path.
    (b"top.txt\n# c\nmid.txt\nbase\0.txt\n", 4),
], ids=["unterminated-class", "nul-byte"])
def test_bad_line_is_an_error_with_its_line_number(source: Path, tmp_path: Path,
                                                   listing: bytes, lineno: int) -> None:
    dst = _existing_dst(tmp_path)
    before = layout_state(dst)
    res = optimize(source, dst, listing, check=False)
    line = _error_line(res)
    assert re.search(rf"(:{lineno}:|line {lineno}\b)", line), \
        f"the error does not give line {lineno}: {line}"
    assert layout_state(dst) == before


def test_a_repeated_layer_gets_the_list_of_its_top_copy(tmp_path: Path) -> None:
    # Upstream keys prioritized files by layer digest, so the same layer at
    # index 0 and 2 converts once, with the list of its top-most copy; one
    # source blob must not become two different blobs.
    repeated = build_tar([dir_("a/"), reg("a/one", b"1\n"), reg("a/two", b"2\n")])
    middle = build_tar([dir_("b/"), reg("b/x", b"x\n")])
    src = tmp_path / "src"
    write_layout(src, TAG, [repeated, middle, repeated])
    res = optimize(src, tmp_path / "out", "a/two\n")
    assert per_layer(tmp_path / "out", TAG, res.stdout) == [["a/two"], [], ["a/two"]]
    [(_plat, _desc, manifest)] = platform_manifests(tmp_path / "out", TAG)
    digests = [layer["digest"] for layer in manifest["layers"]]
    assert digests[0] == digests[2] != digests[1], digests
