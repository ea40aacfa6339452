"""Entry ordering corner cases (upstream's estargz writer: prioritized files first).

Where our product deliberately differs from upstream (a prioritized file whose parent has no
tar entry, a prioritized path missing from the layer) the test says so. Every case also runs
the full layer check from tarfactory, so the output tree must still equal the input tree.
"""

from __future__ import annotations

import pytest
from support import tarfactory as tf

import estargz_opt.format as fmt_mod

pytestmark = pytest.mark.unit

FORMATS = list(fmt_mod.Format)


def order_of(conv: tf.Converted) -> list[str]:
    return [tf.clean_name(e["name"]) for e in conv.main_entries()]


def convert_checked(tmp_path, entries, fmt, prioritized=(), **opts) -> tf.Converted:
    conv = tf.convert(tmp_path, entries, fmt, prioritized=list(prioritized), **opts)
    tf.check_layer(conv, fmt, entries, prioritized)
    return conv


def toc_entry(conv: tf.Converted, name: str) -> dict:
    (e,) = [e for e in conv.main_entries() if tf.clean_name(e["name"]) == name]
    return e


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicate_keeps_later_entry_at_later_position(fmt, tmp_path):
    entries = [
        tf.reg("a", b"old a\n", mode=0o600),
        tf.reg("b", b"b\n"),
        tf.dir_("d/", mode=0o700),
        tf.reg("./a", b"new a, longer\n", mode=0o640),
        tf.reg("c", b"c\n"),
        tf.dir_("./d/", mode=0o755),
        tf.reg("s", b"was a file\n"),
        tf.symlink("s", "a"),
    ]
    conv = convert_checked(tmp_path, entries, fmt)
    assert order_of(conv) == [tf.NO_LANDMARK, "b", "a", "c", "d", "s"]
    a = toc_entry(conv, "a")
    assert a["digest"] == tf.sha256_digest(b"new a, longer\n")
    assert a["mode"] == 0o640
    assert toc_entry(conv, "d")["mode"] == 0o755
    assert toc_entry(conv, "s")["type"] == "symlink"


@pytest.mark.parametrize("fmt", FORMATS)
def test_prioritized_duplicate_moves_the_survivor(fmt, tmp_path):
    entries = [tf.reg("a", b"old\n"), tf.reg("b", b"b\n"), tf.reg("a", b"new\n")]
    conv = convert_checked(tmp_path, entries, fmt, ["a"])
    assert order_of(conv) == ["a", tf.LANDMARK, "b"]
    assert toc_entry(conv, "a")["digest"] == tf.sha256_digest(b"new\n")


@pytest.mark.parametrize("fmt", FORMATS)
def test_hardlink_drags_target_and_its_parents(fmt, tmp_path):
    entries = [
        tf.dir_("d/"),
        tf.reg("d/t", b"target\n"),
        tf.reg("x", b"x\n"),
        tf.dir_("e/"),
        tf.hardlink("e/h", "d/t"),
        tf.hardlink("h2", "./d/t"),
    ]
    conv = convert_checked(tmp_path, entries, fmt, ["e/h"])
    assert order_of(conv) == ["e", "d", "d/t", "e/h", tf.LANDMARK, "x", "h2"]
    conv = convert_checked(tmp_path, entries, fmt, ["x", "h2"], name="second")
    assert order_of(conv) == ["x", "d", "d/t", "h2", tf.LANDMARK, "e", "e/h"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("prioritized", [[], ["keep"]])
def test_landmarks_in_input_are_dropped(fmt, prioritized, tmp_path):
    entries = [
        tf.reg(".prefetch.landmark", b"stale"),
        tf.reg("keep", b"keep\n"),
        tf.reg("./.no.prefetch.landmark", b"stale too"),
        tf.reg("/.prefetch.landmark", b"and again"),
        tf.dir_("sub/"),
        tf.reg("sub/.prefetch.landmark", b"not a landmark: a user file"),
    ]
    conv = convert_checked(tmp_path, entries, fmt, prioritized)
    names = order_of(conv)
    landmark = tf.LANDMARK if prioritized else tf.NO_LANDMARK
    assert names.count(tf.LANDMARK) + names.count(tf.NO_LANDMARK) == 1
    assert toc_entry(conv, landmark)["digest"] == tf.LANDMARK_DIGEST
    assert "sub/.prefetch.landmark" in names
    stream_names = [
        tf.clean_name(ti.name) for ti, _ in tf.tar_members(tf.decompress_blob(conv.blob, fmt))
    ]
    assert stream_names.count(landmark) == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_old_toc_entry_is_dropped(fmt, tmp_path):
    old_toc = b'{"version": 1, "entries": [{"name": "evil", "type": "reg"}]}'
    entries = [
        tf.reg("stargz.index.json", old_toc),
        tf.reg("a", b"a\n"),
        tf.reg("./stargz.index.json", old_toc),
        tf.dir_("sub/"),
        tf.reg("sub/stargz.index.json", b"a user file that happens to have this name"),
    ]
    conv = convert_checked(tmp_path, entries, fmt)
    assert order_of(conv) == [tf.NO_LANDMARK, "a", "sub", "sub/stargz.index.json"]
    stream = tf.decompress_blob(conv.blob, fmt)
    top = [ti.name for ti, _ in tf.tar_members(stream) if tf.clean_name(ti.name) == tf.TOC_NAME]
    assert top == ([] if tf.is_zstd(fmt) or tf.is_external(fmt) else [tf.TOC_NAME])
    assert b'"evil"' not in conv.toc_json


@pytest.mark.parametrize("fmt", FORMATS)
def test_prioritized_file_without_parent_entries_converts(fmt, tmp_path):
    """umoci-style layer: no entries for usr/ or usr/bin/. Upstream aborts; we convert and
    invent nothing, so the tree (and the TOC) hold exactly the input's entries."""
    entries = [
        tf.reg("usr/bin/env", b"#!env\n", mode=0o755),
        tf.reg("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    ]
    conv = convert_checked(tmp_path, entries, fmt, ["usr/bin/env"])
    assert order_of(conv) == ["usr/bin/env", tf.LANDMARK, "etc/passwd"]
    assert not [e for e in conv.entries if e["type"] == "dir"]
    assert conv.result.missing_prioritized == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_existing_ancestors_move_even_above_a_missing_parent(fmt, tmp_path):
    """usr/ and ./ exist, usr/lib/ does not: ./ and usr/ still come first, top-down."""
    entries = [
        tf.dir_("./"),
        tf.reg("./a", b"a\n"),
        tf.dir_("./usr/"),
        tf.reg("./usr/lib/libc.so", b"\x7fELF"),
    ]
    conv = tf.convert(tmp_path, entries, fmt, prioritized=["usr/lib/libc.so"])
    assert order_of(conv) == ["", "usr", "usr/lib/libc.so", tf.LANDMARK, "a"]
    tf.check_layer(conv, fmt, entries, ["usr/lib/libc.so"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_prioritized_paths_are_skipped_and_reported(fmt, tmp_path):
    entries = [tf.reg("x", b"x\n"), tf.dir_("dir/"), tf.reg("y", b"y\n")]
    prio = ["nope", "x", "dir/nope"]
    conv = convert_checked(tmp_path, entries, fmt, prio)
    assert conv.result.missing_prioritized == ["nope", "dir/nope"]
    assert order_of(conv) == ["x", tf.LANDMARK, "dir", "y"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_prioritized_paths_missing(fmt, tmp_path):
    entries = [tf.reg("x", b"x\n"), tf.reg("y", b"y\n")]
    conv = tf.convert(tmp_path, entries, fmt, prioritized=["nope"])
    assert conv.result.missing_prioritized == ["nope"]
    names = order_of(conv)
    assert names[0] in (tf.LANDMARK, tf.NO_LANDMARK)
    assert names[1:] == ["x", "y"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("root", ["./", "/"])
def test_root_entry_moves_first(fmt, root, tmp_path):
    entries = [
        tf.reg("./x", b"x\n"),
        tf.dir_(root),
        tf.dir_("./bin/"),
        tf.reg("./bin/sh", b"sh\n"),
    ]
    conv = convert_checked(tmp_path, entries, fmt, ["bin/sh"])
    assert order_of(conv) == ["", "bin", "bin/sh", tf.LANDMARK, "x"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_root_stays_in_place_without_prioritized_files(fmt, tmp_path):
    entries = [tf.reg("./x", b"x\n"), tf.dir_("./"), tf.reg("./y", b"y\n")]
    conv = convert_checked(tmp_path, entries, fmt)
    assert order_of(conv) == [tf.NO_LANDMARK, "x", "", "y"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("spelling", ["bin/sh", "./bin/sh", "/bin/sh", "bin//sh"])
def test_prioritized_paths_are_cleaned(fmt, spelling, tmp_path):
    entries = [tf.reg("x", b"x\n"), tf.dir_("./bin/"), tf.reg("./bin/sh", b"sh\n")]
    conv = convert_checked(tmp_path, entries, fmt, [spelling])
    assert order_of(conv) == ["bin", "bin/sh", tf.LANDMARK, "x"]
    assert conv.result.missing_prioritized == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_directory_moves_without_its_children(fmt, tmp_path):
    entries = [
        tf.reg("x", b"x\n"),
        tf.dir_("bin/"),
        tf.reg("bin/sh", b"sh\n"),
        tf.dir_("bin/sub/"),
    ]
    conv = convert_checked(tmp_path, entries, fmt, ["bin"])
    assert order_of(conv) == ["bin", tf.LANDMARK, "x", "bin/sh", "bin/sub"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_prioritized_order_is_kept_and_repeats_ignored(fmt, tmp_path):
    entries = [tf.reg(n, n.encode()) for n in "abcde"]
    conv = convert_checked(tmp_path, entries, fmt, ["d", "b", "d", "e", "b"])
    assert order_of(conv) == ["d", "b", "e", tf.LANDMARK, "a", "c"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunked_prioritized_file_stays_together(fmt, tmp_path):
    big = tf.content("random", 5000, 7)
    entries = [tf.reg("small", b"s"), tf.reg("big", big)]
    conv = convert_checked(tmp_path, entries, fmt, ["big"], chunk_size=1024)
    kinds = [(e["name"], e["type"]) for e in conv.entries]
    assert kinds[:6] == [("big", "reg")] + [("big", "chunk")] * 4 + [(tf.LANDMARK, "reg")]
    # the landmark's data starts after all of big's data: prefetching [0, landmark.offset)
    # covers every prioritized byte
    landmark = toc_entry(conv, tf.LANDMARK)
    assert all(e["offset"] < landmark["offset"] for e in conv.entries if e["name"] == "big")
