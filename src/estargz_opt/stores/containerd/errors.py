"""What can go wrong talking to containerd: the classes live in estargz_opt.errors (the
whole tree in one place); this module names the containerd branch for its users here.

Each message is one line the user can act on (the CLI prints it as it is). The table
that maps gRPC status codes to these classes is in transport.py.
"""

from estargz_opt.errors import (
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

__all__ = [
    "AlreadyExistsError",
    "ContainerdError",
    "ContainerdPermissionError",
    "ContainerdUnavailableError",
    "ContentNotFoundError",
    "FailedPreconditionError",
    "ImageNotFoundError",
    "IngestLockedError",
    "NamespaceNotFoundError",
    "NotFoundError",
]
