"""Byte-level format checks: Go-compatible TOC JSON and the three footers.

The TOC digest is sha256 over the exact JSON bytes, so every whitespace and escaping detail
matters (Go's encoding/json output, as upstream's estargz writer produces it).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import struct
import subprocess
import tarfile

import pytest
import zstandard
from support import tarfactory as tf
from support.cli import cli_argv

import estargz_opt.format as fmt_mod

pytestmark = pytest.mark.unit

Format = fmt_mod.Format
FORMATS = list(Format)

FIELD_ORDER = [
    "name", "type", "size", "modtime", "linkName", "mode", "uid", "gid", "userName",
    "groupName", "offset", "innerOffset", "devMajor", "devMinor", "xattrs", "digest",
    "chunkOffset", "chunkSize", "chunkDigest",
]  # fmt: skip
GO_GZIP_L9 = bytes.fromhex("1f8b08000000000002ff")


def pairs(toc_json: bytes):
    """The TOC with every object as a list of (key, value) pairs, preserving order."""
    return json.loads(toc_json, object_pairs_hook=list)


def by_name(conv: tf.Converted) -> dict[str, dict]:
    return {e["name"]: e for e in conv.main_entries()}


def convert(tmp_path, entries, fmt=Format.ESTARGZ, **kw) -> tf.Converted:
    kw.setdefault("chunk_size", 1024)
    return tf.convert(tmp_path, entries, fmt, **kw)


ESCAPES = "a<b>&c\u2028d\u2029e"
ODD_NAMES = [
    tf.reg(f"esc/{ESCAPES}", b"1"),
    tf.reg("esc/ünïcødé 日本", b"2"),
    tf.reg('esc/q"uote\\back', b"3"),
    tf.symlink("esc/link", "to<&>"),
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_json_is_go_marshal_indent(fmt, tmp_path):
    entries = tf.sample_entries(1024) + ODD_NAMES
    conv = convert(tmp_path, entries, fmt)
    raw = conv.toc_json
    assert raw == tf.go_marshal_indent(json.loads(raw))
    assert raw.startswith(b'{\n\t"version": 1,\n\t"entries": [\n\t\t{\n\t\t\t"name": ')
    assert raw.endswith(b"\n\t\t}\n\t]\n}")  # no trailing newline
    for ch, esc in [
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ]:
        assert ch.encode() not in raw and esc.encode() in raw, ch
    assert "ünïcødé 日本".encode() in raw  # other non-ASCII is written raw
    assert b'q\\"uote\\\\back' in raw
    names = {e["name"] for e in conv.entries}
    assert f"esc/{ESCAPES}" in names and "esc/link" in names
    assert by_name(conv)["esc/link"]["linkName"] == "to<&>"
    tf.check_layer(conv, fmt, entries)
    with fmt_mod.open_layer(
        conv.path, toc_digest=conv.result.toc_digest, external_toc=conv.result.toc_blob
    ) as layer:
        assert layer.toc_json == raw


@pytest.mark.parametrize("fmt", FORMATS)
def test_field_order_and_known_fields_only(fmt, tmp_path):
    entries = tf.sample_entries(1024)
    conv = convert(tmp_path, entries, fmt, prioritized=["etc/small"])
    doc = pairs(conv.toc_json)
    assert [k for k, _ in doc] == ["version", "entries"]
    seen = set()
    for entry in dict(doc)["entries"]:
        keys = [k for k, _ in entry]
        assert set(keys) <= set(FIELD_ORDER), keys
        assert keys == sorted(keys, key=FIELD_ORDER.index), keys
        assert keys[:2] == ["name", "type"]
        seen.update(keys)
    # the sample layer exercises every field except innerOffset (min-chunk only)
    assert seen == set(FIELD_ORDER) - {"innerOffset"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_values_are_omitted(fmt, tmp_path):
    entries = [
        tf.reg("empty", b"", mode=0, mtime=0),
        tf.dir_("d/", mode=0o755, mtime=0),
        tf.reg("zero-ids", b"data", mode=0o644, uid=0, gid=0, mtime=0),
        tf.Entry("dev0", tarfile.CHRTYPE, mode=0o600, devmajor=5, devminor=0, mtime=0),
        tf.Entry("fifo", tarfile.FIFOTYPE, mode=0, mtime=0),
    ]
    conv = convert(tmp_path, entries, fmt)
    e = by_name(conv)
    assert e["empty"] == {"name": "empty", "type": "reg", "digest": tf.EMPTY_DIGEST}
    assert e["d/"] == {"name": "d/", "type": "dir", "mode": 0o755}
    assert e["fifo"] == {"name": "fifo", "type": "fifo"}
    assert e["dev0"] == {"name": "dev0", "type": "char", "mode": 0o600, "devMajor": 5}
    z = e["zero-ids"]
    assert set(z) == {"name", "type", "size", "mode", "offset", "digest", "chunkDigest"}
    assert z["digest"] == z["chunkDigest"] == tf.sha256_digest(b"data")
    for entry in conv.entries:
        for k, v in entry.items():
            if k not in ("name", "type"):
                assert v not in (0, "", {}, None), (entry["name"], k)


@pytest.mark.parametrize("fmt", FORMATS)
def test_xattrs_are_base64_with_sorted_keys(fmt, tmp_path):
    xattrs = {"user.z": "last", "user.a": "bar", "user.m": "é", "user.empty": ""}
    entries = [tf.reg("f", b"x", xattrs=xattrs)]
    conv = convert(tmp_path, entries, fmt)
    (entry,) = [dict(e) for e in dict(pairs(conv.toc_json))["entries"] if dict(e)["name"] == "f"]
    got = entry["xattrs"]
    assert [k for k, _ in got] == sorted(xattrs)
    assert dict(got) == {k: base64.b64encode(v.encode()).decode() for k, v in xattrs.items()}
    assert dict(got)["user.a"] == "YmFy"
    tf.check_layer(conv, fmt, entries)


@pytest.mark.parametrize("fmt", FORMATS)
def test_modtime_is_rfc3339_utc_rounded(fmt, tmp_path):
    entries = [
        tf.reg("t", b"", mtime=1_600_000_000),
        tf.reg("zero", b"", mtime=0),
        tf.reg("up", b"", mtime=1_600_000_000.75),
        tf.reg("down", b"", mtime=1_600_000_000.25),
        tf.dir_("d/", mtime=1_600_000_000),
        tf.reg("chunked", tf.content("random", 3000, 1), mtime=1_600_000_000),
    ]
    conv = convert(tmp_path, entries, fmt)
    e = by_name(conv)
    assert e["t"]["modtime"] == "2020-09-13T12:26:40Z"
    assert "modtime" not in e["zero"]
    assert e["up"]["modtime"] == "2020-09-13T12:26:41Z"
    assert e["down"]["modtime"] == "2020-09-13T12:26:40Z"
    assert e["d/"]["modtime"] == "2020-09-13T12:26:40Z"
    for entry in conv.entries:
        if entry["type"] == "chunk":
            assert "modtime" not in entry
        elif "modtime" in entry:
            assert tf.RFC3339_UTC.match(entry["modtime"]), entry
    tf.check_layer(conv, fmt, entries)


@pytest.mark.parametrize("fmt", FORMATS)
def test_user_and_group_names_are_elided_when_unchanged(fmt, tmp_path):
    entries = [
        tf.reg("a1", b"1", uid=1000, gid=50, uname="alice", gname="staff"),
        tf.reg("a2", b"2", uid=1000, gid=50, uname="alice", gname="staff"),
        tf.reg("a3", b"3", uid=1000, gid=50, uname="", gname=""),
        tf.reg("a4", b"4", uid=1000, gid=50, uname="alice", gname="staff"),
        tf.reg("b1", b"5", uid=1000, gid=50, uname="bob", gname="wheel"),
        tf.reg("a5", b"6", uid=1000, gid=50, uname="alice", gname="wheel"),
    ]
    opts = {}
    if "workers" in {f.name for f in dataclasses.fields(fmt_mod.LayerOptions)}:
        opts["workers"] = 1  # the elision state is per part (§1.3)
    conv = convert(tmp_path, entries, fmt, **opts)
    e = by_name(conv)
    names = {n: (e[n].get("userName"), e[n].get("groupName")) for n in e if n[0] in "ab"}
    assert names == {
        "a1": ("alice", "staff"),
        "a2": (None, None),
        "a3": (None, None),
        "a4": (None, None),
        "b1": ("bob", "wheel"),
        "a5": ("alice", None),
    }
    tf.check_layer(conv, fmt, entries)  # and write_tar restores every name


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("prioritized", [[], ["f"]])
def test_landmark_entry(fmt, prioritized, tmp_path):
    conv = convert(
        tmp_path, [tf.reg("f", b"f\n"), tf.reg("g", b"g\n")], fmt, prioritized=prioritized
    )
    name = tf.LANDMARK if prioritized else tf.NO_LANDMARK
    (entry,) = [e for e in conv.entries if e["name"] == name]
    assert set(entry) == {"name", "type", "size", "offset", "digest", "chunkDigest"}
    assert (entry["type"], entry["size"]) == ("reg", 1)
    assert entry["digest"] == entry["chunkDigest"] == tf.LANDMARK_DIGEST
    assert tf.read_payload(conv.blob, fmt, entry["offset"], 0, 1) == b"\x0f"
    stream = tf.decompress_blob(conv.blob, fmt)
    (ti,) = [ti for ti, _ in tf.tar_members(stream) if ti.name == name]
    assert (ti.type, ti.size, ti.mode, ti.uid, ti.gid, ti.mtime) == (b"0", 1, 0, 0, 0, 0)
    assert (ti.uname, ti.gname) == ("", "")


INVALID_UTF8 = [tf.reg("bad\udcffname", b"x", fmt=tf.GNU)]  # the byte 0xff (surrogateescape)


def test_invalid_utf8_name_round_trips(tmp_path):
    assert b"bad\xffname" in tf.build_tar(INVALID_UTF8)
    conv = convert(tmp_path, INVALID_UTF8)
    assert "bad\ufffdname" in by_name(conv)  # the TOC reads back as U+FFFD
    tf.check_layer(conv, Format.ESTARGZ, INVALID_UTF8)  # the tar itself keeps the raw byte


def test_invalid_utf8_is_escaped_like_go(tmp_path):
    """Go's encoder writes the 6-byte escape `\\ufffd` for each invalid byte (a valid U+FFFD
    in the input stays raw), so the TOC digest only matches Go's if we do the same."""
    conv = convert(tmp_path, INVALID_UTF8)
    assert b'"bad\\ufffdname"' in conv.toc_json


# ---------------------------------------------------------------------------------------------
# footers and TOC containers


def check_toc_tar(tar_bytes: bytes, toc_json: bytes) -> None:
    """tar(stargz.index.json + JSON + padding + EOF) with an all-zero USTAR header."""
    hdr = tar_bytes[:512]
    assert hdr[:100].rstrip(b"\0") == b"stargz.index.json"
    assert hdr[156:157] == b"0"
    assert int(hdr[124:136].rstrip(b"\0"), 8) == len(toc_json)
    for off, width in [(100, 8), (108, 8), (116, 8), (136, 12)]:  # mode uid gid mtime
        assert int(hdr[off : off + width].rstrip(b"\0 ") or b"0", 8) == 0
    assert hdr[257:265] == b"ustar\x0000"
    assert hdr[265:329] == b"\0" * 64  # uname, gname
    assert hdr[329:345] == b"0000000\0" * 2  # devmajor, devminor as Go writes them
    chk = sum(hdr[:148]) + 8 * 0x20 + sum(hdr[156:])
    assert hdr[148:156] == b"%06o\0 " % chk
    padded = len(toc_json) + (-len(toc_json) % 512)
    assert tar_bytes[512 : 512 + len(toc_json)] == toc_json
    assert tar_bytes[512 + len(toc_json) :] == b"\0" * (padded - len(toc_json) + 1024)


def test_estargz_footer_and_toc_member(tmp_path):
    conv = convert(tmp_path, tf.sample_entries(1024))
    blob = conv.blob
    footer = blob[-51:]
    toc_off = tf.gzip_footer_toc_offset(blob)
    assert footer[:16] == bytes.fromhex("1f8b08040000000000ff1a0053471600")
    assert footer[16:32] == b"%016x" % toc_off
    assert footer[32:38] == b"STARGZ"
    assert footer[38:43] == bytes.fromhex("010000ffff")
    assert footer[43:] == b"\0" * 8
    # the TOC member starts where the footer says, right after the last payload member
    starts = tf.member_starts(blob, Format.ESTARGZ)
    assert toc_off > starts[-1]
    assert blob[toc_off : toc_off + 10] == GO_GZIP_L9
    tar_bytes, used = tf._gunzip_one_member(blob[toc_off:-51])
    assert used == len(blob) - 51 - toc_off
    check_toc_tar(tar_bytes, conv.toc_json)


def test_external_toc_footer_and_toc_blob(tmp_path):
    conv = convert(tmp_path, tf.sample_entries(1024), Format.EXTERNAL_TOC)
    blob, toc_blob = conv.blob, conv.result.toc_blob
    assert blob[-46:] == (
        bytes.fromhex("1f8b08040000000000ff150053471100")
        + b"STARGZEXTERNALTOC"
        + bytes.fromhex("010000ffff")
        + b"\0" * 8
    )
    assert toc_blob[:10] == GO_GZIP_L9
    tar_bytes, used = tf._gunzip_one_member(toc_blob)
    assert used == len(toc_blob)
    check_toc_tar(tar_bytes, conv.toc_json)
    # no TOC inside the blob: the payload members run right up to the footer
    tf.member_starts(blob, Format.EXTERNAL_TOC)
    assert b"stargz.index.json" not in tf.decompress_blob(blob, Format.EXTERNAL_TOC)
    # and it is byte-identical to the in-blob TOC member of the plain eStargz conversion
    plain = convert(tmp_path, tf.sample_entries(1024), name="plain")
    assert plain.blob[tf.gzip_footer_toc_offset(plain.blob) : -51] == toc_blob


def test_zstd_chunked_footer_and_annotations(tmp_path):
    conv = convert(tmp_path, tf.sample_entries(1024), Format.ZSTDCHUNKED)
    blob = conv.blob
    assert blob[-48:-40] == tf.ZSTD_SKIPPABLE_MAGIC + b"\x28\x00\x00\x00"
    assert blob[-8:] == b"GnUlInUx"
    toc_off, clen, ulen, kind = tf.zstd_footer(blob)
    assert kind == 1
    assert blob[toc_off - 8 : toc_off] == tf.ZSTD_SKIPPABLE_MAGIC + struct.pack("<I", clen)
    assert toc_off + clen == len(blob) - 48
    compressed = blob[toc_off : toc_off + clen]
    d = zstandard.ZstdDecompressor().decompressobj()
    assert d.decompress(compressed) == conv.toc_json and d.eof and not d.unused_data
    assert ulen == len(conv.toc_json)
    ann = conv.result.annotations
    assert ann[tf.ZSTD_POSITION_ANNOTATION] == f"{toc_off}:{clen}:{ulen}:1"
    assert ann[tf.ZSTD_CHECKSUM_ANNOTATION] == tf.sha256_digest(compressed)
    assert ann[tf.TOC_DIGEST_ANNOTATION] == tf.sha256_digest(conv.toc_json)
    assert tf.member_starts(blob, Format.ZSTDCHUNKED)[0] == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_layer_toc_prints_the_exact_json(fmt, tmp_path):
    conv = convert(tmp_path, tf.sample_entries(1024) + ODD_NAMES, fmt)
    cmd = [*cli_argv(), "layer", "toc", str(conv.path)]
    if conv.result.toc_blob is not None:
        (tmp_path / "toc.blob").write_bytes(conv.result.toc_blob)
        cmd += ["--toc", str(tmp_path / "toc.blob")]
    proc = subprocess.run(cmd, capture_output=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == conv.toc_json + b"\n"
