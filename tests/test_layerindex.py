"""Which names each layer holds (the recorder's index), read from a file or as a stream.

The analyzer streams layer blobs from containerd while the workload runs; that must give
exactly the names the file-based reader (the format engine's tar parser) gives, for
plain, gzip and zstd tars and for converted eStargz and zstd:chunked blobs. Then the
recorder's rules for the top-most layer, whiteouts and opaque directories.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from tarfactory import build_tar, dir_, gzip_bytes, layer_trees, reg, zstd_bytes

from estargz_opt.errors import BadInputError
from estargz_opt.format import Format, LayerOptions, convert_layer
from estargz_opt.prioritize.layerindex import LayerNames


def _chunks(data: bytes, size: int = 4096) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _both(tmp: Path, blob: bytes) -> tuple[frozenset[str], frozenset[str]]:
    path = tmp / "blob"
    path.write_bytes(blob)
    return LayerNames.names_in(str(path)), LayerNames.names_in_stream(_chunks(blob))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=layer_trees())
def test_stream_and_file_agree(entries, tmp_path: Path) -> None:
    tar = build_tar(entries)
    for blob in (tar, gzip_bytes(tar), zstd_bytes(tar)):
        from_file, from_stream = _both(tmp_path, blob)
        assert from_stream == from_file


@pytest.mark.parametrize("fmt", [Format.ESTARGZ, Format.ZSTDCHUNKED])
def test_stream_reads_converted_layers(fmt: Format, tmp_path: Path) -> None:
    tar = build_tar([dir_("a/"), reg("a/b.txt", b"x" * 10_000), reg("c", b"y")])
    src, out = tmp_path / "in.tar", tmp_path / "out.blob"
    src.write_bytes(tar)
    convert_layer(src, out, LayerOptions(format=fmt, chunk_size=4096))
    from_file, from_stream = _both(tmp_path, out.read_bytes())
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
