"""A registry in this process, behind httpx.MockTransport, for unit tests of the client.

`FakeRegistry` speaks enough of the distribution API for the client's logic: manifests,
blobs (HEAD, GET), upload sessions (POST, streamed or chunked PATCH with Content-Range,
PUT ?digest= that checks the digest), cross-repository mounts, and the bearer-token flow
with tokens it can revoke. A test scripts faults with `fail_next` (answer the next
matching requests with a given status and headers) and reads `log` (every request, with
its Authorization and its body as received). The end-to-end tests against Debian's
docker-registry check the same client against a real server; these pin each rule
(retry, Retry-After, 413, token refresh, a stream sent again) in milliseconds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from estargz_opt.stores.registry.auth import RegistryAuth
from estargz_opt.stores.registry.client import Client, RetryPolicy
from estargz_opt.stores.registry.credentials import Credential
from estargz_opt.stores.registry.limits import Limit, Limits
from estargz_opt.stores.registry.options import RegistryOptions
from estargz_opt.stores.registry.session import Session
from estargz_opt.stores.registry.tls import tls_config

HOST = "registry.test"
REALM = "https://auth.test/token"
REPO = "team/app"
#: no waiting in unit tests, and few tries, unless a test says otherwise
FAST = RetryPolicy(tries=4, first_delay=0.5, factor=2.0, max_delay=10.0, total=60.0)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Seen:
    """One request as the registry received it."""

    method: str
    path: str
    query: str
    authorization: str
    content_range: str
    body: bytes


@dataclass
class Fault:
    """Answer the next `times` requests that `match` with `status` (and `headers`)."""

    match: Callable[[httpx.Request], bool]
    status: int
    headers: dict[str, str]
    times: int


@dataclass
class FakeRegistry:
    host: str = HOST
    #: None: anonymous; "bearer": every /v2/ request needs a token from REALM
    auth: str | None = None
    #: seconds a token lives (the token server's expires_in)
    token_lifetime: int = 300
    #: PATCH bodies over this size are refused with 413 (None: any size)
    max_patch: int | None = None
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    log: list[Seen] = field(default_factory=list)
    tokens_issued: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    faults: list[Fault] = field(default_factory=list)
    _uploads: dict[str, bytearray] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    # ------------------------------------------------------------ scripting

    def fail_next(self, method: str, path_pattern: str, status: int, times: int = 1,
                  **headers: str) -> None:
        """The next `times` METHOD requests whose path matches answer `status`."""
        pattern = re.compile(path_pattern)
        self.faults.append(Fault(
            lambda r: r.method == method and bool(pattern.search(r.url.path)), status,
            {k.replace("_", "-"): v for k, v in headers.items()}, times))

    def seen(self, method: str, path_pattern: str = "") -> list[Seen]:
        return [s for s in self.log if s.method == method and re.search(path_pattern, s.path)]

    # ------------------------------------------------------------ the server

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.log.append(Seen(request.method, request.url.path, request.url.query.decode(),
                             request.headers.get("Authorization", ""),
                             request.headers.get("Content-Range", ""), body))
        for fault in self.faults:
            if fault.times > 0 and fault.match(request):
                fault.times -= 1
                return httpx.Response(fault.status, headers=fault.headers)
        if request.url.host == "auth.test":
            return self._token(request)
        if self.auth == "bearer" and not self._authorized(request):
            return httpx.Response(401, headers={
                "WWW-Authenticate": f'Bearer realm="{REALM}",service="{self.host}"'},
                json={"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]})
        path = request.url.path
        if path == "/v2/":
            return httpx.Response(200, json={})
        if path.endswith("/tags/list"):
            return httpx.Response(200, json={"tags": sorted(
                ref for ref in self.manifests if not ref.startswith("sha256:"))})
        m = re.fullmatch(r"/v2/(.+?)/(manifests|blobs/uploads|blobs)/(.*)", path)
        if m is None:
            return httpx.Response(404)
        kind, rest = m[2], m[3]
        if kind == "manifests":
            return self._manifest(request, rest)
        if kind == "blobs":
            data = self.blobs.get(rest)
            if data is None:
                return _error(404, "BLOB_UNKNOWN")
            # An iterator, not bytes: httpx reads a bytes body at once, and the client
            # streams blobs raw, as from a socket.
            return httpx.Response(200, content=iter([b"" if request.method == "HEAD" else data]),
                                  headers={"Content-Length": str(len(data))})
        return self._upload(request, rest, body)

    def _authorized(self, request: httpx.Request) -> bool:
        sent = request.headers.get("Authorization", "")
        token = sent.removeprefix("Bearer ")
        return sent.startswith("Bearer ") and token in self.tokens_issued and \
            token not in self.revoked

    def _token(self, request: httpx.Request) -> httpx.Response:
        token = f"token-{len(self.tokens_issued) + 1}"
        self.tokens_issued.append(token)
        return httpx.Response(200, json={"token": token, "expires_in": self.token_lifetime})

    def _manifest(self, request: httpx.Request, ref: str) -> httpx.Response:
        if request.method == "PUT":
            data = request.read()
            media_type = request.headers["Content-Type"]
            self.manifests[ref] = self.manifests[sha256(data)] = (media_type, data)
            return httpx.Response(201)
        found = self.manifests.get(ref)
        if found is None:
            return _error(404, "MANIFEST_UNKNOWN")
        media_type, data = found
        return httpx.Response(200, content=b"" if request.method == "HEAD" else data,
                              headers={"Content-Type": media_type,
                                       "Content-Length": str(len(data))})

    def _upload(self, request: httpx.Request, upload_id: str, body: bytes) -> httpx.Response:
        repo = request.url.path.split("/blobs/uploads/")[0].removeprefix("/v2/")
        if request.method == "POST":
            mount = request.url.params.get("mount")
            if mount is not None and mount in self.blobs:
                return httpx.Response(201, headers={"Location": f"/v2/{repo}/blobs/{mount}"})
            new = str(next(self._ids))
            self._uploads[new] = bytearray()
            return httpx.Response(202, headers={"Location": f"/v2/{repo}/blobs/uploads/{new}",
                                                "Range": "0-0"})
        held = self._uploads.get(upload_id)
        if held is None:
            return _error(404, "BLOB_UPLOAD_UNKNOWN")
        if request.method == "DELETE":
            del self._uploads[upload_id]
            return httpx.Response(204)
        if request.method == "PATCH":
            if self.max_patch is not None and len(body) > self.max_patch:
                return httpx.Response(413)
            crange = request.headers.get("Content-Range")
            if crange is not None and int(crange.split("-")[0]) != len(held):
                return httpx.Response(416)
            held += body
            return httpx.Response(202, headers={
                "Location": f"/v2/{repo}/blobs/uploads/{upload_id}",
                "Range": f"0-{len(held) - 1}"})
        if request.method == "PUT":
            held += body
            digest = request.url.params.get("digest", "")
            if sha256(bytes(held)) != digest:
                return _error(400, "DIGEST_INVALID")
            self.blobs[digest] = bytes(held)
            del self._uploads[upload_id]
            return httpx.Response(201, headers={"Location": f"/v2/{repo}/blobs/{digest}"})
        return httpx.Response(405)


def _error(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(
        {"errors": [{"code": code, "message": code.lower().replace("_", " ")}]}).encode())


@contextmanager
def client_for(registry: FakeRegistry, retry: RetryPolicy = FAST,
               credential: Credential | None = None) -> Iterator[Client]:
    """Our client for REPO on `registry`, as `open_session` would build it (the auth flow
    learns the challenge from the first GET /v2/), over MockTransport (so the time and
    size bounds, which live in the real transport, do not apply here)."""
    auth = RegistryAuth(registry.host, lambda _repo: credential)
    http = httpx.Client(transport=httpx.MockTransport(registry.handle), auth=auth)
    opts = RegistryOptions()
    with http:
        http.get(f"https://{registry.host}/v2/").close()
        session = Session(registry.host, f"https://{registry.host}", http, auth,
                          tls_config(registry.host, opts), Limits(),
                          Limit(opts.timeout, opts.min_rate))
        yield Client(session, REPO, retry)
