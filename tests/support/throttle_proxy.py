#!/usr/bin/env python3
"""An HTTP proxy in front of a registry that emulates a slow link and logs every request.

This kernel has no netem, so the link is emulated in user space, at the HTTP level:

* **RTT**: every request waits ``--rtt-ms`` before it is forwarded (one round trip
  for the request and the first bytes of the answer), and every new client
  connection waits another ``--rtt-ms`` before its first request is read (the TCP
  handshake).
* **Bandwidth**: response bodies leave through one shared token bucket of
  ``--mbit`` Mbit/s (all connections share the link, as on a real one), in
  64 KiB slices. Request bodies (pushes) are not throttled unless
  ``--throttle-uploads``: then they pass the same bucket as they are read, so a
  push and a pull share the link's bandwidth.

Each request is logged as one JSON line (``--log FILE``): ``t0``/``t1`` (wall clock,
seconds), ``method``, ``path``, ``range`` (the Range header or null),
``content_range`` (an upload chunk's Content-Range header or null), ``status``,
``bytes`` (response body bytes sent), ``req_bytes`` (request body bytes received) and
``conn`` (client connection number). The
end-to-end tests use the log, with ``--rtt-ms 0 --mbit 0`` (no throttling), to
tell prefetches from on-demand reads.

Fault injection, for the registry client's tests: ``--too-many N`` answers the first N
requests whose path contains ``/blobs/`` with ``429 Too Many Requests`` and
``Retry-After: --retry-after`` seconds, without forwarding them (logged with status 429);
``--max-body BYTES`` answers requests with a larger body ``413 Payload Too Large``, as
some proxies in front of registries do (logged with status 413); ``--cut-streams N``
breaks the first N streamed uploads (PATCH with a chunked body) after their first
chunk: the connection is reset, nothing is forwarded (logged with status 0).

Usage: throttle_proxy.py --upstream HOST:PORT [--listen HOST:PORT] [--rtt-ms 20]
       [--mbit 100] [--throttle-uploads] [--log FILE] [--too-many N [--retry-after S]]
       [--max-body BYTES] [--cut-streams N]
Prints ``listening on HOST:PORT`` on stdout once it accepts connections; SIGTERM or
SIGINT stop it.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import itertools
import json
import signal
import socket
import socketserver
import struct
import sys
import threading
import time

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "proxy-connection"}
SLICE = 64 * 1024


class Link:
    """A shared link: a virtual clock of when the wire is free next."""

    def __init__(self, mbit: float):
        self.bytes_per_s = mbit * 1e6 / 8 if mbit > 0 else 0.0
        self._free_at = 0.0
        self._lock = threading.Lock()

    def send(self, n: int) -> None:
        """Block until *n* bytes have passed the link."""
        if not self.bytes_per_s:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + n / self.bytes_per_s
            done = self._free_at
        delay = done - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class RequestLog:
    def __init__(self, path: str | None):
        self._f = open(path, "a", buffering=1) if path else None  # noqa: SIM115
        self._lock = threading.Lock()

    def write(self, rec: dict) -> None:
        if self._f is None:
            return
        line = json.dumps(rec, sort_keys=True)
        with self._lock:
            self._f.write(line + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


class Proxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], rtt_s: float,
                 link: Link, reqlog: RequestLog, too_many: int = 0, retry_after: int = 1,
                 max_body: int = 0, throttle_uploads: bool = False, cut_streams: int = 0):
        super().__init__(listen, Handler)
        self.upstream = upstream
        self.rtt_s = rtt_s
        self.link = link
        self.throttle_uploads = throttle_uploads
        self.reqlog = reqlog
        self.conns = itertools.count(1)
        self.too_many = too_many
        self.retry_after = retry_after
        self.max_body = max_body
        self.cut_streams = cut_streams
        self._faults = threading.Lock()

    def take_fault(self, path: str) -> bool:
        """Whether this request gets a 429 (one of the first --too-many blob requests)."""
        if "/blobs/" not in path:
            return False
        with self._faults:
            if self.too_many <= 0:
                return False
            self.too_many -= 1
            return True

    def take_cut(self) -> bool:
        """Whether this streamed upload is broken off (one of the first --cut-streams)."""
        with self._faults:
            if self.cut_streams <= 0:
                return False
            self.cut_streams -= 1
            return True


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Proxy

    def setup(self) -> None:
        super().setup()
        self.conn_no = next(self.server.conns)
        self.upstream: http.client.HTTPConnection | None = None
        if self.server.rtt_s:
            time.sleep(self.server.rtt_s)  # the TCP handshake's round trip

    def finish(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
        super().finish()

    def log_message(self, format: str, *args) -> None:
        pass  # the JSON log says it all

    def _read(self, n: int) -> bytes:
        """n bytes of the request body, through the link with --throttle-uploads."""
        parts = []
        while n > 0:
            data = self.rfile.read(min(n, SLICE))
            if not data:
                break
            if self.server.throttle_uploads:
                self.server.link.send(len(data))
            parts.append(data)
            n -= len(data)
        return b"".join(parts)

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self._read(size))
                self.rfile.readline()
            return b"".join(parts)
        n = int(self.headers.get("Content-Length") or 0)
        return self._read(n) if n else None

    def _cut(self, t0: float) -> None:
        """Read the stream's first chunk, then reset the connection unanswered."""
        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
        received = len(self._read(size))
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                   struct.pack("ii", 1, 0))
        self.connection.close()
        self.server.reqlog.write({
            "t0": round(t0, 6), "t1": round(time.time(), 6), "method": self.command,
            "path": self.path, "range": None, "content_range": None, "status": 0, "bytes": 0,
            "req_bytes": received, "conn": self.conn_no})

    def _forward(self) -> None:
        t0 = time.time()
        if (self.command == "PATCH"
                and self.headers.get("Transfer-Encoding", "").lower() == "chunked"
                and self.server.take_cut()):
            self._cut(t0)
            return
        body = self._read_body()
        if self.server.rtt_s:
            time.sleep(self.server.rtt_s)
        # Repeated headers (skopeo sends one Accept line per media type) are joined, as
        # HTTP allows: a dict of the last one only would hide OCI manifests from skopeo.
        headers: dict[str, str] = {}
        for k, v in self.headers.items():
            if k.lower() not in HOP_BY_HOP:
                headers[k] = f"{headers[k]}, {v}" if k in headers else v
        status, sent = 502, 0
        received = len(body or b"")
        too_big = bool(self.server.max_body and body and len(body) > self.server.max_body)
        if too_big or self.server.take_fault(self.path):
            status = 413 if too_big else 429
            self.send_response_only(status)
            if status == 429:
                self.send_header("Retry-After", str(self.server.retry_after))
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.wfile.flush()
            self.server.reqlog.write({
                "t0": round(t0, 6), "t1": round(time.time(), 6), "method": self.command,
                "path": self.path, "range": self.headers.get("Range"),
                "content_range": self.headers.get("Content-Range"), "status": status,
                "bytes": 0, "req_bytes": received, "conn": self.conn_no})
            return
        try:
            idempotent = self.command in ("GET", "HEAD")
            if not idempotent and self.upstream is not None:
                # Never on a kept-alive connection: if the registry had closed it, sending
                # again could apply an upload PATCH twice.
                self.upstream.close()
                self.upstream = None
            for attempt in (0, 1):  # a kept-alive upstream connection may have been closed
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection(*self.server.upstream, timeout=300)
                try:
                    self.upstream.request(self.command, self.path, body=body, headers=headers)
                    resp = self.upstream.getresponse()
                    break
                except (ConnectionError, http.client.HTTPException):
                    self.upstream.close()
                    self.upstream = None
                    if attempt or not idempotent:
                        raise
            status = resp.status
            self.send_response_only(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            chunked = length is None and self.command != "HEAD" and resp.status not in (204, 304)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command != "HEAD":
                while data := resp.read(SLICE):
                    self.server.link.send(len(data))
                    if chunked:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    else:
                        self.wfile.write(data)
                    sent += len(data)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            if resp.will_close:
                self.upstream.close()
                self.upstream = None
                self.close_connection = True
        except (ConnectionError, OSError, http.client.HTTPException) as e:
            self.close_connection = True
            if status == 502 and not sent:
                try:
                    msg = f"proxy: upstream failed: {e}\n".encode()
                    self.send_response_only(502)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                except OSError:
                    pass
        finally:
            self.server.reqlog.write({
                "t0": round(t0, 6), "t1": round(time.time(), 6), "method": self.command,
                "path": self.path, "range": self.headers.get("Range"),
                "content_range": self.headers.get("Content-Range"), "status": status,
                "bytes": sent, "req_bytes": received, "conn": self.conn_no})

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


def hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, type=hostport, help="registry HOST:PORT")
    ap.add_argument("--listen", default="127.0.0.1:0", type=hostport,
                    help="HOST:PORT to listen on (port 0: any free port)")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="round trip per request (ms)")
    ap.add_argument("--mbit", type=float, default=100.0, help="link bandwidth, 0 = unlimited")
    ap.add_argument("--throttle-uploads", action="store_true",
                    help="request bodies (pushes) share the link's bandwidth too")
    ap.add_argument("--log", help="append one JSON line per request to this file")
    ap.add_argument("--too-many", type=int, default=0,
                    help="answer the first N blob requests with 429 (fault injection)")
    ap.add_argument("--retry-after", type=int, default=1,
                    help="the Retry-After seconds of those 429 answers")
    ap.add_argument("--max-body", type=int, default=0,
                    help="answer requests with a larger body 413 (fault injection)")
    ap.add_argument("--cut-streams", type=int, default=0,
                    help="reset the first N streamed uploads mid-body (fault injection)")
    args = ap.parse_args(argv)

    reqlog = RequestLog(args.log)
    server = Proxy(args.listen, args.upstream, args.rtt_ms / 1000, Link(args.mbit), reqlog,
                   args.too_many, args.retry_after, args.max_body, args.throttle_uploads,
                   args.cut_streams)

    def stop(signum: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(f"listening on {host}:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        reqlog.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
