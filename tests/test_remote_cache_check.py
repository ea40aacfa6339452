"""The content check of a remote cache entry (cache/remote.py), in process: a blob is
accepted only as the conversion of this very source layer with these prioritized files."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from support.imagefactory import simple_layer

from estargz_opt.cache.remote import mismatch
from estargz_opt.errors import OptionsError
from estargz_opt.format import Format, LayerOptions, LayerResult, build_layer
from estargz_opt.format.source import open_tar
from estargz_opt.request import OptimizeRequest

pytestmark = pytest.mark.unit


def _convert(tmp: Path, name: str, layer: bytes, opts: LayerOptions) -> tuple[Path, Path,
                                                                             LayerResult]:
    src, out = tmp / f"{name}.tar", tmp / f"{name}.blob"
    src.write_bytes(layer)
    with open_tar(src) as tar, open(out, "wb") as f:
        result = build_layer(tar, f, opts)
    return src, out, result


FILES = {"a/": None, "a/one": b"1" * 5000, "a/two": os.urandom(9000), "b/": None,
         "b/three": b"3"}


def test_the_genuine_conversion_passes(tmp_path: Path) -> None:
    for fmt in (Format.ESTARGZ, Format.ZSTDCHUNKED):
        opts = LayerOptions(format=fmt, prioritized=["b/three", "a/one"])
        src, blob, result = _convert(tmp_path, fmt.value, simple_layer(FILES), opts)
        with open_tar(src) as tar:
            assert mismatch(result, blob, tar, ["b/three", "a/one"]) is None


def test_other_order_other_owner_other_content_and_a_damaged_blob_fail(tmp_path: Path) -> None:
    opts = LayerOptions(prioritized=["b/three", "a/one"])
    src, blob, result = _convert(tmp_path, "x", simple_layer(FILES), opts)
    with open_tar(src) as tar:
        why = mismatch(result, blob, tar, ["a/one", "b/three"])
    assert why == "its prioritized files are not in the requested order"
    # Same names, one byte of content changed: the content digests differ.
    other = dict(FILES, **{"a/one": b"2" + b"1" * 4999})
    src2 = tmp_path / "other.tar"
    src2.write_bytes(simple_layer(other))
    with open_tar(src2) as tar:
        assert "entries differ" in str(mismatch(result, blob, tar, ["b/three", "a/one"]))
    # Same content, another owner.
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(simple_layer(FILES))) as t_in, \
            tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t_out:
        for m in t_in.getmembers():
            m.uid = 1000 if m.name == "a/two" else m.uid
            t_out.addfile(m, t_in.extractfile(m) if m.isfile() else None)
    src3 = tmp_path / "owner.tar"
    src3.write_bytes(buf.getvalue())
    with open_tar(src3) as tar:
        assert "entries differ" in str(mismatch(result, blob, tar, ["b/three", "a/one"]))
    # A flipped byte in the blob: it no longer verifies.
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    with open_tar(src) as tar:
        assert "does not verify" in str(mismatch(result, blob, tar, ["b/three", "a/one"]))


@pytest.mark.parametrize("ref", ["oci:/tmp/cache", "docker://r.example/c@sha256:" + "0" * 64])
def test_cache_ref_must_name_a_registry_repository(ref: str) -> None:
    with pytest.raises(OptionsError, match="cache_ref"):
        OptimizeRequest.from_options("oci:/tmp/in:v1", "oci:/tmp/out:v1", no_optimize=True,
                                     cache_ref=ref)
