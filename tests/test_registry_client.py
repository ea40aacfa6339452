"""The registry client's rules, in process (httpx.MockTransport): what is retried and how
long it waits, the 413 fall-back to chunks, token refresh, and a broken stream sent
again from its file. test_registry.py checks the same client against docker-registry.
"""

from __future__ import annotations

import io
import time
from email.utils import formatdate
from pathlib import Path

import httpx
import pytest
from support.fakeregistry import REPO, FakeRegistry, client_for, sha256

from estargz_opt.descriptor import OCI_MANIFEST, Descriptor
from estargz_opt.errors import BadInputError, RegistryAccessError
from estargz_opt.stores.registry import client as client_module
from estargz_opt.stores.registry.client import MIN_CHUNK, RegistryError, RetryPolicy

pytestmark = pytest.mark.unit

MANIFEST = b'{"schemaVersion":2,"mediaType":"%s","config":{},"layers":[]}' % OCI_MANIFEST.encode()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The client's waits, recorded instead of slept."""
    waited: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", waited.append)
    return waited


@pytest.fixture
def registry() -> FakeRegistry:
    reg = FakeRegistry()
    reg.manifests["v1"] = (OCI_MANIFEST, MANIFEST)
    return reg


def blob_file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = bytes((i * 7 + i // 251) % 256 for i in range(size))
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


# --- retries ---------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_status_is_retried_with_backoff(status: int, registry: FakeRegistry,
                                                 sleeps: list[float]) -> None:
    registry.fail_next("GET", "/manifests/v1", status, times=2)
    with client_for(registry) as c:
        desc, data = c.get_manifest("v1", "resolving v1")
    assert data == MANIFEST and desc.digest == sha256(MANIFEST)
    assert len(registry.seen("GET", "/manifests/v1")) == 3
    assert sleeps == [0.5, 1.0]  # first_delay, then doubled


@pytest.mark.parametrize("status", [400, 403, 404, 405])
def test_other_status_is_not_retried(status: int, registry: FakeRegistry,
                                     sleeps: list[float]) -> None:
    registry.fail_next("PUT", "/manifests/", status, times=5)
    with client_for(registry) as c, pytest.raises(RegistryError) as err:
        c.put_manifest("v2", OCI_MANIFEST, MANIFEST)
    assert len(registry.seen("PUT", "/manifests/")) == 1 and sleeps == []
    assert str(err.value).startswith(f"registry {registry.host}, repository {REPO}: ")
    assert "\n" not in str(err.value)


def test_retries_end_after_the_policy_tries_in_one_line(registry: FakeRegistry,
                                                        sleeps: list[float]) -> None:
    registry.fail_next("GET", "/manifests/v1", 503, times=99)
    with client_for(registry, RetryPolicy(tries=3, first_delay=1, factor=3, max_delay=2)) as c, \
            pytest.raises(RegistryError) as err:
        c.get_manifest("v1", "resolving v1")
    assert len(registry.seen("GET", "/manifests/v1")) == 3
    assert sleeps == [1, 2]  # 1, then 3 capped at max_delay
    assert str(err.value) == (f"registry {registry.host}, repository {REPO}: resolving v1 "
                              "failed: 503 Service Unavailable (after 3 tries)")


def test_retry_after_seconds_is_waited(registry: FakeRegistry, sleeps: list[float]) -> None:
    registry.fail_next("GET", "/manifests/v1", 429, Retry_After="7")
    with client_for(registry) as c:
        c.get_manifest("v1", "resolving v1")
    assert sleeps == [7.0]


def test_retry_after_http_date_is_waited(registry: FakeRegistry, sleeps: list[float]) -> None:
    registry.fail_next("GET", "/manifests/v1", 503, Retry_After=formatdate(time.time() + 30,
                                                                             usegmt=True))
    with client_for(registry) as c:
        c.get_manifest("v1", "resolving v1")
    [waited] = sleeps
    assert 25 < waited <= 30


def test_retry_after_beyond_the_total_fails_at_once(registry: FakeRegistry,
                                                   sleeps: list[float]) -> None:
    """A wait that would end past the policy's total is not started."""
    registry.fail_next("GET", "/manifests/v1", 429, Retry_After="3600")
    with client_for(registry) as c, pytest.raises(RegistryError, match=r"429 Too Many"):
        c.get_manifest("v1", "resolving v1")
    assert sleeps == [] and len(registry.seen("GET", "/manifests/v1")) == 1


def test_connection_errors_are_retried(registry: FakeRegistry, sleeps: list[float]) -> None:
    broken = iter([True, True])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/manifests/v1") and next(broken, False):
            raise httpx.ReadError("connection reset by peer")
        return registry.handle(request)

    with client_for(registry) as c:
        c.session.client._transport = httpx.MockTransport(handler)
        desc, _ = c.get_manifest("v1", "resolving v1")
    assert desc.digest == sha256(MANIFEST) and sleeps == [0.5, 1.0]


def test_unknown_tag_and_unknown_repository_are_told_apart(registry: FakeRegistry) -> None:
    with client_for(registry) as c, pytest.raises(RegistryError) as err:
        c.get_manifest("nope", "resolving nope")
    assert str(err.value).endswith("resolving nope: not found")
    registry.fail_next("GET", "/tags/list", 404)
    with client_for(registry) as c, pytest.raises(RegistryError) as err:
        c.get_manifest("nope", "resolving nope")
    assert str(err.value).endswith("resolving nope: repository not found")


# --- uploads ---------------------------------------------------------------------------------

def test_whole_upload_is_one_patch(registry: FakeRegistry, tmp_path: Path) -> None:
    path, data = blob_file(tmp_path, 300_000)
    with client_for(registry) as c:
        c.upload(path, sha256(data), len(data), lambda _up: None)
    assert registry.blobs[sha256(data)] == data
    [patch] = registry.seen("PATCH")
    assert patch.content_range == "" and patch.body == data


def test_413_on_a_whole_upload_falls_back_to_smaller_chunks(registry: FakeRegistry,
                                                            tmp_path: Path) -> None:
    """Refused whole: the session is cancelled, a new one gets chunks with Content-Range,
    halved on each 413 until the registry takes them."""
    path, data = blob_file(tmp_path, 300_000)
    registry.max_patch = 100_000
    with client_for(registry) as c:
        c.upload(path, sha256(data), len(data), lambda _up: None)
    assert registry.blobs[sha256(data)] == data
    assert len(registry.seen("DELETE", "/blobs/uploads/")) == 1  # the refused session
    ranges = [p.content_range for p in registry.seen("PATCH")]
    # whole (413); 300000 (413); 150000 (413); then 75000 four times
    assert ranges == ["", "0-299999", "0-149999", "0-74999", "75000-149999",
                      "150000-224999", "225000-299999"]


def test_413_below_the_smallest_chunk_is_one_line(registry: FakeRegistry,
                                                  tmp_path: Path) -> None:
    path, data = blob_file(tmp_path, 3 * MIN_CHUNK)
    registry.max_patch = MIN_CHUNK // 2
    with client_for(registry) as c, pytest.raises(RegistryError) as err:
        c.upload(path, sha256(data), len(data), lambda _up: None)
    assert "the registry refuses chunks of" in str(err.value) and "(413)" in str(err.value)
    assert sha256(data) not in registry.blobs


def test_chunk_min_length_is_honoured(registry: FakeRegistry, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """OCI-Chunk-Min-Length: chunked from the start, no chunk smaller than asked (the
    last aside)."""
    path, data = blob_file(tmp_path, 250_000)
    monkeypatch.setattr(client_module, "CHUNK", 10_000)
    real = registry.handle

    def handler(request: httpx.Request) -> httpx.Response:
        resp = real(request)
        if request.method == "POST" and resp.status_code == 202:
            resp.headers["OCI-Chunk-Min-Length"] = "100000"
        return resp

    with client_for(registry) as c:
        c.session.client._transport = httpx.MockTransport(handler)
        c.upload(path, sha256(data), len(data), lambda _up: None)
    assert registry.blobs[sha256(data)] == data
    assert [p.content_range for p in registry.seen("PATCH")] == [
        "0-99999", "100000-199999", "200000-249999"]


def test_a_failed_upload_starts_again_with_a_new_session(registry: FakeRegistry,
                                                         tmp_path: Path,
                                                         sleeps: list[float]) -> None:
    path, data = blob_file(tmp_path, 50_000)
    registry.fail_next("PATCH", "/blobs/uploads/", 502)
    with client_for(registry) as c:
        c.upload(path, sha256(data), len(data), lambda _up: None)
    assert registry.blobs[sha256(data)] == data
    assert len(registry.seen("POST", "/blobs/uploads/")) == 2 and sleeps == [0.5]


def test_a_commit_whose_answer_was_lost_is_not_uploaded_again(registry: FakeRegistry,
                                                              tmp_path: Path,
                                                              sleeps: list[float]) -> None:
    """The PUT landed but its answer did not arrive: the retry asks (HEAD) and stops."""
    path, data = blob_file(tmp_path, 50_000)
    real = registry.handle
    lost = iter([True])

    def handler(request: httpx.Request) -> httpx.Response:
        resp = real(request)
        if request.method == "PUT" and next(lost, False):
            raise httpx.ReadError("connection reset after the commit")
        return resp

    with client_for(registry) as c:
        c.session.client._transport = httpx.MockTransport(handler)
        c.upload(path, sha256(data), len(data), lambda _up: None)
    assert registry.blobs[sha256(data)] == data
    assert len(registry.seen("PATCH")) == 1 and len(registry.seen("HEAD", "/blobs/")) == 1


# --- streams ---------------------------------------------------------------------------------

def test_a_refused_stream_is_sent_again_from_the_file(registry: FakeRegistry,
                                                      tmp_path: Path,
                                                      sleeps: list[float]) -> None:
    """A streamed PATCH is never replayed: its failure is returned, and the blob goes
    again from the file it was spooled to."""
    path, data = blob_file(tmp_path, 200_000)
    registry.fail_next("PATCH", "/blobs/uploads/", 500)
    pieces = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    with client_for(registry) as c:
        up = c.start_upload()
        why = c.stream_patch(up, iter(pieces))
        assert why == "500 Internal Server Error"
        assert sleeps == [] and sha256(data) not in registry.blobs
        c.cancel(up)
        c.upload(path, sha256(data), len(data), lambda _up: None)
    assert registry.blobs[sha256(data)] == data
    streamed, again = registry.seen("PATCH")
    assert streamed.body == data and again.body == data


def test_a_stream_refused_whole_is_marked_for_chunks(registry: FakeRegistry,
                                                     tmp_path: Path) -> None:
    path, data = blob_file(tmp_path, 200_000)
    registry.max_patch = 100_000
    with client_for(registry) as c:
        up = c.start_upload()
        assert c.stream_patch(up, iter([data])) == "refused whole (413)"
        assert up.whole_refused
        c.cancel(up)
        c.upload(path, sha256(data), len(data), lambda _up: None, chunked=True)
    assert registry.blobs[sha256(data)] == data


def test_a_stream_whose_digest_the_registry_rejects_is_reported(registry: FakeRegistry) -> None:
    with client_for(registry) as c:
        up = c.start_upload()
        assert c.stream_patch(up, iter([b"what was sent"])) is None
        why = c.finish_stream(up, sha256(b"something else"))
    assert why is not None and "400" in why and "digest invalid" in why


# --- downloads -------------------------------------------------------------------------------

def test_a_download_that_does_not_match_is_fetched_twice_then_named(
        registry: FakeRegistry) -> None:
    good = b"layer bytes" * 100
    desc = Descriptor("application/octet-stream", sha256(good), len(good))
    registry.blobs[desc.digest] = b"x" * len(good)  # corrupt on the registry
    with client_for(registry) as c, pytest.raises(BadInputError) as err:
        c.download(desc, "layer 1", io.BytesIO())
    assert len(registry.seen("GET", "/blobs/")) == 2
    assert f"blob {desc.digest} (layer 1) does not match its digest or size" in str(err.value)


# --- tokens ----------------------------------------------------------------------------------

def test_a_revoked_token_is_fetched_again_and_the_request_replayed() -> None:
    registry = FakeRegistry(auth="bearer")
    registry.manifests["v1"] = (OCI_MANIFEST, MANIFEST)
    with client_for(registry) as c:
        c.get_manifest("v1", "resolving v1")
        assert registry.tokens_issued == ["token-1"]
        registry.revoked.add("token-1")
        c.get_manifest("v1", "resolving v1")
    assert registry.tokens_issued == ["token-1", "token-2"]
    gets = registry.seen("GET", "/manifests/v1")
    assert [g.authorization for g in gets] == ["Bearer token-1", "Bearer token-1",
                                               "Bearer token-2"]


def test_a_token_about_to_lapse_is_fetched_before_the_request(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No 401 round trip (a streamed body could not be replayed after one): a token
    within its expiry margin is replaced before it is sent."""
    from estargz_opt.stores.registry import auth

    now = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    registry = FakeRegistry(auth="bearer", token_lifetime=40)
    registry.manifests["v1"] = (OCI_MANIFEST, MANIFEST)
    with client_for(registry) as c:
        c.get_manifest("v1", "resolving v1")
        now[0] += 25  # 40 s lifetime, 10 s margin: still fresh
        c.get_manifest("v1", "resolving v1")
        now[0] += 6  # 31 s after: within the margin
        c.get_manifest("v1", "resolving v1")
    assert registry.tokens_issued == ["token-1", "token-2"]
    assert [g.authorization for g in registry.seen("GET", "/manifests/v1")] == [
        "Bearer token-1", "Bearer token-1", "Bearer token-2"]


def test_a_refused_token_request_is_one_line_naming_the_source() -> None:
    registry = FakeRegistry(auth="bearer")
    registry.fail_next("GET", "^/token$", 401, times=9)
    with client_for(registry) as c, pytest.raises(RegistryAccessError) as err:
        c.get_manifest("v1", "resolving v1")
    assert str(err.value) == (
        f"registry {registry.host}: unauthorized for repository {REPO} (the token server "
        "auth.test refused the login): no credentials were found (pass --src-creds/"
        "--dest-creds or --authfile, or log in with podman/skopeo/docker login)")

