"""One conformance suite, run unchanged against every layer format.

The blobs are checked with the independent readers in tarfactory (footers, gzip members, zstd
frames parsed from the spec), and through the engine's own reader (open_layer / verify /
write_tar). Spec: the eStargz and zstd:chunked layer formats (stargz-snapshotter's
estargz package and its docs).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from support import tarfactory as tf

import estargz_opt.format as fmt_mod

Format = fmt_mod.Format
open_layer = fmt_mod.open_layer

from estargz_opt.errors import BadInputError  # noqa: E402

pytestmark = pytest.mark.unit

FORMATS = list(Format)
# Shrinking a failing layer takes minutes; CI wants the failure fast. Set
# ESTARGZ_TEST_SHRINK=1 to get a minimal example when debugging.
PHASES = (
    tuple(Phase)
    if os.environ.get("ESTARGZ_TEST_SHRINK")
    else (Phase.explicit, Phase.reuse, Phase.generate)
)
CS = 1024  # small chunks so that a few KiB of data already gets chunked


@st.composite
def cases(draw):
    cs = draw(st.sampled_from([512, 1000, 4096]))
    entries = draw(tf.layer_trees(chunk_size=cs))
    names = sorted({e.clean for e in entries if e.clean})
    prioritized = draw(st.lists(st.sampled_from(names), unique=True, max_size=4)) if names else []
    if prioritized and draw(st.booleans()):  # the same path spelt the way a tar would
        prioritized[0] = "./" + prioritized[0]
    if prioritized and draw(st.booleans()):
        prioritized.insert(draw(st.integers(0, len(prioritized))), "no/such/file")
    compression = draw(st.sampled_from(["tar", "gz", "zst"]))
    return cs, entries, prioritized, compression


@pytest.mark.parametrize("fmt", FORMATS)
@settings(
    max_examples=30,
    deadline=None,
    phases=PHASES,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=cases())
def test_any_tar_round_trips(fmt, case):
    cs, entries, prioritized, compression = case
    with tempfile.TemporaryDirectory() as d:
        conv = tf.convert(
            Path(d), entries, fmt, compression=compression, prioritized=prioritized, chunk_size=cs
        )
        tf.check_layer(conv, fmt, entries, prioritized)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sample_layer(fmt, tmp_path):
    entries = tf.sample_entries(CS)
    conv = tf.convert(tmp_path, entries, fmt, chunk_size=CS)
    tf.check_layer(conv, fmt, entries)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_layer(fmt, tmp_path):
    conv = tf.convert(tmp_path, [], fmt)
    tf.check_layer(conv, fmt, [])
    assert [e["name"] for e in conv.entries] == [tf.NO_LANDMARK]


@pytest.mark.parametrize("fmt", FORMATS)
def test_deterministic(fmt, tmp_path):
    entries = tf.sample_entries(CS)
    a = tf.convert(tmp_path, entries, fmt, name="a", chunk_size=CS, prioritized=["bin/sh"])
    b = tf.convert(tmp_path, entries, fmt, name="b", chunk_size=CS, prioritized=["bin/sh"])
    assert a.blob == b.blob
    assert a.result.toc_blob == b.result.toc_blob
    assert a.result.annotations == b.result.annotations
    assert (a.result.digest, a.result.diff_id) == (b.result.digest, b.result.diff_id)


@pytest.mark.parametrize("fmt", FORMATS)
def test_input_compression_does_not_change_output(fmt, tmp_path):
    entries = tf.sample_entries(CS)
    tar_bytes = tf.build_tar(entries)
    padded = tf.build_tar(entries, record_pad=True)
    half = len(tar_bytes) // 2 + 100  # not on a block boundary
    multi_gz = tf.gzip_bytes(tar_bytes[:half]) + tf.gzip_bytes(tar_bytes[half:], level=1)
    skip = tf.ZSTD_SKIPPABLE_MAGIC + b"\x03\x00\x00\x00abc"
    multi_zst = tf.zstd_bytes(tar_bytes[:half]) + skip + tf.zstd_bytes(tar_bytes[half:])
    blobs = {}
    for label, src, comp in [
        ("tar", tar_bytes, "tar"),
        ("padded", padded, "tar"),
        ("gz", tar_bytes, "gz"),
        ("zst", tar_bytes, "zst"),
        ("multi-gz", multi_gz, "tar"),  # raw bytes: compression is detected by magic
        ("multi-zst", multi_zst, "tar"),
    ]:
        conv = tf.convert(tmp_path, src, fmt, compression=comp, name=label, chunk_size=CS)
        blobs[label] = (conv.blob, conv.result.toc_blob)
    assert blobs["gz"] == blobs["tar"]
    assert blobs["zst"] == blobs["tar"]
    assert blobs["padded"] == blobs["tar"]
    assert blobs["multi-gz"] == blobs["tar"]
    assert blobs["multi-zst"] == blobs["tar"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunk_entries(fmt, tmp_path):
    sizes = {"f3000": 3000, "f1024": 1024, "f2048": 2048, "f1023": 1023}
    entries = [tf.reg(n, tf.content("random", s, s)) for n, s in sizes.items()]
    conv = tf.convert(tmp_path, entries, fmt, chunk_size=1024)
    tf.check_layer(conv, fmt, entries)
    by_name: dict[str, list[dict]] = {}
    for e in conv.entries:
        by_name.setdefault(e["name"], []).append(e)

    def shape(name):
        return [(e["type"], e.get("chunkOffset"), e.get("chunkSize")) for e in by_name[name]]

    assert shape("f3000") == [("reg", None, 1024), ("chunk", 1024, 1024), ("chunk", 2048, None)]
    assert shape("f2048") == [("reg", None, 1024), ("chunk", 1024, 1024)]
    assert shape("f1024") == [("reg", None, 1024)]
    assert shape("f1023") == [("reg", None, None)]
    f3000 = by_name["f3000"]
    assert f3000[0]["size"] == 3000
    assert all("size" not in e and "modtime" not in e for e in f3000[1:])
    offsets = [e["offset"] for e in f3000]
    assert offsets == sorted(offsets) and len(set(offsets)) == 3
    # unchunked files: chunkDigest equals the file digest
    assert by_name["f1023"][0]["chunkDigest"] == by_name["f1023"][0]["digest"]
    with open_layer(
        conv.path, toc_digest=conv.result.toc_digest, external_toc=conv.result.toc_blob
    ) as layer:
        got = [(e.chunk_offset, e.chunk_size) for e in layer.toc.entries if e.name == "f3000"]
    assert [c for c, _ in got] == [0, 1024, 2048]
    assert [s for _, s in got][:2] == [1024, 1024]


@pytest.mark.parametrize("fmt", FORMATS)
def test_min_chunk_size(fmt, tmp_path):
    entries = [tf.dir_("d/")] + [
        tf.reg(f"d/f{i:02d}", tf.content("random" if i % 2 else "text", 300 + 37 * i, i))
        for i in range(24)
    ]
    if fmt is Format.ZSTDCHUNKED:
        # min-chunk is a gzip-member notion (spec §2: not applied to zstd:chunked); the
        # engine refuses it rather than silently ignoring it.
        with pytest.raises(BadInputError, match="zstd"):
            tf.convert(tmp_path, entries, fmt, chunk_size=CS, min_chunk_size=4096)
        assert not (tmp_path / "layer.out").exists()
        return
    conv = tf.convert(
        tmp_path, entries, fmt, chunk_size=CS, min_chunk_size=4096, prioritized=["d/f03"]
    )
    tf.check_layer(conv, fmt, entries, ["d/f03"])
    inner = [e for e in conv.entries if e.get("innerOffset")]
    assert inner, "min_chunk_size produced no innerOffset"
    landmark = next(e for e in conv.entries if e["name"] == tf.LANDMARK)
    assert "innerOffset" not in landmark, "the landmark must start its own member"


@pytest.mark.parametrize("fmt", FORMATS)
def test_prioritized_first_then_landmark(fmt, tmp_path):
    entries = tf.sample_entries(CS)
    prio = ["etc/small", "bin/rbash", "opt/longlink", "bin/sh"]
    conv = tf.convert(tmp_path, entries, fmt, chunk_size=CS, prioritized=prio)
    tf.check_layer(conv, fmt, entries, prio)
    names = [tf.clean_name(e["name"]) for e in conv.main_entries()]
    assert names[: names.index(tf.LANDMARK) + 1] == [
        "",
        "etc",
        "etc/small",
        "bin",
        "bin/rbash",
        "opt/longlink",
        "bin/sh",
        tf.LANDMARK,
    ]
    assert tf.NO_LANDMARK not in names


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_prioritized_landmark_first(fmt, tmp_path):
    entries = tf.sample_entries(CS)
    conv = tf.convert(tmp_path, entries, fmt, chunk_size=CS)
    names = [e["name"] for e in conv.entries]
    assert names[0] == tf.NO_LANDMARK
    assert tf.LANDMARK not in names
    assert names.count(tf.NO_LANDMARK) == 1


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("level", [0, 1, 9])
def test_compression_levels(fmt, level, tmp_path):
    entries = tf.sample_entries(CS)
    if tf.is_zstd(fmt) and level == 0:
        with pytest.raises(BadInputError, match="level"):  # zstd levels are 1-22
            tf.convert(tmp_path, entries, fmt, chunk_size=CS, compression_level=level)
        return
    conv = tf.convert(tmp_path, entries, fmt, chunk_size=CS, compression_level=level)
    tf.check_layer(conv, fmt, entries)
    if not tf.is_zstd(fmt):
        # Go compress/gzip member header: no flags, MTIME 0, XFL by level, OS 255 (§1.4)
        xfl = {9: 2, 1: 4}.get(level, 0)
        starts = tf.member_starts(conv.blob, fmt)
        assert tf.gzip_member_headers(conv.blob, starts) == {
            bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, xfl, 0xFF])
        }


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=15, deadline=None, phases=PHASES, print_blob=True)
@given(case=cases())
def test_reconverting_output_is_idempotent(fmt, case):
    """A converted blob fed back as input (gzip, or zstd with skippable frames) converts to
    the very same bytes: landmarks and the old TOC are dropped, headers re-encode stably."""
    cs, entries, prioritized, _ = case
    with tempfile.TemporaryDirectory() as d:
        first = tf.convert(
            Path(d), entries, fmt, name="first", prioritized=prioritized, chunk_size=cs
        )
        second = tf.convert(
            Path(d), first.blob, fmt, name="second", prioritized=prioritized, chunk_size=cs
        )
        assert second.blob == first.blob
        assert second.result.toc_blob == first.result.toc_blob
