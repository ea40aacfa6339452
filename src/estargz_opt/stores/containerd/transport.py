"""The one gRPC connection every containerd service object shares.

We talk to containerd's API with grpcio and our own minimal message definitions
(protos/, compiled into _pb/), not the PyPI `containerd` package, whose stale generated
code does not import with current protobuf. The stubs are declared in `rpcs.py`.

Every call carries the `containerd-namespace` header; a call given a lease also carries
`containerd-lease`, so that what it creates cannot be garbage-collected half-way. gRPC
failures become ContainerdError subclasses through one table (`_RULES`).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import grpc
from google.protobuf.message import Message

from estargz_opt.stores.containerd import rpcs
from estargz_opt.stores.containerd._pb import namespaces_pb2
from estargz_opt.stores.containerd.errors import (
    AlreadyExistsError,
    ContainerdError,
    ContainerdPermissionError,
    ContainerdUnavailableError,
    ContentNotFoundError,
    FailedPreconditionError,
    ImageNotFoundError,
    IngestLockedError,
    NamespaceNotFoundError,
    NotFoundError,
)
from estargz_opt.stores.containerd.rpcs import Rpc

log = logging.getLogger("estargz_opt.stores.containerd")

NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
_MAX_MESSAGE = 16 << 20  # containerd's own gRPC message limit

_HOW_TO_POINT = (
    "point estargz-opt at a running containerd with -a/--address or CONTAINERD_ADDRESS, "
    "or start one (e.g. sudo systemctl start containerd)"
)

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


class Subject(NamedTuple):
    """What a call is about, for its error message: ("image", "docker.io/x:1")."""

    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class _Rule:
    """One row of the error table: a status code (and optionally a subject kind or a
    phrase of containerd's message) and the error it becomes."""

    code: grpc.StatusCode
    error: type[ContainerdError]
    message: str
    subject: str = ""
    phrase: str = ""


_C = grpc.StatusCode
# First match wins. Fields: {what} (the subject or the method), {name}, {details},
# {namespace}, {address}, {within} (the timeout hint).
_RULES: tuple[_Rule, ...] = (
    _Rule(_C.UNAVAILABLE, IngestLockedError, "containerd: {what}: {details}", phrase="locked"),
    _Rule(
        _C.DEADLINE_EXCEEDED,
        ContainerdUnavailableError,
        "containerd at {address} did not answer {what}{within}",
    ),
    _Rule(
        _C.NOT_FOUND,
        ImageNotFoundError,
        "image {name} not found in containerd namespace {namespace!r}",
        subject="image",
    ),
    _Rule(
        _C.NOT_FOUND,
        ContentNotFoundError,
        "content {name} not found in containerd namespace {namespace!r}",
        subject="content",
    ),
    _Rule(_C.NOT_FOUND, NotFoundError, "containerd: {what} not found: {details}"),
    _Rule(_C.ALREADY_EXISTS, AlreadyExistsError, "containerd: {what} already exists: {details}"),
    _Rule(
        _C.FAILED_PRECONDITION,
        ContainerdError,
        "containerd wants a namespace: pass -n/--namespace or set CONTAINERD_NAMESPACE",
        phrase="namespace is required",
    ),
    _Rule(
        _C.FAILED_PRECONDITION,
        FailedPreconditionError,
        "containerd refused {what} (failed precondition): {details}",
    ),
    _Rule(_C.PERMISSION_DENIED, ContainerdPermissionError, "containerd: {what}: {details}"),
)


class Transport:
    """A channel to one containerd, working in one namespace.

    `timeout` (seconds) bounds each unary call; streamed reads and writes are not
    bounded, since a large blob may legitimately take long.
    """

    def __init__(self, address: str, namespace: str, timeout: float | None = None) -> None:
        if not namespace:
            raise ContainerdError(
                "a containerd namespace is required: pass -n/--namespace or set "
                "CONTAINERD_NAMESPACE (ctr's default is 'default')"
            )
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self._path = socket_path(address)
        self._channel = grpc.insecure_channel(
            f"unix:{self._path}",
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.max_send_message_length", _MAX_MESSAGE),
            ],
        )
        self._stubs: dict[str, Callable[..., Any]] = {}

    def close(self) -> None:
        self._channel.close()

    def metadata(self, lease: str | None = None) -> list[tuple[str, str]]:
        md = [(NAMESPACE_HEADER, self.namespace)]
        if lease:
            md.append((LEASE_HEADER, lease))
        return md

    def _stub(self, rpc: Rpc[Any, Any]) -> Callable[..., Any]:
        stub = self._stubs.get(rpc.path)
        if stub is None:
            stub = getattr(self._channel, rpc.kind)(
                rpc.path,
                request_serializer=rpc.request.SerializeToString,
                response_deserializer=rpc.response.FromString,
            )
            self._stubs[rpc.path] = stub
        return stub

    # -------------------------------------------------------------- calls

    def unary(
        self,
        rpc: Rpc[Req, Resp],
        request: Req,
        subject: Subject | None = None,
        *,
        lease: str | None = None,
        timeout: float | bool | None = True,
    ) -> Resp:
        """One unary call. timeout: True for the transport's, None for none, or seconds."""
        log.debug("containerd %s %s", rpc.path, subject.name if subject else "")
        limit = self.timeout if timeout is True else timeout
        try:
            response: Resp = self._stub(rpc)(request, timeout=limit, metadata=self.metadata(lease))
        except grpc.RpcError as exc:
            raise self.error(exc, rpc, subject) from None
        return response

    def server_stream(
        self, rpc: Rpc[Req, Resp], request: Req, subject: Subject | None = None
    ) -> Iterator[Resp]:
        """The responses of a server-streaming call, cancelled when the caller stops."""
        log.debug("containerd %s %s", rpc.path, subject.name if subject else "")
        stream = self._stub(rpc)(request, metadata=self.metadata())
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise self.error(exc, rpc, subject) from None
        finally:
            stream.cancel()

    def bidi(
        self, rpc: Rpc[Req, Resp], requests: Iterator[Req], lease: str | None = None
    ) -> grpc.Call:
        """A bidirectional stream fed from `requests`; the caller iterates the answer."""
        log.debug("containerd %s", rpc.path)
        call: grpc.Call = self._stub(rpc)(requests, metadata=self.metadata(lease))
        return call

    # -------------------------------------------------------------- errors

    def error(
        self, exc: grpc.RpcError, rpc: Rpc[Any, Any], subject: Subject | None
    ) -> ContainerdError:
        """Turn a gRPC failure into an error that says what to do about it."""
        code: grpc.StatusCode | None = exc.code() if isinstance(exc, grpc.Call) else None
        details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
        details = " ".join(details.split())
        if code is not None:
            # containerd appends its error class (": not found"); we name it ourselves.
            details = details.removesuffix(": " + code.name.lower().replace("_", " "))
        what = f"{subject.kind} {subject.name}" if subject else rpc.method
        if code == grpc.StatusCode.NOT_FOUND and not self._namespace_exists_quietly():
            return NamespaceNotFoundError(self.no_namespace_message(), code)
        for rule in _RULES:
            if rule.code != code or rule.phrase not in details:
                continue
            if rule.subject and (subject is None or subject.kind != rule.subject):
                continue
            within = f" within {self.timeout:g} s (raise --timeout?)" if self.timeout else ""
            message = rule.message.format(
                what=what,
                name=subject.name if subject else "",
                details=details,
                namespace=self.namespace,
                address=self.address,
                within=within,
            )
            return rule.error(message, code)
        if code == grpc.StatusCode.UNAVAILABLE:
            return self._unreachable(details)
        name = code.name.lower() if code is not None else "error"
        return ContainerdError(f"containerd: {what} failed ({name}): {details}", code)

    def _unreachable(self, details: str) -> ContainerdError:
        problem = probe_socket(self._path)
        if problem == "missing":
            return ContainerdUnavailableError(
                f"no containerd socket at {self.address}: {_HOW_TO_POINT}"
            )
        if problem == "refused":
            return ContainerdUnavailableError(
                f"containerd is not listening at {self.address} (connection refused, "
                f"a stale socket?): {_HOW_TO_POINT}"
            )
        if problem == "permission":
            return ContainerdPermissionError(
                f"permission denied on containerd socket {self.address}: run as root "
                "(e.g. with sudo) or as a user allowed to open the socket"
            )
        if problem:
            return ContainerdUnavailableError(
                f"cannot connect to containerd at {self.address}: {problem}; {_HOW_TO_POINT}"
            )
        return ContainerdUnavailableError(
            f"containerd at {self.address} is unavailable ({details}); is it still running?"
        )

    # -------------------------------------------------------------- namespaces

    def namespaces(self) -> list[str]:
        r = self.unary(rpcs.NAMESPACE_LIST, namespaces_pb2.ListNamespacesRequest())
        return sorted(n.name for n in r.namespaces)

    def _namespace_exists_quietly(self) -> bool:
        try:
            return self.namespace in self.namespaces()
        except ContainerdError:
            return True  # cannot tell; report the original error

    def no_namespace_message(self) -> str:
        try:
            names = ", ".join(self.namespaces()) or "none"
        except ContainerdError:
            names = "unknown"
        return (
            f"containerd namespace {self.namespace!r} does not exist "
            f"(namespaces: {names}); choose one with -n/--namespace or CONTAINERD_NAMESPACE"
        )


class Service:
    """A containerd service's client object: its calls, over the shared transport."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport


def socket_path(address: str) -> str:
    """The filesystem path of a containerd address (a path or unix:// URL)."""
    if address.startswith("unix://"):
        return address[len("unix://") :]
    if address.startswith("unix:"):
        return address[len("unix:") :]
    if "://" in address:
        raise ContainerdError(
            f"unsupported containerd address {address!r}: containerd listens on a unix "
            "socket (e.g. /run/containerd/containerd.sock)"
        )
    return address


def probe_socket(path: str) -> str | None:
    """Why nothing can connect to the unix socket at `path`, or None if something answers.

    gRPC reports all of these as UNAVAILABLE; a plain connect tells them apart.
    """
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return "not a socket"
    except FileNotFoundError:
        return "missing"
    except PermissionError:  # a directory on the way is closed to us
        return "permission"
    except OSError as exc:
        return exc.strerror or str(exc)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
    except FileNotFoundError:
        return "missing"
    except ConnectionRefusedError:
        return "refused"
    except PermissionError:
        return "permission"
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        s.close()
    return None
