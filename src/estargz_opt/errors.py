"""Every error estargz-opt raises on purpose, in one tree.

Every failure a user can cause or act on derives from EstargzOptError; its message is one
complete line (the CLI prints it as it is, with a non-zero exit). Anything else is a bug
and keeps its traceback. Errors about options name the API's fields and values
(`OptionsError`); the command line spells them as its flags.

    EstargzOptError
    ├── UsageError                    the request contradicts itself (CLI exit status 2)
    │   └── OptionsError              ... naming the fields and values involved
    ├── BadInputError                 a layer, image, record or file is malformed
    │   └── UnpackError               a layer cannot be applied to a root filesystem
    │       └── UnmappedOwnerError    ... because of an owner the namespace cannot map
    ├── VerificationError             a layer does not match its TOC, digests, annotations
    │   └── MissingExternalTOCError   an external-TOC layer was given without its TOC
    ├── PlatformError                 the image has nothing for the platforms asked for
    ├── EmptyProfileError             the profile prioritizes nothing in the image
    ├── Cancelled                     the conversion was interrupted
    ├── RegistryAccessError           a registry cannot be reached or refused our login
    ├── RegistryError                 a registry answered something we cannot go on from
    ├── ContainerdError               containerd is unreachable, refused or failed a request
    │   ├── ContainerdUnavailableError
    │   ├── ContainerdPermissionError
    │   ├── NotFoundError
    │   │   ├── ImageNotFoundError
    │   │   ├── ContentNotFoundError
    │   │   └── NamespaceNotFoundError
    │   ├── AlreadyExistsError
    │   ├── FailedPreconditionError
    │   └── IngestLockedError
    ├── SampleError                   the sample container could not be set up
    │   └── RootlessUnavailableError  the rootless runner cannot work on this host
    │       ├── ImageTooBigError
    │       └── NeedsIdsError
    ├── WorkloadStartError            the workload could not start: the run fails
    ├── EmulationUnavailableError     a foreign platform's workload has no qemu-user here
    ├── RunnerError                   a runner could not signal, wait for or delete a task
    ├── MonitorError                  the file-access monitor failed
    ├── MountError                    a mount the sample container needs failed
    ├── NetworkError                  the workload's network (CNI) could not be set up
    ├── ForeignCacheError             a cache directory of another user is not used
    └── FanotifyError                 fanotify could not be set up or read
        ├── FanotifyPermissionError
        └── FanotifyUnavailableError

    Interrupted (a BaseException)     SIGINT or SIGTERM: unwinds, then exits 128 + signal

The modules that raise these import them from here; no other module defines a public
error class. A log record that names options carries `extra={OPTION_TERMS: True}`: its
string arguments that are terms are spelled by the front end too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from grpc import StatusCode

#: the attribute of a log record whose string arguments may be option terms
OPTION_TERMS = "option_terms"


class EstargzOptError(Exception):
    """A failure the user can act on; the message is a complete sentence-like line.

    An error that names options keeps its message as a template whose {placeholders}
    stand for terms such as `oci=True` or `format=zstdchunked`: `str()` spells them as
    the API does, `spelled()` lets a front end (the CLI: its flags) spell them its way.
    """

    template: str | None = None
    terms: Mapping[str, str] = MappingProxyType({})

    @classmethod
    def with_terms(cls, template: str, **terms: str) -> Self:
        """The error whose message is `template` with its terms filled in."""
        exc = cls(template.format(**terms))
        exc.template, exc.terms = template, terms
        return exc

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with each term replaced by spell(term)."""
        if self.template is None:
            return str(self)
        return self.template.format(**{k: spell(v) for k, v in self.terms.items()})


def literal(text: str) -> str:
    """`text` as part of a template: its braces are not placeholders."""
    return text.replace("{", "{{").replace("}", "}}")


class UsageError(EstargzOptError):
    """The request asks for something contradictory or impossible (exit status 2 on the
    command line, like every other usage error)."""

    exit_code = 2


class OptionsError(UsageError):
    """Options that do not go together, named as the API's fields and values (terms)."""

    def __init__(self, template: str, **terms: str) -> None:
        super().__init__(template.format(**terms))
        self.template, self.terms = template, terms


class BadInputError(EstargzOptError):
    """The input layer, image, record or file is malformed, truncated or unsupported."""


class UnpackError(BadInputError):
    """A layer could not be applied (its tar is bad, or it asks for the impossible)."""


class UnmappedOwnerError(UnpackError):
    """An entry is owned by an id the caller cannot give files (see UnpackOptions.ids)."""

    def __init__(self, name: str, uid: int, gid: int) -> None:
        super().__init__(f"{name} is owned by uid {uid} gid {gid}")


class VerificationError(EstargzOptError):
    """A converted layer does not match its TOC, digest or annotations."""


class MissingExternalTOCError(VerificationError):
    """The blob is an external-TOC layer and its TOC was not supplied."""


class PlatformError(EstargzOptError):
    """The image has nothing for the platforms asked for (the host's by default)."""


class EmptyProfileError(EstargzOptError):
    """The profile prioritizes nothing in the image (unless allow_empty_profile)."""


class Cancelled(EstargzOptError):
    """The conversion was interrupted."""


class RegistryAccessError(EstargzOptError):
    """The registry cannot be reached, its certificate is not trusted, or it refused our
    credentials. The message names the registry and never holds a secret."""


class RegistryError(EstargzOptError):
    """A registry answered something we cannot go on from (the message says which)."""


class ContainerdError(EstargzOptError):
    """containerd could not be reached, or refused or failed a request.

    The table that maps gRPC status codes to these classes is in
    stores/containerd/transport.py.
    """

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
    """No image of that name in the namespace."""


class ContentNotFoundError(NotFoundError):
    """No blob (or ingest) of that digest in the content store."""


class NamespaceNotFoundError(NotFoundError):
    """The namespace does not exist."""


class AlreadyExistsError(ContainerdError):
    """The object (an image, a blob, a container) exists already."""


class FailedPreconditionError(ContainerdError):
    """containerd refused a request in the current state (e.g. a commit that does not verify)."""


class IngestLockedError(ContainerdError):
    """Another write stream holds the ingest ref."""


class SampleError(EstargzOptError):
    """The sample container could not be set up."""


class RootlessUnavailableError(SampleError):
    """The rootless runner cannot work on this host (one line, with the ways out)."""


class ImageTooBigError(RootlessUnavailableError):
    """The unpacked image did not fit in the tmpfs (memory)."""


class NeedsIdsError(RootlessUnavailableError):
    """The image owns files by ids the user namespace does not map (the helper's report;
    the parent turns it into the refusal that names the ways out)."""


class WorkloadStartError(EstargzOptError):
    """The workload could not start (the runtime refused the host or the spec, or the
    entrypoint is missing): the run fails, unlike a workload that starts and exits
    non-zero, whose reads are recorded."""


class EmulationUnavailableError(EstargzOptError):
    """A selected platform is not the host's and no binfmt_misc qemu-user entry with the
    F flag runs its binaries here (the message names the package that provides one)."""


class RunnerError(EstargzOptError):
    """A runner could not signal, wait for or delete the sample task."""


class MonitorError(EstargzOptError):
    """The file-access monitor failed."""


class MountError(EstargzOptError):
    """A mount the sample container needs could not be made or undone."""


class NetworkError(EstargzOptError):
    """The workload's network (CNI) could not be set up or torn down."""


class FanotifyError(EstargzOptError):
    """fanotify could not be set up or returned data this tool cannot read."""


class FanotifyPermissionError(FanotifyError):
    """The process lacks CAP_SYS_ADMIN, which mount-wide fanotify marks require."""


class FanotifyUnavailableError(FanotifyError):
    """The kernel (or libc) has no usable fanotify."""


class ForeignCacheError(EstargzOptError):
    """`cache info`/`prune` on a directory the cache refuses to use (another user's)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM during a run. It unwinds like Ctrl-C (every `finally` and
    `except BaseException` rolls back what was written), then the run exits 128 + the
    signal, as shells report a signal (130 for Ctrl-C, 143 for SIGTERM). Not an
    Exception, so no handler takes it for a failure; not a KeyboardInterrupt, so click
    prints nothing of its own."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
