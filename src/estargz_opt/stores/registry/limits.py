"""Bounds on every exchange with a registry: an overall deadline, a minimum rate and a
byte cap per request, enforced where the bytes are, in the socket reads and writes.

httpx's timeouts are per read: a server that sends one byte every few seconds (headers
or body) never trips them, and httpx reads some bodies whole by itself (a redirect's, a
401's) before we see them. So the connection pool gets a network backend whose streams
clamp every read and write to the time left of the request under way in that thread,
and count its bytes. A request may take `timeout` seconds plus the time its bytes need
at `min_rate` (a 2 GiB layer over a slow link goes through; a trickle does not), and
read at most `max_bytes`. httpx's sync client does all of a request's I/O in the
calling thread, the token request and redirects included, so one per-thread record
covers them.

The transport also hands every body over as it was sent: it takes Content-Encoding off
the headers (into `ENCODING`) so that httpx never inflates a body by itself; callers
that read a body whole decode it under their own cap (`read_whole`).
"""

from __future__ import annotations

import ssl
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpcore
import httpx

#: Response extension holding the Content-Encoding the server sent ("" for none).
ENCODING = "estargz_opt.content_encoding"
#: What any answer but a blob may hold, headers and the bodies httpx reads itself
#: (redirects, 401s) included; the largest body we read whole is a 16 MiB document.
SMALL = 1 << 20


@dataclass(frozen=True, slots=True)
class Limit:
    """The bounds of one request: seconds, bytes/s beyond them, bytes read at most."""

    timeout: float
    min_rate: int
    max_bytes: int | None = SMALL

    def reading(self, size: int) -> Limit:
        """The same bounds for a request whose answer holds `size` bytes of body."""
        return Limit(self.timeout, self.min_rate, size + SMALL)


@dataclass(slots=True)
class _Usage:
    limit: Limit
    started: float = field(default_factory=time.monotonic)
    moved: int = 0
    read: int = 0
    #: why the request was cut off, once it was
    exceeded: str | None = None

    def remaining(self) -> float:
        allowed = self.limit.timeout + self.moved / self.limit.min_rate
        return self.started + allowed - time.monotonic()

    def over_time(self) -> str:
        return (
            f"no complete answer within {self.limit.timeout:g} s plus 1 s per "
            f"{self.limit.min_rate / 1024:g} KiB moved (--registry-timeout, "
            "--registry-min-rate)"
        )


class Limits:
    """The bounds of the request each thread has under way (one per session)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def current(self) -> _Usage | None:
        usage: _Usage | None = getattr(self._local, "usage", None)
        return usage

    @contextmanager
    def applied(self, limit: Limit) -> Iterator[None]:
        """Bound what this thread sends and reads inside the block; `restart` begins
        each try afresh."""
        before = self.current()
        self._local.usage = _Usage(limit)
        try:
            yield
        finally:
            self._local.usage = before

    def restart(self) -> None:
        usage = self.current()
        if usage is not None:
            self._local.usage = _Usage(usage.limit)

    def exceeded(self) -> str | None:
        """Why the request under way was cut off (None: it was not)."""
        usage = self.current()
        return usage.exceeded if usage is not None else None


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, limits: Limits) -> None:
        self._inner = inner
        self._limits = limits

    def _clamp(self, usage: _Usage | None, timeout: float | None) -> float | None:
        if usage is None:
            return timeout
        left = usage.remaining()
        if left <= 0:
            usage.exceeded = usage.over_time()
            raise httpcore.ReadTimeout(usage.exceeded)
        return left if timeout is None else min(timeout, left)

    def _timed_out(self, usage: _Usage | None) -> None:
        # the socket timeout was the time left (a few ms of rounding allowed)
        if usage is not None and usage.remaining() <= 0.01:
            usage.exceeded = usage.over_time()

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        usage = self._limits.current()
        try:
            data = self._inner.read(max_bytes, self._clamp(usage, timeout))
        except httpcore.TimeoutException:
            self._timed_out(usage)
            raise
        if usage is not None:
            usage.moved += len(data)
            usage.read += len(data)
            cap = usage.limit.max_bytes
            if cap is not None and usage.read > cap:
                usage.exceeded = f"the answer is larger than {cap} bytes"
                raise httpcore.ReadError(usage.exceeded)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        usage = self._limits.current()
        try:
            self._inner.write(buffer, self._clamp(usage, timeout))
        except httpcore.TimeoutException:
            self._timed_out(usage)
            raise
        if usage is not None:
            usage.moved += len(buffer)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        usage = self._limits.current()
        try:
            inner = self._inner.start_tls(ssl_context, server_hostname, self._clamp(usage, timeout))
        except httpcore.TimeoutException:
            self._timed_out(usage)
            raise
        return _Stream(inner, self._limits)

    def get_extra_info(self, info: str) -> object:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, limits: Limits) -> None:
        self._inner = httpcore.SyncBackend()
        self._limits = limits

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        usage = self._limits.current()
        if usage is not None:
            left = max(usage.remaining(), 0.001)
            timeout = left if timeout is None else min(timeout, left)
        try:
            inner = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        except httpcore.TimeoutException:
            if usage is not None and usage.remaining() <= 0.01:
                usage.exceeded = usage.over_time()
            raise
        return _Stream(inner, self._limits)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        return _Stream(self._inner.connect_unix_socket(path, timeout, socket_options), self._limits)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class Transport(httpx.HTTPTransport):
    """httpx's transport (direct, or through `proxy`) on connections that obey
    `limits`, handing bodies over undecoded (Content-Encoding moved to `ENCODING`)."""

    def __init__(
        self, context: ssl.SSLContext, limits: Limits, proxy: httpx.Proxy | None = None
    ) -> None:
        super().__init__(verify=context, proxy=proxy)
        # httpx offers no way to pass httpcore a network backend: its pool (direct or a
        # proxy's) is given ours, which every connection it makes then uses.
        self._pool._network_backend = _Backend(limits)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        encoding = response.headers.get("Content-Encoding", "")
        if encoding:
            del response.headers["Content-Encoding"]
        response.extensions = {**response.extensions, ENCODING: encoding.strip().lower()}
        return response


class BodyError(Exception):
    """A body read whole is too large or cannot be decoded (the message says which)."""


#: The Content-Encodings `read_whole` decodes (zlib's window bits for each).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def read_whole(response: httpx.Response, cap: int) -> bytes:
    """The body of `response`, decoded, and at most `cap` bytes before and after
    decoding (a compression bomb stops at the cap); BodyError otherwise. We ask for
    identity; gzip and deflate are decoded all the same, anything else is refused."""
    try:
        raw = response.content
    except httpx.ResponseNotRead:
        buf = bytearray()
        for piece in response.iter_raw():
            buf += piece
            if len(buf) > cap:
                raise BodyError(f"the answer is larger than {cap} bytes") from None
        raw = bytes(buf)
    if len(raw) > cap:
        raise BodyError(f"the answer is larger than {cap} bytes")
    encoding = str(response.extensions.get(ENCODING, ""))
    if encoding in ("", "identity"):
        return raw
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise BodyError(
            f"the answer has a Content-Encoding we cannot read "
            f"({encoding[:40]!r}; we asked for identity)"
        )
    inflate = zlib.decompressobj(wbits)
    try:
        data = inflate.decompress(raw, cap + 1)
    except zlib.error as exc:
        raise BodyError(f"the answer is not valid {encoding} ({exc})") from None
    if len(data) > cap or inflate.unconsumed_tail:
        raise BodyError(f"the answer is larger than {cap} bytes once decoded ({encoding})")
    if not inflate.eof:
        raise BodyError(f"the answer's {encoding} stream is cut short")
    return data
