"""Reading a registry's body whole (`limits.read_whole`): decoded under the cap in
every encoding we accept, refused in any other. In-process and fast; the same caps
against a live hostile server are in test_registry_hostile.py."""

from __future__ import annotations

import zlib

import httpx
import pytest

from estargz_opt.stores.registry.limits import ENCODING, BodyError, read_whole

pytestmark = pytest.mark.unit


def _encoded(data: bytes, wbits: int) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return z.compress(data) + z.flush()


def _response(body: bytes, encoding: str) -> httpx.Response:
    """An answer as our transport hands it over: body as sent, encoding aside."""
    return httpx.Response(200, content=body, extensions={ENCODING: encoding})


@pytest.mark.parametrize("encoding,wbits", [("gzip", 16 + zlib.MAX_WBITS),
                                            ("x-gzip", 16 + zlib.MAX_WBITS),
                                            ("deflate", zlib.MAX_WBITS)])
def test_an_encoded_body_is_decoded_up_to_the_cap_and_no_further(encoding: str,
                                                                 wbits: int) -> None:
    data = b'{"schemaVersion": 2}' * 50
    body = _encoded(data, wbits)
    assert read_whole(_response(body, encoding), len(data)) == data
    with pytest.raises(BodyError, match=f"larger than {len(data) - 1} bytes once decoded"):
        read_whole(_response(body, encoding), len(data) - 1)


def test_the_cap_holds_before_decoding_too() -> None:
    with pytest.raises(BodyError, match="larger than 10 bytes"):
        read_whole(_response(b"x" * 11, ""), 10)
    assert read_whole(_response(b"x" * 10, "identity"), 10) == b"x" * 10


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, gzip", "compress"])
def test_any_other_encoding_is_refused(encoding: str) -> None:
    with pytest.raises(BodyError, match="a Content-Encoding we cannot read"):
        read_whole(_response(b"{}", encoding), 100)


def test_a_cut_short_or_garbled_gzip_body_is_refused() -> None:
    body = _encoded(b"abc" * 100, 16 + zlib.MAX_WBITS)
    with pytest.raises(BodyError, match="gzip stream is cut short"):
        read_whole(_response(body[:20], "gzip"), 1000)
    with pytest.raises(BodyError, match="is not valid gzip"):
        read_whole(_response(b"not gzip at all", "gzip"), 1000)
