"""Bad input through the real CLI: one clear line on stderr, a non-zero exit, no debris.

`layer convert` must refuse broken or unsupported tars (spec §1.1) without leaving OUT or a
temporary file behind; `layer verify` must catch any mismatch between a blob and its TOC and
name the entry and blob offset.
"""

from __future__ import annotations

import gzip
import json
import random
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from support import tarfactory as tf
from support.cli import Invoked, invoke

import estargz_opt.errors as errors
import estargz_opt.format as fmt_mod

pytestmark = pytest.mark.unit

Format = fmt_mod.Format


def assert_one_line_error(proc: Invoked, *keywords: str) -> str:
    """Non-zero exit, exactly one stderr line, containing at least one of the keywords."""
    assert proc.returncode != 0, f"exit 0; stdout={proc.stdout!r}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"want exactly one stderr line, got {proc.stderr!r}"
    msg = lines[0]
    assert "Traceback" not in msg
    if keywords:
        assert any(k in msg.lower() for k in keywords), f"{msg!r} lacks any of {keywords}"
    return msg


# ---------------------------------------------------------------------------------------------
# inputs `layer convert` must refuse


def _text_tar() -> bytes:
    return tf.build_tar(
        [tf.dir_("d/")] + [tf.reg(f"d/f{i}", tf.content("text", 20_000, i)) for i in range(4)]
    )


def corrupt_gzip() -> bytes:
    gz = bytearray(tf.gzip_bytes(_text_tar(), level=9))
    mid = len(gz) // 2
    for i in range(mid, mid + 16):
        gz[i] ^= 0xA5
    with pytest.raises((OSError, zlib.error, EOFError)):  # the fixture really is corrupt
        gzip.decompress(bytes(gz))
    return bytes(gz)


def truncated_gzip() -> bytes:
    gz = tf.gzip_bytes(_text_tar())
    return gz[: len(gz) // 2]


def truncated_zstd() -> bytes:
    zs = tf.zstd_bytes(_text_tar())
    return zs[: len(zs) // 2]


def not_a_tar() -> bytes:
    data = random.Random(1).randbytes(4096)
    return b"\x00\x01" + data[2:]  # neither gzip nor zstd magic


def truncated_tar() -> bytes:
    hdr = tf.reg("big", b"x" * 1000).header()
    return tf.build_tar([tf.reg("ok", b"fine\n")], eof=False) + hdr + b"y" * 10


def truncated_header() -> bytes:
    return tf.build_tar([tf.reg("ok", b"fine\n")], eof=False) + tf.reg("half", b"").header()[:300]


def bad_checksum_later() -> bytes:
    second = bytearray(tf.reg("second", b"2").header())
    second[0] ^= 0x01  # name byte changes, checksum no longer matches
    return (
        tf.build_tar([tf.reg("first", b"1")], eof=False)
        + bytes(second)
        + b"2".ljust(512, b"\0")
        + b"\0" * 1024
    )


def global_pax_header() -> bytes:
    import io

    buf = io.BytesIO()
    with tarfile.TarFile(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}
    ) as t:
        ti = tarfile.TarInfo("a")
        ti.size = 2
        t.addfile(ti, io.BytesIO(b"a\n"))
    data = buf.getvalue()
    assert data[156:157] == b"g"
    return data


def dotdot(name: str):
    return lambda: tf.build_tar([tf.reg("ok", b"1"), tf.reg(name, b"evil\n")])


def hardlink_outside() -> bytes:
    return tf.build_tar([tf.reg("ok", b"1"), tf.hardlink("h", "../../etc/shadow")])


def huge_gnu_longname() -> bytes:
    hdr = tf.raw_header(b"././@LongLink", b"L", 2 << 30, gnu=True)
    return hdr + b"n" * 100 + b"\0" * 412 + tf.reg("victim", b"v").encode() + b"\0" * 1024


def huge_pax_header() -> bytes:
    hdr = tf.raw_header(b"././@PaxHeader", b"x", 2 << 30)
    return hdr + b"30 path=aaaaaaaaaaaaaaaaaaaaa\n".ljust(512, b"\0") + b"\0" * 1024


def absurd_pax_record() -> bytes:
    records = b"99999999999999999999 path=x\n"
    hdr = tf.raw_header(b"././@PaxHeader", b"x", len(records))
    return hdr + records.ljust(512, b"\0") + tf.reg("victim", b"v").encode() + b"\0" * 1024


OUTSIDE = ("outside", "climbs out", "escape")
TRUNCATED = ("truncat",)
OVERSIZED = ("header", "too large", "too long", "oversized", "limit")

BAD_SOURCES = [
    ("corrupt-gzip", corrupt_gzip, ("gzip",)),
    ("truncated-gzip", truncated_gzip, TRUNCATED),
    ("truncated-zstd", truncated_zstd, TRUNCATED),
    ("not-a-tar", not_a_tar, ("not a tar",)),
    ("truncated-tar", truncated_tar, TRUNCATED),
    ("truncated-header", truncated_header, TRUNCATED),
    ("bad-checksum", bad_checksum_later, ("checksum", "header")),
    ("gnu-sparse", tf.gnu_sparse_tar, ("sparse",)),
    ("global-pax", global_pax_header, ("global",)),
    ("dotdot", dotdot("../x"), OUTSIDE),
    ("dotdot-inner", dotdot("a/../../x"), OUTSIDE),
    ("hardlink-outside", hardlink_outside, OUTSIDE),
    ("huge-gnu-longname", huge_gnu_longname, OVERSIZED),
    ("huge-pax-header", huge_pax_header, OVERSIZED),
    ("absurd-pax-record", absurd_pax_record, ("pax", "header", "record")),
]


@pytest.mark.parametrize(
    ("make", "keywords"), [(m, k) for _, m, k in BAD_SOURCES], ids=[i for i, _, _ in BAD_SOURCES]
)
def test_convert_refuses_bad_input(make, keywords, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(make())
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "layer.blob"
    proc = invoke("layer", "convert", src, out)
    assert_one_line_error(proc, *keywords)
    assert list(outdir.iterdir()) == [], "OUT or a temporary file was left behind"


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("case", ["truncated-tar", "global-pax", "dotdot", "corrupt-gzip"])
def test_api_raises_bad_input_and_leaves_nothing(fmt, case, tmp_path):
    (make,) = [m for i, m, _ in BAD_SOURCES if i == case]
    src = tmp_path / "src.bin"
    src.write_bytes(make())
    outdir = tmp_path / "out"
    outdir.mkdir()
    with pytest.raises(errors.BadInputError):
        fmt_mod.convert_layer(src, outdir / "x", fmt_mod.LayerOptions(format=fmt))
    assert list(outdir.iterdir()) == []


def test_existing_out_survives_a_failed_convert(tmp_path):
    src = tmp_path / "src.tar"
    src.write_bytes(truncated_tar())
    out = tmp_path / "out.blob"
    out.write_bytes(b"previous")
    assert_one_line_error(invoke("layer", "convert", src, out), *TRUNCATED)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.blob", "src.tar"]


def test_absolute_names_are_normalized_not_refused(tmp_path):
    entries = [tf.dir_("/etc/"), tf.reg("/etc/x", b"x\n"), tf.hardlink("/etc/y", "/etc/x")]
    src = tmp_path / "src.tar"
    src.write_bytes(tf.build_tar(entries))
    out = tmp_path / "out.blob"
    proc = invoke("layer", "convert", src, out)
    assert proc.returncode == 0, proc.stderr
    names = [e["name"] for e in tf.toc_entries(tf.extract_toc_json(out.read_bytes(), "estargz"))]
    assert [tf.clean_name(n) for n in names] == [tf.NO_LANDMARK, "etc", "etc/x", "etc/y"]
    assert not any(n.startswith("/") for n in names)
    stream = tf.decompress_blob(out.read_bytes(), "estargz")
    assert tf.file_tree(stream) == tf.tree_of_entries(entries)


# ---------------------------------------------------------------------------------------------
# blobs `layer verify` must refuse


def gzip_toc_member(toc_json: bytes) -> bytes:
    ti = tarfile.TarInfo(tf.TOC_NAME)
    ti.size, ti.mtime = len(toc_json), 0
    toc_tar = ti.tobuf(tarfile.USTAR_FORMAT) + toc_json + tf.pad(len(toc_json)) + b"\0" * 1024
    return tf.gzip_bytes(toc_tar, 9)


def rewrite_toc(conv: tf.Converted, fmt, mutate) -> tuple[bytes, bytes | None, str]:
    """(blob, external TOC blob, TOC digest) with the TOC replaced by mutate(entries); footer
    and TOC offsets are recomputed so that only the lie itself is wrong."""
    doc = json.loads(conv.toc_json)
    mutate(doc["entries"])
    new = tf.go_marshal_indent(doc)
    blob = conv.blob
    if tf.is_external(fmt):
        return blob, gzip_toc_member(new), tf.sha256_digest(new)
    if tf.is_zstd(fmt):
        toc_off = tf.zstd_footer(blob)[0]
        payload = blob[: toc_off - 8]
        comp = tf.zstd_bytes(new)
        frame = tf.ZSTD_SKIPPABLE_MAGIC + struct.pack("<I", len(comp)) + comp
        footer = (
            tf.ZSTD_SKIPPABLE_MAGIC
            + struct.pack("<I", 40)
            + struct.pack("<QQQQ", len(payload) + 8, len(comp), len(new), 1)
            + tf.ZSTD_FOOTER_MAGIC
        )
        return payload + frame + footer, None, tf.sha256_digest(new)
    toc_off = tf.gzip_footer_toc_offset(blob)
    footer = (
        bytes.fromhex("1f8b08040000000000ff1a0053471600")
        + b"%016x" % toc_off
        + b"STARGZ"
        + bytes.fromhex("010000ffff")
        + b"\0" * 8
    )
    return blob[:toc_off] + gzip_toc_member(new) + footer, None, tf.sha256_digest(new)


@pytest.fixture(params=list(Format), ids=lambda f: f.value)
def layer(request, tmp_path):
    fmt = request.param
    entries = [
        tf.reg("small", b"small file\n"),
        tf.reg("big", tf.content("random", 3000, 5)),
        tf.reg("other", tf.content("text", 1500, 6)),
    ]
    conv = tf.convert(tmp_path, entries, fmt, chunk_size=1024)
    proc = verify_cli(tmp_path, conv.blob, conv.result.toc_blob, conv.result.toc_digest)
    assert proc.returncode == 0, proc.stderr
    return fmt, conv


def verify_cli(tmp_path: Path, blob: bytes, toc_blob: bytes | None, digest: str):
    p = tmp_path / "verify.blob"
    p.write_bytes(blob)
    args: list[str | Path] = ["layer", "verify", p, "--toc-digest", digest]
    if toc_blob is not None:
        (tmp_path / "verify.toc").write_bytes(toc_blob)
        args += ["--toc", tmp_path / "verify.toc"]
    return invoke(*args)


def test_verify_accepts_an_identical_rewrite(layer, tmp_path):
    """Control for the TOC-rewriting tests below: an unchanged TOC still verifies."""
    fmt, conv = layer
    blob, toc_blob, digest = rewrite_toc(conv, fmt, lambda entries: None)
    assert digest == conv.result.toc_digest
    proc = verify_cli(tmp_path, blob, toc_blob, digest)
    assert proc.returncode == 0, proc.stderr


def test_verify_flipped_byte_in_chunk(layer, tmp_path):
    fmt, conv = layer
    big = [e for e in conv.entries if e["name"] == "big"]
    target = big[1]  # the second chunk: its own member/frame
    off = target["offset"]
    assert target["type"] == "chunk" and off > 0
    starts = tf.member_starts(conv.blob, fmt)
    nxt = starts[starts.index(off) + 1]
    blob = bytearray(conv.blob)
    blob[off + (nxt - off) // 2] ^= 0x40
    proc = verify_cli(tmp_path, bytes(blob), conv.result.toc_blob, conv.result.toc_digest)
    msg = assert_one_line_error(proc)
    assert "big" in msg and str(off) in msg, msg


@pytest.mark.parametrize("lie", ["offset", "size", "chunkDigest"])
def test_verify_toc_that_lies(layer, lie, tmp_path):
    fmt, conv = layer
    other_off = next(e["offset"] for e in conv.entries if e["name"] == "other")

    def mutate(entries):
        (small,) = [e for e in entries if e["name"] == "small"]
        if lie == "offset":
            small["offset"] = other_off
        elif lie == "size":
            small["size"] += 100
        else:
            small["chunkDigest"] = tf.sha256_digest(b"something else")

    proc = verify_cli(tmp_path, *rewrite_toc(conv, fmt, mutate))
    msg = assert_one_line_error(proc)
    assert "small" in msg, msg


def test_verify_wrong_toc_digest(layer, tmp_path):
    _, conv = layer
    proc = verify_cli(tmp_path, conv.blob, conv.result.toc_blob, "sha256:" + "0" * 64)
    assert_one_line_error(proc, "digest")


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_verify_truncated_blob(layer, keep, tmp_path):
    _, conv = layer
    blob = conv.blob[: int(len(conv.blob) * keep)]
    proc = verify_cli(tmp_path, blob, conv.result.toc_blob, conv.result.toc_digest)
    assert_one_line_error(proc, "truncat", "footer", "toc")


def test_verify_external_toc_needs_the_toc(tmp_path):
    conv = tf.convert(tmp_path, [tf.reg("a", b"a")], Format.EXTERNAL_TOC)
    proc = invoke("layer", "verify", conv.path, "--toc-digest", conv.result.toc_digest)
    assert_one_line_error(proc, "toc")
    (tmp_path / "toc").write_bytes(conv.result.toc_blob)
    proc = invoke(
        "layer",
        "verify",
        conv.path,
        "--toc",
        tmp_path / "toc",
        "--toc-digest",
        conv.result.toc_digest,
    )
    assert proc.returncode == 0, proc.stderr
