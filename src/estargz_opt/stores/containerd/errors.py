"""What can go wrong talking to containerd, as exception classes.

Each message is one line the user can act on (the CLI prints it as it is). The table
that maps gRPC status codes to these classes is in transport.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from estargz_opt.errors import EstargzOptError

if TYPE_CHECKING:
    from grpc import StatusCode


class ContainerdError(EstargzOptError):
    """containerd could not be reached, or refused or failed a request."""

    def __init__(self, message: str, code: StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ContainerdUnavailableError(ContainerdError):
    """No containerd answers at the address (missing socket, refused, died mid-run)."""


class ContainerdPermissionError(ContainerdError):
    """The socket exists but this user may not connect to it."""


class NotFoundError(ContainerdError):
    """The named object does not exist in the namespace."""


class ImageNotFoundError(NotFoundError):
    pass


class ContentNotFoundError(NotFoundError):
    pass


class NamespaceNotFoundError(NotFoundError):
    pass


class AlreadyExistsError(ContainerdError):
    pass


class FailedPreconditionError(ContainerdError):
    """containerd refused a request in the current state (e.g. a commit that does not verify)."""


class IngestLockedError(ContainerdError):
    """Another write stream holds the ingest ref."""
