"""A loopback HTTP server that plays a registry which lies or stalls.

By default it forwards every request to a real registry (docker-registry, plain HTTP)
and hands back its answer, so a run can succeed through it; a test puts *routes* in
front for the requests it wants answered otherwise (a redirect, a stall, an endless or
bombed body, a bad header). It can also demand basic or token auth before anything,
as the registry a user names would, and records every request it got, raw, so that a
test can prove no secret reached it.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

Auth = Literal["basic", "token"] | None


@dataclass(frozen=True)
class Seen:
    """One request as it arrived."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    #: time.monotonic() when it arrived
    at: float = field(default_factory=time.monotonic)

    @property
    def raw(self) -> bytes:
        """Everything the client sent, to search for a secret in any form."""
        head = f"{self.method} {self.path}\n" + "".join(
            f"{k}: {v}\n" for k, v in self.headers.items())
        return head.encode("latin-1", "replace") + self.body


class Exchange:
    """The request being answered, and ways to answer it."""

    def __init__(self, handler: _Handler, body: bytes) -> None:
        self.h = handler
        self.server: HostileServer = handler.server.owner  # type: ignore[attr-defined]
        self.method = handler.command
        self.path = handler.path
        self.body = body

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
              ) -> None:
        self.h.send_response(status)
        for k, v in (headers or {}).items():
            self.h.send_header(k, v)
        if not any(k.lower() == "content-length" for k in headers or {}):
            self.h.send_header("Content-Length", str(len(body)))
        self.h.end_headers()
        if self.method != "HEAD":
            self.h.wfile.write(body)

    def raw(self, data: bytes) -> None:
        self.h.wfile.write(data)
        self.h.wfile.flush()

    def stopped(self) -> bool:
        return self.server.stopping.is_set()


Handler = Callable[[Exchange], None]


# ----------------------------------------------------------------------- behaviours


def redirect(to: str | Callable[[Exchange], str], status: int = 307) -> Handler:
    """Redirect to `to` (a URL, or made from the request: `to(ex)`)."""
    def handle(ex: Exchange) -> None:
        ex.reply(status, headers={"Location": to if isinstance(to, str) else to(ex)})
    return handle


def answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Handler:
    return lambda ex: ex.reply(status, body, headers)


def challenge(realm_of: Callable[[Exchange], str]) -> Handler:
    """A 401 with a bearer challenge of this server's own (its token realm)."""
    return answer_with(lambda ex: (401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {
        "WWW-Authenticate": f'Bearer realm="{realm_of(ex)}",service="cdn"',
        "Content-Type": "application/json"}))


def answer_with(make: Callable[[Exchange], tuple[int, bytes, dict[str, str]]]) -> Handler:
    def handle(ex: Exchange) -> None:
        ex.reply(*make(ex))
    return handle


def trickle_headers(every: float = 0.5) -> Handler:
    """A status line, then one byte of header every `every` seconds, for ever."""
    def handle(ex: Exchange) -> None:
        ex.raw(b"HTTP/1.1 200 OK\r\n")
        while not ex.stopped():
            ex.raw(b"X")
            time.sleep(every)
    return handle


def trickle_body(size: int = 1 << 20, every: float = 0.5,
                 headers: dict[str, str] | None = None) -> Handler:
    """Headers at once (a `size`-byte body announced), then one byte every `every` s."""
    def handle(ex: Exchange) -> None:
        head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        ex.raw(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n{head}\r\n".encode())
        while not ex.stopped():
            ex.raw(b"{")
            time.sleep(every)
    return handle


def endless(status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    """A chunked body that never ends (as fast as the client reads it)."""
    def handle(ex: Exchange) -> None:
        head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        ex.raw(f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n{head}\r\n".encode())
        piece = b" " * 65536
        chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
        while not ex.stopped():
            ex.raw(chunk)
    return handle


@functools.cache
def gzip_bomb(inflated: int) -> bytes:
    """A gzip stream of `inflated` zero bytes (about a thousandth of it in size)."""
    z = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 9, zlib.Z_RLE)
    block = bytes(1 << 20)
    return b"".join([*(z.compress(block) for _ in range(inflated >> 20)), z.flush()])


# ----------------------------------------------------------------------- the server


@dataclass
class Route:
    method: str
    path: re.Pattern[str]
    handle: Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _serve(self) -> None:
        owner: HostileServer = self.server.owner  # type: ignore[attr-defined]
        body = b""
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            body = b"".join(_chunks(self.rfile))
        elif (n := int(self.headers.get("Content-Length") or 0)) > 0:
            body = self.rfile.read(n)
        with owner.lock:
            owner.seen.append(Seen(self.command, self.path, dict(self.headers.items()), body))
        ex = Exchange(self, body)
        try:
            if not owner.authorized(ex):
                return
            for route in list(owner.routes):
                if route.method in ("*", self.command) and route.path.search(self.path):
                    route.handle(ex)
                    return
            owner.forward(ex)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # CONNECT too: the server may stand as an HTTP proxy (its path is then host:port)
    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_CONNECT = _serve


def _chunks(rfile: object) -> Iterator[bytes]:
    read = rfile.readline  # type: ignore[attr-defined]
    while (size := int(read().split(b";")[0].strip() or b"0", 16)) > 0:
        yield rfile.read(size)  # type: ignore[attr-defined]
        read()
    while read().strip():
        pass


@dataclass
class HostileServer:
    """Serve on 127.0.0.1:<port>: routes first, else forward to `upstream`."""

    upstream: str | None = None
    auth: Auth = None
    user: str = "alice"
    password: str = field(default_factory=lambda: "pw-" + secrets.token_hex(12))
    #: the token realm a "token" server announces (default: its own /token)
    realm: str | None = None
    routes: list[Route] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    _httpd: ThreadingHTTPServer | None = None
    _tokens: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def host(self) -> str:
        assert self._httpd is not None
        return f"127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def on(self, method: str, path: str, handle: Handler) -> HostileServer:
        """Answer requests whose path matches the regex `path` with `handle`."""
        self.routes.append(Route(method, re.compile(path), handle))
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ auth

    @property
    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()

    def authorized(self, ex: Exchange) -> bool:
        """Whether to go on with the request (else it was answered: 401, or a token)."""
        if self.auth is None:
            return True
        given = ex.h.headers.get("Authorization", "")
        if self.auth == "token" and ex.path.startswith("/token"):
            if given != self.basic:
                ex.reply(401, b"{}", {"Content-Type": "application/json"})
                return False
            token = secrets.token_hex(16)
            self._tokens.add(token)
            ex.reply(200, json.dumps({"token": token}).encode(),
                     {"Content-Type": "application/json"})
            return False
        if not ex.path.startswith("/v2/"):
            return True  # an upload session's own URL, say: not the registry's API
        if (self.auth == "basic" and given == self.basic) or \
                (self.auth == "token" and given.removeprefix("Bearer ") in self._tokens):
            return True
        how = 'Basic realm="reg"' if self.auth == "basic" else \
            f'Bearer realm="{self.realm or self.url + "/token"}",service="reg"'
        ex.reply(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"log in"}]}',
                 {"WWW-Authenticate": how, "Content-Type": "application/json"})
        return False

    # ------------------------------------------------------------------ forwarding

    def forward(self, ex: Exchange) -> None:
        """The upstream's answer, with its Location made relative (to this server)."""
        if self.upstream is None:
            ex.reply(404, b'{"errors":[{"code":"NOT_FOUND"}]}')
            return
        req = urllib.request.Request(f"http://{self.upstream}{ex.path}", method=ex.method,
                                     data=ex.body if ex.method in ("POST", "PUT", "PATCH")
                                     else None)
        for k, v in ex.h.headers.items():
            if k.lower() not in ("host", "authorization", "content-length",
                                 "transfer-encoding", "connection", "accept-encoding"):
                req.add_header(k, v)
        try:
            with _NO_REDIRECTS.open(req, timeout=30) as resp:
                status, headers, body = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            status, headers, body = e.code, e.headers, e.read()
        dropped = ("connection", "transfer-encoding", "date", "server") + (
            () if ex.method == "HEAD" else ("content-length",))
        out = {k: v for k, v in headers.items() if k.lower() not in dropped}
        if "Location" in out:
            out["Location"] = re.sub(r"^https?://[^/]+", "", out["Location"])
        ex.reply(status, body, out)


class _KeepRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kw: object) -> None:
        return None


_NO_REDIRECTS = urllib.request.build_opener(_KeepRedirects)
