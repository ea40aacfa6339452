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
import posixpath
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from tarfactory import build_tar, dir_, gzip_bytes, layer_trees, reg, zstd_bytes

from estargz_opt.errors import BadInputError
from estargz_opt.format import Format, LayerOptions, convert_layer
from estargz_opt.prioritize.layerindex import LayerNames


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
