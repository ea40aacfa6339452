"""Hostile inputs through the real CLI: one line, a non-zero exit, bounded memory, no hang.

Each input class of the fuzz/kill/load campaign is built here byte by byte:
decompression bombs in the TOC, in a chunk and as a source layer; TOC JSON nested
thousands deep; tar mtimes outside int64 or past year 9999; hardlink loops and long
chains; damaged metadata-only members and payload entries that disagree with an intact
TOC. The child's own peak RSS comes from tests/support/peakrss.py; a timeout is the hang guard.
Times are recorded in the test's output (run with -s to see them).
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from support import imagefactory as imf, tarfactory as tf
from support.cli import cli_argv
from support.peakrss import run_measured

from estargz_opt.format import Format, estargz, externaltoc, zstdchunked

pytestmark = pytest.mark.slow

MAX_RSS_MIB = 200
HANG_GUARD_S = 60
MiB = 1 << 20


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    rss_mib: float


def measured(*args: str | Path) -> Run:
    """The CLI in a child process, with its own peak RSS (peakrss); killed past the guard."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        m = run_measured(
            cli_argv(*args),
            timeout=HANG_GUARD_S,
            stdout=out,
            stderr=err,
        )
        if m is None:
            pytest.fail(f"hang: {args} ran over {HANG_GUARD_S} s")
        out.seek(0)
        err.seek(0)
        run = Run(
            m.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            m.seconds,
            m.rss_mib,
        )
    print(f"\n  {' '.join(map(str, args[:2]))}: exit {run.returncode}, {run.seconds:.2f} s, "
          f"peak RSS {run.rss_mib:.0f} MiB: {run.stderr.strip()[:160]}")
    assert run.rss_mib < MAX_RSS_MIB, f"peak RSS {run.rss_mib:.0f} MiB"
    return run


def refused(run: Run, *keywords: str) -> str:
    """Non-zero exit, exactly one stderr line, with one of the keywords; no traceback."""
    assert run.returncode not in (0, None), f"exit 0: {run.stdout[:300]!r}"
    lines = run.stderr.splitlines()
    assert len(lines) == 1, f"want one stderr line, got {run.stderr[-2000:]!r}"
    assert lines[0].startswith("estargz-opt: error: "), lines[0]
    if keywords:
        assert any(k in lines[0] for k in keywords), f"{lines[0]!r} lacks any of {keywords}"
    return lines[0]


# ---------------------------------------------------------------------------------------------
# building hostile blobs


@functools.cache
def zero_gzip(size: int, prefix: bytes = b"") -> bytes:
    """A gzip member of prefix and then size zero bytes, built without holding them (once)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [c.compress(prefix)]
    block = bytes(MiB)
    for _ in range(size // MiB):
        parts.append(c.compress(block))
    parts.append(c.flush())
    return b"".join(parts)


@functools.cache
def zero_zstd(size: int, prefix: bytes = b"") -> bytes:
    c = zstandard.ZstdCompressor(level=3, write_content_size=False)
    chunker = c.chunker(chunk_size=MiB)
    parts = list(chunker.compress(prefix))
    block = bytes(MiB)
    for _ in range(size // MiB):
        parts.extend(chunker.compress(block))
    parts.extend(chunker.finish())
    return b"".join(parts)


def sample_layer(tmp_path: Path, fmt: Format, **opts: object) -> tf.Converted:
    entries = [
        tf.dir_("a/"),
        tf.dir_("a/b/"),
        tf.reg("a/f", tf.content("text", 3000, 1)),
        tf.dir_("z/"),
        tf.symlink("y", "a/f"),
    ]
    return tf.convert(tmp_path, entries, fmt, **opts)


def gzip_payload_end(blob: bytes, fmt: Format) -> int:
    if fmt is Format.EXTERNAL_TOC:
        return len(blob) - externaltoc.FOOTER_SIZE
    return tf.gzip_footer_toc_offset(blob)


def estargz_with_toc_member(payload: bytes, toc_member: bytes) -> bytes:
    return payload + toc_member + estargz.footer(len(payload))


def zstd_with_toc(payload: bytes, compressed_toc: bytes, plain_size: int) -> bytes:
    toc_offset = len(payload) + 8
    footer = struct.pack("<QQQQ", toc_offset, len(compressed_toc), plain_size, 1) + b"GnUlInUx"
    return (
        payload
        + zstdchunked.skippable_frame(compressed_toc)
        + zstdchunked.skippable_frame(footer)
    )


def with_toc_json(conv: tf.Converted, fmt: Format, toc_json: bytes, tmp: Path) -> list[str]:
    """The converted layer with its TOC replaced: the CLI arguments that read it."""
    blob_path = tmp / "evil.blob"
    if fmt is Format.ZSTDCHUNKED:
        payload = conv.blob[: tf.zstd_footer(conv.blob)[0] - 8]
        c = zstandard.ZstdCompressor().compress(toc_json)
        blob_path.write_bytes(zstd_with_toc(payload, c, len(toc_json)))
        return [str(blob_path)]
    member = estargz.gzip_member(estargz.toc_tar(toc_json), 6)
    if fmt is Format.EXTERNAL_TOC:
        blob_path.write_bytes(conv.blob)
        (tmp / "evil.toc").write_bytes(member)
        return [str(blob_path), "--toc", str(tmp / "evil.toc")]
    payload = conv.blob[: gzip_payload_end(conv.blob, fmt)]
    blob_path.write_bytes(estargz_with_toc_member(payload, member))
    return [str(blob_path)]


ALL_FORMATS = [Format.ESTARGZ, Format.EXTERNAL_TOC, Format.ZSTDCHUNKED]
READERS = ["verify", "toc", "tar"]


def reader_args(cmd: str, blob_args: list[str], tmp: Path) -> list[str]:
    if cmd == "tar":
        return ["layer", "tar", blob_args[0], str(tmp / "out.tar"), *blob_args[1:]]
    return ["layer", cmd, *blob_args]


# ---------------------------------------------------------------------------------------------
# decompression bombs


@pytest.mark.parametrize("cmd", READERS)
@pytest.mark.parametrize("shape", ["zeros", "header-then-zeros"])
def test_gzip_bomb_in_the_toc_member(tmp_path: Path, cmd: str, shape: str) -> None:
    conv = sample_layer(tmp_path, Format.ESTARGZ)
    payload = conv.blob[: tf.gzip_footer_toc_offset(conv.blob)]
    prefix = b"" if shape == "zeros" else tf.raw_header(b"stargz.index.json", b"0", 4096)
    bomb = zero_gzip(1 << 30, prefix)  # 1 GiB inflated from about 1 MiB
    blob = tmp_path / "bomb.blob"
    blob.write_bytes(estargz_with_toc_member(payload, bomb))
    msg = refused(measured(*reader_args(cmd, [str(blob)], tmp_path)), "TOC")
    assert f"offset {len(payload)}" in msg, msg
    assert not (tmp_path / "out.tar").exists()


@pytest.mark.parametrize("cmd", READERS)
@pytest.mark.parametrize("stated", ["small", "huge"])
def test_zstd_bomb_in_the_toc_frame(tmp_path: Path, cmd: str, stated: str) -> None:
    conv = sample_layer(tmp_path, Format.ZSTDCHUNKED)
    payload = conv.blob[: tf.zstd_footer(conv.blob)[0] - 8]
    plain_size = 4096 if stated == "small" else 1 << 40
    blob = tmp_path / "bomb.blob"
    blob.write_bytes(zstd_with_toc(payload, zero_zstd(2 << 30), plain_size))
    msg = refused(measured(*reader_args(cmd, [str(blob)], tmp_path)), "TOC")
    assert f"offset {len(payload) + 8}" in msg, msg


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
@pytest.mark.parametrize("cmd", ["verify", "tar"])
def test_bomb_in_a_chunk(tmp_path: Path, fmt: Format, cmd: str) -> None:
    """The file's last chunk member inflates to 1 GiB: refused by its TOC size, fast."""
    conv = tf.convert(tmp_path, [tf.reg("f", tf.content("text", 3000, 2))], fmt)
    toc = tf.toc_entries(conv.toc_json)
    (f_entry,) = [e for e in toc if e["name"] == "f"]
    at = f_entry["offset"]
    args: list[str]
    blob = tmp_path / "bomb.blob"
    if fmt is Format.ZSTDCHUNKED:
        raw = conv.blob[: tf.zstd_footer(conv.blob)[0] - 8]
        bomb = zero_zstd(1 << 30)
        c = zstandard.ZstdCompressor().compress(conv.toc_json)
        blob.write_bytes(zstd_with_toc(raw[:at] + bomb, c, len(conv.toc_json)))
        args = [str(blob)]
    else:
        bomb = zero_gzip(1 << 30)
        payload = conv.blob[:at] + bomb
        if fmt is Format.EXTERNAL_TOC:
            blob.write_bytes(payload + externaltoc.footer())
            toc_file = tmp_path / "layer.toc"
            toc_file.write_bytes(conv.result.toc_blob)
            args = [str(blob), "--toc", str(toc_file)]
        else:
            toc_member = conv.blob[tf.gzip_footer_toc_offset(conv.blob) : -estargz.FOOTER_SIZE]
            blob.write_bytes(estargz_with_toc_member(payload, toc_member))
            args = [str(blob)]
    msg = refused(measured(*reader_args(cmd, args, tmp_path)), "digest", "'f'")
    assert f"offset {at}" in msg, msg


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_bomb_as_the_source_layer(tmp_path: Path, compression: str) -> None:
    """A tar header claiming 8 GiB, then 2 GiB of zeros, from a few MiB of input."""
    header = tf.raw_header(b"big", b"0", 8 << 30)
    src = tmp_path / f"src.{compression}"
    src.write_bytes(
        zero_gzip(2 << 30, header) if compression == "gz" else zero_zstd(2 << 30, header)
    )
    out = tmp_path / "out.blob"
    refused(measured("layer", "convert", src, out), "truncated")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [src.name]


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_zero_bomb_source_is_an_empty_layer(tmp_path: Path, compression: str) -> None:
    """Nothing but zeros is an empty tar (as Go reads it): converted, in bounded memory."""
    src = tmp_path / f"src.{compression}"
    src.write_bytes(zero_gzip(1 << 30) if compression == "gz" else zero_zstd(1 << 30))
    out = tmp_path / "out.blob"
    run = measured("layer", "convert", src, out)
    assert run.returncode == 0, run.stderr
    names = [e["name"] for e in tf.toc_entries(tf.extract_toc_json(out.read_bytes(), "estargz"))]
    assert names == [tf.NO_LANDMARK]


# ---------------------------------------------------------------------------------------------
# TOC JSON nested too deeply


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
@pytest.mark.parametrize("where", ["entries", "xattrs", "unknown-key"])
def test_deeply_nested_toc_json(tmp_path: Path, fmt: Format, where: str) -> None:
    conv = sample_layer(tmp_path, fmt)
    deep = b"[" * 50_000 + b"]" * 50_000
    doc = {
        "entries": b'{"version": 1, "entries": ' + deep + b"}",
        "xattrs": b'{"version": 1, "entries": [{"name": "a", "type": "dir", "xattrs": '
        + deep + b"}]}",
        "unknown-key": b'{"version": 1, "x": ' + deep + b', "entries": []}',
    }[where]
    args = with_toc_json(conv, fmt, doc, tmp_path)
    for cmd in READERS:
        refused(measured(*reader_args(cmd, args, tmp_path)), "nested deeper than")


@pytest.mark.parametrize("value", ['"\\u0080"', "[1]", "{}", '"a b"'])
def test_toc_xattr_that_is_not_base64(tmp_path: Path, value: str) -> None:
    """Found by the fuzz target: non-ASCII text in an xattr value was a ValueError traceback."""
    conv = sample_layer(tmp_path, Format.ESTARGZ)
    doc = ('{"version": 1, "entries": [{"name": "a/", "type": "dir", "xattrs": {"k": '
           + value + "}}]}").encode()
    args = with_toc_json(conv, Format.ESTARGZ, doc, tmp_path)
    refused(measured("layer", "verify", *args), "xattrs")


# ---------------------------------------------------------------------------------------------
# tar times out of range


def _with_mtime_field(field: bytes) -> bytes:
    return tf.raw_header(b"f", b"0", 0, extra={136: field})


def _base256(value: int) -> bytes:
    """GNU base-256: the 12-byte field in two's complement, its top bit set as the marker."""
    return ((value % (1 << 96)) | (1 << 95)).to_bytes(12, "big")


def _pax_record(key: str, value: str) -> bytes:
    tail = f" {key}={value}\n".encode()
    n = len(tail) + 1
    while len(str(n)) + len(tail) != n:
        n += 1
    return str(n).encode() + tail


def _pax_mtime_tar(value: str) -> bytes:
    body = _pax_record("mtime", value)
    return (
        tf.raw_header(b"PaxHeaders/f", b"x", len(body))
        + body
        + tf.pad(len(body))
        + tf.raw_header(b"f", b"0", 0)
        + bytes(1024)
    )


@pytest.mark.parametrize(
    "tar_bytes",
    [
        pytest.param(_with_mtime_field(_base256(1 << 80)) + bytes(1024), id="base256-2^80"),
        pytest.param(_pax_mtime_tar("100000000000000000000"), id="pax-1e20-digits"),
        pytest.param(_pax_mtime_tar("-100000000000000000000"), id="pax-minus-1e20-digits"),
        pytest.param(_pax_mtime_tar("1e20"), id="pax-1e20"),
        pytest.param(_pax_mtime_tar("-1e20"), id="pax-minus-1e20"),
    ],
)
def test_mtime_beyond_int64_is_refused_like_go(tmp_path: Path, tar_bytes: bytes) -> None:
    """Go's archive/tar fails on these headers ("invalid tar header": ParseInt or int64
    overflow; checked with Go's reader on these very bytes): so do we, in one line."""
    src = tmp_path / "src.tar"
    src.write_bytes(tar_bytes)
    refused(measured("layer", "convert", src, tmp_path / "out"), "mtime")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("tar_bytes", "modtime"),
    [
        pytest.param(
            _with_mtime_field(_base256(-(1 << 62))) + bytes(1024),
            "-146138510344-07-14T16:14:56Z",
            id="base256-minus-2^62",
        ),
        pytest.param(
            _with_mtime_field(_base256(253402300800)) + bytes(1024),
            "10000-01-01T00:00:00Z",
            id="year-10000",
        ),
        pytest.param(_pax_mtime_tar("253402300800.6"), "10000-01-01T00:00:01Z", id="pax-10000"),
        pytest.param(_pax_mtime_tar("-62135596801"), "0000-12-31T23:59:59Z", id="year-0"),
    ],
)
def test_mtime_outside_years_1_to_9999_is_formatted_like_go(
    tmp_path: Path, tar_bytes: bytes, modtime: str
) -> None:
    """Go's reader accepts them and Time.Format writes the year with more digits or a sign
    (the strings below are what Go printed for these very headers)."""
    src = tmp_path / "src.tar"
    src.write_bytes(tar_bytes)
    out = tmp_path / "out"
    run = measured("layer", "convert", src, out)
    assert run.returncode == 0, run.stderr
    toc = tf.toc_entries(tf.extract_toc_json(out.read_bytes(), "estargz"))
    assert [e.get("modtime") for e in toc if e["name"] == "f"] == [modtime]
    assert measured("layer", "verify", out).returncode == 0


# ---------------------------------------------------------------------------------------------
# hardlinks


def _prioritized(tmp_path: Path, paths: list[str]) -> Path:
    p = tmp_path / "files.txt"
    p.write_text("".join(f"{x}\n" for x in paths))
    return p


@pytest.mark.parametrize(
    ("entries", "loop"),
    [
        pytest.param([tf.hardlink("a", "a")], "a -> a", id="self"),
        pytest.param([tf.hardlink("a", "b"), tf.hardlink("b", "a")], "a -> b -> a", id="loop"),
        pytest.param(
            [tf.hardlink("a", "b"), tf.hardlink("b", "c"), tf.hardlink("c", "b")],
            "a -> b -> c -> b",
            id="loop-behind-a-chain",
        ),
    ],
)
def test_prioritized_hardlink_loop_is_refused(
    tmp_path: Path, entries: list[tf.Entry], loop: str
) -> None:
    src = tmp_path / "src.tar"
    src.write_bytes(tf.build_tar(entries))
    out = tmp_path / "out"
    files = _prioritized(tmp_path, ["a"])
    msg = refused(measured("layer", "convert", src, out, "--prioritized-files", files), "loop")
    assert loop in msg, msg
    assert not out.exists()


def test_prioritized_hardlink_chain_of_1500_works(tmp_path: Path) -> None:
    """l1499 -> ... -> l0 -> target: the whole chain moves to the front, target first."""
    n = 1500
    entries = [tf.reg("target", b"payload\n"), tf.hardlink("l0", "target")]
    entries += [tf.hardlink(f"l{i}", f"l{i - 1}") for i in range(1, n)]
    entries.append(tf.reg("other", b"x"))
    src = tmp_path / "src.tar"
    src.write_bytes(tf.build_tar(entries))
    out = tmp_path / "out"
    files = _prioritized(tmp_path, [f"l{n - 1}"])
    run = measured("layer", "convert", src, out, "--prioritized-files", files)
    assert run.returncode == 0, run.stderr
    names = [e["name"] for e in tf.toc_entries(tf.extract_toc_json(out.read_bytes(), "estargz"))]
    assert names[: n + 2] == ["target", *(f"l{i}" for i in range(n)), tf.LANDMARK]
    assert names[n + 2 :] == ["other"]


# ---------------------------------------------------------------------------------------------
# layer verify reads what a full pull reads


def _damage_member(blob: bytes, start: int, end: int) -> bytes:
    b = bytearray(blob)
    mid = (start + end) // 2
    b[mid] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_damaged_metadata_only_member_fails_verify(tmp_path: Path, fmt: Format) -> None:
    """The first member holds only headers (a/, a/f): no chunk points into it, yet a full
    pull reads it. verify must fail and name its offset, like layer tar."""
    conv = sample_layer(tmp_path, fmt, prioritized=["a/f"])
    starts = tf.member_starts(conv.blob, fmt)
    chunk_offsets = {e["offset"] for e in tf.toc_entries(conv.toc_json) if e.get("chunkDigest")}
    assert starts[0] == 0 and 0 not in chunk_offsets  # metadata only
    blob = tmp_path / "damaged.blob"
    blob.write_bytes(_damage_member(conv.blob, 0, starts[1]))
    args = [str(blob)]
    if fmt is Format.EXTERNAL_TOC:
        toc_file = tmp_path / "layer.toc"
        toc_file.write_bytes(conv.result.toc_blob)
        args += ["--toc", str(toc_file)]
    for cmd in ("verify", "tar"):
        msg = refused(measured(*reader_args(cmd, args, tmp_path)), "corrupt", "member")
        assert "member at offset 0" in msg, msg


def _retar_last_member(conv: tf.Converted, fmt: Format, edit: object, tmp: Path) -> list[str]:
    """Re-encode the last payload member with edit(plain) applied; TOC and offsets intact."""
    starts = tf.member_starts(conv.blob, fmt)
    last = starts[-1]
    if fmt is Format.ZSTDCHUNKED:
        end = tf.zstd_footer(conv.blob)[0] - 8
        plain = zstandard.ZstdDecompressor().decompressobj().decompress(conv.blob[last:end])
        member = zstandard.ZstdCompressor(write_checksum=True).compress(edit(plain))  # type: ignore[operator]
        c = zstandard.ZstdCompressor().compress(conv.toc_json)
        blob = zstd_with_toc(conv.blob[:last] + member, c, len(conv.toc_json))
    else:
        end = gzip_payload_end(conv.blob, fmt)
        plain = gzip.decompress(conv.blob[last:end])
        member = estargz.gzip_member(edit(plain), 6)  # type: ignore[operator]
        payload = conv.blob[:last] + member
        if fmt is Format.EXTERNAL_TOC:
            blob = payload + externaltoc.footer()
        else:
            toc_member = conv.blob[end : -estargz.FOOTER_SIZE]
            blob = estargz_with_toc_member(payload, toc_member)
    path = tmp / "edited.blob"
    path.write_bytes(blob)
    args = [str(path)]
    if fmt is Format.EXTERNAL_TOC:
        (tmp / "layer.toc").write_bytes(conv.result.toc_blob)
        args += ["--toc", str(tmp / "layer.toc")]
    return args


def _rewrite_header(plain: bytes, target: bytes, **fields: bytes) -> bytes:
    """Rewrite the header block named target: {"name": ..., "typeflag": ...}; fix the checksum."""
    at = next(i for i in range(0, len(plain), 512) if plain[i : i + 100].rstrip(b"\0") == target)
    h = bytearray(plain[at : at + 512])
    if "name" in fields:
        h[0:100] = fields["name"].ljust(100, b"\0")
    if "typeflag" in fields:
        h[156:157] = fields["typeflag"]
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return plain[:at] + bytes(h) + plain[at + 512 :]


def _drop_header(plain: bytes, name: bytes) -> bytes:
    at = next(i for i in range(0, len(plain), 512) if plain[i : i + 100].rstrip(b"\0") == name)
    return plain[:at] + plain[at + 512 :]


EDITS = {
    "renamed": (lambda p: _rewrite_header(p, b"z/", name=b"../../etc/passwd"), "is 'z/'"),
    "retyped": (lambda p: _rewrite_header(p, b"y", typeflag=b"1"), "type"),
    "deleted": (lambda p: _drop_header(p, b"y"), "'y'"),
}


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_payload_entry_that_disagrees_with_the_toc(tmp_path: Path, fmt: Format, edit: str) -> None:
    conv = sample_layer(tmp_path, fmt)
    fn, keyword = EDITS[edit]
    args = _retar_last_member(conv, fmt, fn, tmp_path)
    for cmd in ("verify", "tar"):
        refused(measured(*reader_args(cmd, args, tmp_path)), keyword)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_verify_checks_the_diff_id(tmp_path: Path, fmt: Format) -> None:
    conv = sample_layer(tmp_path, fmt)
    args = [str(conv.path)]
    if fmt is Format.EXTERNAL_TOC:
        (tmp_path / "layer.toc").write_bytes(conv.result.toc_blob)
        args += ["--toc", str(tmp_path / "layer.toc")]
    ok = measured("layer", "verify", *args, "--diff-id", conv.result.diff_id)
    assert ok.returncode == 0, ok.stderr
    assert conv.result.diff_id in ok.stdout
    wrong = "sha256:" + "0" * 64
    msg = refused(measured("layer", "verify", *args, "--diff-id", wrong), "DiffID")
    assert conv.result.diff_id in msg and wrong in msg


def test_layer_tar_checks_chunk_digests(tmp_path: Path) -> None:
    """A chunk member re-encoded with other bytes (its TOC offset kept): tar refuses it."""
    fmt = Format.EXTERNAL_TOC  # no offsets after the payload to fix up
    conv = tf.convert(tmp_path, [tf.reg("f", b"A" * 3000)], fmt)
    args = _retar_last_member(conv, fmt, lambda p: p.replace(b"A" * 100, b"B" * 100, 1),
                              tmp_path)
    out = tmp_path / "out.tar"
    msg = refused(measured("layer", "tar", args[0], out, *args[1:]), "chunk digest")
    assert "'f'" in msg
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# an early Ctrl-C


CTRL_C_DURING_IMPORT = """
import os, signal, sys
class Interrupt:  # a Ctrl-C exactly while the CLI's heavy modules load
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            os.kill(os.getpid(), {signo})
        return None
sys.meta_path.insert(0, Interrupt())
sys.argv = ["estargz-opt", "layer", "verify", "/nonexistent"]
from estargz_opt._entry import main
main()
"""


@pytest.mark.parametrize("signo", [signal.SIGINT, signal.SIGTERM], ids=["int", "term"])
@pytest.mark.parametrize("module", ["click", "estargz_opt.format.reader", "estargz_opt.pipeline"])
def test_a_signal_while_modules_load_exits_128_plus_it_quietly(module: str, signo: int) -> None:
    """The console script's path: the handler is in before the first heavy import.

    (Before Python runs any of our code, the interpreter's own handler is in force; that
    window cannot be closed from Python.)
    """
    proc = subprocess.run(
        [sys.executable, "-c", CTRL_C_DURING_IMPORT.format(module=module, signo=int(signo))],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert (proc.returncode, proc.stderr) == (128 + signo, "estargz-opt: error: interrupted\n")


def _big_window_zstd(size: int) -> bytes:
    """size zero bytes in one frame that asks its decoder for a 128 MiB window."""
    params = zstandard.ZstdCompressionParameters.from_level(
        1, window_log=27, write_content_size=False
    )
    return zstandard.ZstdCompressor(compression_params=params).compress(bytes(size))


@pytest.mark.parametrize("cmd", ["verify", "tar"])
def test_zstd_chunk_that_asks_for_a_huge_window(tmp_path: Path, cmd: str) -> None:
    """A 10 KB frame can make libzstd allocate 128 MiB per decoder: such frames are refused
    before any allocation (layer frames never need more than a 32 MiB window)."""
    conv = tf.convert(
        tmp_path, [tf.reg("f", tf.content("text", 3000, 2))], Format.ZSTDCHUNKED
    )
    (f_entry,) = [e for e in tf.toc_entries(conv.toc_json) if e["name"] == "f"]
    at = f_entry["offset"]
    raw = conv.blob[: tf.zstd_footer(conv.blob)[0] - 8]
    c = zstandard.ZstdCompressor().compress(conv.toc_json)
    blob = tmp_path / "window.blob"
    blob.write_bytes(zstd_with_toc(raw[:at] + _big_window_zstd(300 << 20), c, len(conv.toc_json)))
    run = measured(*reader_args(cmd, [str(blob)], tmp_path))
    msg = refused(run, "too much memory")
    assert f"offset {at}" in msg, msg
    assert run.rss_mib < 100, f"the decoder allocated the window: {run.rss_mib:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# JSON nested too deeply, in every document an image, archive or flag brings

DEEP = b"[" * 100_000 + b"]" * 100_000


def _deep_doc(media_type: str | None = None) -> bytes:
    head = b'{"schemaVersion": 2, ' + (
        b'"mediaType": "' + media_type.encode() + b'", ' if media_type else b"")
    return head + b'"x": ' + DEEP + b"}"


def _image(layout: Path) -> None:
    imf.write_layout(layout, "t", [imf.simple_layer({"a/": None, "a/b": b"b" * 1000})])


def _retag(layout: Path, media_type: str, data: bytes) -> None:
    digest, size = imf.put_blob(layout, data)
    imf.tag_descriptor(layout, "t", imf.descriptor(media_type, digest, size))


def _deep_manifest(layout: Path) -> None:
    _retag(layout, imf.OCI_MANIFEST, _deep_doc(imf.OCI_MANIFEST))


def _deep_index(layout: Path) -> None:
    _retag(layout, imf.OCI_INDEX, _deep_doc(imf.OCI_INDEX))


def _deep_config(layout: Path) -> None:
    manifest = imf.read_json(layout, imf.resolve_tag(layout, "t")["digest"])
    digest, size = imf.put_blob(layout, b'{"architecture": "amd64", "x": ' + DEEP + b"}")
    manifest["config"] = imf.descriptor(imf.OCI_CONFIG, digest, size)
    _retag(layout, imf.OCI_MANIFEST, json.dumps(manifest).encode())


def _deep_index_json(layout: Path) -> None:
    (layout / "index.json").write_bytes(_deep_doc(imf.OCI_INDEX))


def _tar_dir(layout: Path, out: Path) -> None:
    with tarfile.open(out, "w") as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(layout)), recursive=False)


def _replace_member(archive: Path, name: str, data: bytes) -> None:
    with tarfile.open(archive) as old:
        members = [(m, old.extractfile(m).read() if m.isfile() else None) for m in old]
    with tarfile.open(archive, "w") as new:
        for m, body in members:
            if m.name == name:
                body, m.size = data, len(data)
            new.addfile(m, io.BytesIO(body) if body is not None else None)


def _source(kind: str, tmp: Path) -> str:
    """An image whose `kind` document is nested 100,000 deep; its reference."""
    layout = tmp / "src"
    _image(layout)
    if kind in ("oci-archive-index", "docker-archive-manifest", "docker-archive-config"):
        if kind == "oci-archive-index":
            _deep_index_json(layout)
            _tar_dir(layout, tmp / "src.tar")
            return f"oci-archive:{tmp / 'src.tar'}:t"
        subprocess.run(["skopeo", "copy", "-q", f"oci:{layout}:t",
                        f"docker-archive:{tmp / 'src.tar'}:example.com/a:t"],
                       check=True, capture_output=True)
        if kind == "docker-archive-manifest":
            _replace_member(tmp / "src.tar", "manifest.json", DEEP)
        else:
            with tarfile.open(tmp / "src.tar") as tar:
                config = json.loads(tar.extractfile("manifest.json").read())[0]["Config"]
            _replace_member(tmp / "src.tar", config, b'{"x": ' + DEEP + b"}")
        return f"docker-archive:{tmp / 'src.tar'}"
    {"layout-index": _deep_index_json, "manifest": _deep_manifest, "index": _deep_index,
     "config": _deep_config}[kind](layout)
    return f"oci:{layout}:t"


QUIET = ["--log-level", "warning", "optimize"]  # the error line alone on stderr
SOURCES = ["layout-index", "manifest", "index", "config", "oci-archive-index",
           "docker-archive-manifest", "docker-archive-config"]


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("cmd", ["optimize", "verify", "inspect"])
def test_deep_json_in_a_source_is_one_line(tmp_path: Path, kind: str, cmd: str) -> None:
    ref = _source(kind, tmp_path)
    dst = tmp_path / "dst"
    args = {"optimize": [*QUIET, "--oci", "--no-optimize", "--no-cache", ref,
                         f"oci:{dst}:t"],
            "verify": ["verify", ref], "inspect": ["inspect", ref]}[cmd]
    refused(measured(*args), "nested deeper than")
    assert not dst.exists()


@pytest.mark.parametrize("kind", ["oci", "oci-archive"])
def test_deep_json_in_a_destination_is_one_line(tmp_path: Path, kind: str) -> None:
    _image(tmp_path / "src")
    dst = tmp_path / "dst"
    _image(dst)
    _deep_index_json(dst)
    ref = f"oci:{dst}:new"
    if kind == "oci-archive":
        _tar_dir(dst, tmp_path / "dst.tar")
        ref = f"oci-archive:{tmp_path / 'dst.tar'}:new"
    target = tmp_path / "dst.tar" if kind == "oci-archive" else dst / "index.json"
    before = target.read_bytes()
    refused(measured(*QUIET, "--oci", "--no-optimize", "--no-cache",
                     f"oci:{tmp_path / 'src'}:t", ref), "nested deeper than")
    assert target.read_bytes() == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_deep_json_in_a_record_flag_or_auth_file_is_one_line(tmp_path: Path) -> None:
    _image(tmp_path / "src")
    src, dst = f"oci:{tmp_path / 'src'}:t", f"oci:{tmp_path / 'dst'}:t"
    record = tmp_path / "deep.record.jsonl"
    record.write_bytes(b'{"path": "a/b", "x": ' + DEEP + b"}\n")
    refused(measured(*QUIET, "--oci", "--no-cache", "--record-in", record, src, dst),
            "nested deeper than")
    deep_flag = "[" * 30_000 + "]" * 30_000  # one argument holds at most 128 KiB
    refused(measured(*QUIET, "--oci", "--no-cache", "--args", deep_flag, src, dst),
            "nested deeper than")
    auth = tmp_path / "auth.json"
    auth.write_bytes(b'{"auths": ' + DEEP + b"}")
    refused(measured(*QUIET, "--oci", "--no-optimize", "--no-cache", "--authfile", auth,
                     src, "docker://127.0.0.1:9/a:t"), "nested deeper than")
    assert not (tmp_path / "dst").exists()
