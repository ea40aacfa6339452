"""Which names each layer holds (the recorder's index), read from a file or as a stream.

The analyzer streams layer blobs from containerd while the workload runs; both readers
must give exactly the names a plain walk of the whole decompressed tar gives (the
oracle: the stdlib's gzip/zstandard and tarfile on the blob in memory, not the code
under test), for plain, gzip and zstd tars and for converted eStargz and zstd:chunked
blobs. Then the recorder's rules for the top-most layer, whiteouts and opaque
directories.
"""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from support.tarfactory import build_tar, dir_, gzip_bytes, layer_trees, reg, zstd_bytes

from estargz_opt.errors import BadInputError
from estargz_opt.format import Format, LayerOptions, build_layer, convert_layer, open_tar
from estargz_opt.format.source import Spool
from estargz_opt.prioritize.layerindex import LayerNames
from estargz_opt.workload.analyzer import scan_layer

pytestmark = pytest.mark.unit


def _chunks(data: bytes, size: int = 4096) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _tar_walk(blob: bytes) -> frozenset[str]:
    """The oracle: every member name of the decompressed tar, as a layer path."""
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)  # every member: eStargz is a series of them
    elif blob[:4] == b"\x28\xb5\x2f\xfd":
        blob = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(blob), read_across_frames=True).read()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        names = {posixpath.normpath("/" + m.name).lstrip("/") for m in tar}
    return frozenset(names - {""})


def _both(tmp: Path, blob: bytes) -> tuple[frozenset[str], frozenset[str]]:
    path = tmp / "blob"
    path.write_bytes(blob)
    return LayerNames.names_in(str(path)), LayerNames.names_in_stream(_chunks(blob))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=layer_trees())
def test_stream_and_file_agree(entries, tmp_path: Path) -> None:
    tar = build_tar(entries)
    expected = _tar_walk(tar)
    for blob in (tar, gzip_bytes(tar), zstd_bytes(tar)):
        from_file, from_stream = _both(tmp_path, blob)
        assert from_file == expected
        assert from_stream == expected


@pytest.mark.parametrize("fmt", [Format.ESTARGZ, Format.ZSTDCHUNKED])
def test_stream_reads_converted_layers(fmt: Format, tmp_path: Path) -> None:
    tar = build_tar([dir_("a/"), reg("a/b.txt", b"x" * 10_000), reg("c", b"y")])
    src, out = tmp_path / "in.tar", tmp_path / "out.blob"
    src.write_bytes(tar)
    convert_layer(src, out, LayerOptions(format=fmt, chunk_size=4096))
    from_file, from_stream = _both(tmp_path, out.read_bytes())
    assert from_file == _tar_walk(out.read_bytes())
    assert from_stream == from_file
    assert {"a", "a/b.txt", "c"} <= from_stream


def test_stream_refuses_garbage() -> None:
    with pytest.raises(BadInputError, match="file names"):
        LayerNames.names_in_stream(_chunks(b"\x1f\x8b" + b"\x00" * 600))


# --- the spool: the scan's tar bytes kept for the conversion ---------------------------------

def _layer_bytes(tmp: Path, src: Path | bytes, opts: LayerOptions) -> bytes:
    out = tmp / "converted"
    with open(out, "wb") as f:
        if isinstance(src, Path):
            with open_tar(src) as tar:
                build_layer(tar, f, opts)
        else:
            build_layer(src, f, opts)
    return out.read_bytes()


@pytest.mark.parametrize("compress", [gzip_bytes, zstd_bytes, lambda tar: tar])
def test_spool_keeps_the_whole_tar_and_converts_the_same(compress, tmp_path: Path) -> None:
    """The scan stops at the tar's end marker; the spool still holds every byte after it
    (the record padding), and converting from it gives the bytes converting the blob gives."""
    tar = build_tar([dir_("a/"), reg("a/b.txt", b"x" * 10_000), reg("c", b"y" * 3000)],
                    record_pad=True)
    blob = compress(tar)
    spool = Spool(str(tmp_path))
    names = scan_layer(_chunks(blob, 1000), "sha256:l", spool)
    assert names == _tar_walk(blob)
    spooled = spool.take("sha256:l")
    assert spooled is not None and spool.take("sha256:l") is None
    with spooled.f:
        spooled.f.seek(0)
        assert spooled.size == len(tar) and spooled.f.read() == tar
        (tmp_path / "blob").write_bytes(blob)
        opts = LayerOptions(prioritized=["c"], chunk_size=4096)
        assert _layer_bytes(tmp_path, spooled, opts) == _layer_bytes(tmp_path, tmp_path / "blob",
                                                                    opts)
    assert list(tmp_path.glob("estargz-opt-*")) == []  # anonymous files only


def test_spool_keeps_nothing_it_did_not_read_to_the_end(tmp_path: Path) -> None:
    blob = gzip_bytes(build_tar([reg("f", os.urandom(200_000))]))
    spool = Spool(str(tmp_path))
    pieces = spool.tee("sha256:part", _chunks(blob, 1000), "layer")
    next(pieces)
    pieces.close()  # a reader that stops early
    with pytest.raises(BadInputError, match="truncated gzip"):
        scan_layer(_chunks(blob[: len(blob) // 2], 1000), "sha256:cut", spool)
    assert "sha256:part" not in spool and spool.take("sha256:cut") is None
    scan_layer(_chunks(blob, 1000), "sha256:whole", spool)
    assert "sha256:whole" in spool
    spool.close()
    assert "sha256:whole" not in spool


def test_top_layer_whiteouts_and_opaque_dirs() -> None:
    names = LayerNames([
        frozenset({"etc", "etc/a", "etc/b", "data", "data/x", "data/y"}),
        frozenset({"etc", "etc/a", "etc/.wh.b", "data", "data/.wh..wh..opq", "data/z"}),
        frozenset({"etc", "etc/c"}),
    ])
    assert names.top_layer("/etc/a") == 1  # replaced in layer 1
    assert names.top_layer("etc/b") is None  # deleted by a whiteout
    assert names.top_layer("data/x") is None  # hidden by an opaque directory
    assert names.top_layer("data/z") == 1
    assert names.top_layer("etc/c") == 2
    assert names.top_layer("missing") is None
    assert names.top_layer("") is None
    assert "etc/.wh.b" not in names.all_names()
