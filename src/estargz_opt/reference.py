"""Image references on the command line, as skopeo spells them: `oci:DIR[:TAG]`,
`docker://…` (a registry), `oci-archive:PATH[:TAG]`, `docker-archive:PATH[:NAME:TAG]`, and
otherwise a containerd image name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from estargz_opt.digest import sha256_hex
from estargz_opt.errors import EstargzOptError, UsageError


@dataclass(frozen=True, slots=True)
class OCIRef:
    """An image in an OCI image layout directory, optionally by tag (skopeo's `oci:` form)."""

    path: Path
    tag: str | None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")

    def with_tag(self, tag: str) -> OCIRef:
        return OCIRef(self.path, tag)


@dataclass(frozen=True, slots=True)
class ContainerdRef:
    """An image by name in containerd's image store (e.g. docker.io/library/app:1.0)."""

    name: str

    def __str__(self) -> str:
        return self.name

    @property
    def tag(self) -> str:
        return self.name

    def with_tag(self, tag: str) -> ContainerdRef:
        return ContainerdRef(tag)


# ---------------------------------------------------------------- docker:// (registries)

DOCKER_PREFIX = "docker://"
#: Docker Hub: the name users write, the name its repositories are normalized under, and
#: the host that serves its API.
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"
# The grammar of docker/distribution's reference package, as skopeo applies it.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_HOST = re.compile(
    r"(?:(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?\.?)+|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)
_TRANSPORT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: `docker:/x`, `oci-archive//x`, `docker:::x`: a transport misspelled. No image name has
#: a colon before a slash with no port between, nor an empty path component.
_TRANSPORT_LIKE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)(:/+|/{2,}|:{2,})")
#: the transports a misspelling is matched to, with their right spelling
_SPELLING = {
    "docker": "docker://",
    "oci": "oci:",
    "oci-archive": "oci-archive:",
    "docker-archive": "docker-archive:",
}


@dataclass(frozen=True, slots=True)
class RegistryRef:
    """An image in a registry (skopeo's `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`).

    Exactly one of tag and digest is set: a reference with neither means `latest`.
    """

    #: the registry as written (docker.io for Docker Hub), HOST[:PORT]
    registry: str
    repository: str
    tag: str | None
    digest: str | None = None

    def __str__(self) -> str:
        where = f"@{self.digest}" if self.digest else f":{self.tag}"
        return f"{DOCKER_PREFIX}{self.registry}/{self.repository}{where}"

    @property
    def api_host(self) -> str:
        """The host the distribution API is served on."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def with_tag(self, tag: str) -> RegistryRef:
        return RegistryRef(self.registry, self.repository, tag)

    @classmethod
    def parse(cls, text: str) -> RegistryRef:
        """A `docker://` reference; UsageError (exit 2) naming what is wrong."""
        name = text.removeprefix(DOCKER_PREFIX)

        def bad(why: str) -> UsageError:
            return UsageError(f"invalid image reference {text!r}: {why}")

        name, at, digest = name.partition("@")
        if at and sha256_hex(digest) is None:
            raise bad(f"{digest!r} is not a sha256 digest (sha256:<64 hex digits>)")
        tag = None
        last_slash = name.rfind("/")
        colon = name.rfind(":")
        if colon > last_slash:
            name, tag = name[:colon], name[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise bad(f"{tag!r} is not a valid tag")
        if at and tag:
            raise bad("a tag and a digest together are not supported (name one)")
        first, slash, rest = name.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            if not _HOST.fullmatch(first):
                raise bad(f"{first!r} is not a registry host")
            registry, repository = first, rest
        else:
            registry, repository = DOCKER_HUB, name
        if registry == DOCKER_HUB and repository and "/" not in repository:
            repository = "library/" + repository
        if not repository:
            raise bad("no repository (docker://HOST[:PORT]/REPOSITORY[:TAG])")
        for part in repository.split("/"):
            if not _COMPONENT.fullmatch(part):
                raise bad(
                    f"repository component {part!r} is not lowercase letters, digits and separators"
                )
        return cls(registry, repository, None if at else tag or DEFAULT_TAG, digest or None)


# ---------------------------------------------------------------- archives


@dataclass(frozen=True, slots=True)
class OCIArchiveRef:
    """An image in a tar of an OCI image layout, optionally by tag (skopeo's `oci-archive:`)."""

    path: Path
    tag: str | None

    def __str__(self) -> str:
        return f"oci-archive:{self.path}" + (f":{self.tag}" if self.tag else "")

    def with_tag(self, tag: str) -> OCIArchiveRef:
        return OCIArchiveRef(self.path, tag)


@dataclass(frozen=True, slots=True)
class DockerArchiveRef:
    """An image in what `docker save` writes (skopeo's `docker-archive:`), read only.

    `tag` is a normalized docker name (`docker.io/library/app:1`) matched against the
    archive's RepoTags, `@N` for its Nth image, or None for its only image.
    """

    path: Path
    tag: str | None

    def __str__(self) -> str:
        return f"docker-archive:{self.path}" + (f":{self.tag}" if self.tag else "")

    def with_tag(self, tag: str) -> DockerArchiveRef:
        return DockerArchiveRef(self.path, tag)


ImageRef = OCIRef | ContainerdRef | RegistryRef | OCIArchiveRef | DockerArchiveRef


def parse(text: str) -> ImageRef:
    """`oci:DIR[:TAG]` is an OCI layout, `docker://…` an image in a registry; any other
    `TRANSPORT://` is an error (exit 2); anything else names an image in containerd."""
    if text.startswith(DOCKER_PREFIX):
        return RegistryRef.parse(text)
    archive = _parse_archive(text)
    if archive is not None:
        return archive
    if (m := _TRANSPORT.match(text)) is not None:
        raise UsageError(
            f"invalid image reference {text!r}: unknown transport {m.group()!r} "
            "(use docker://, oci:, oci-archive:, docker-archive: or a containerd image name)"
        )
    if not text.startswith("oci:"):
        if not text or any(c.isspace() for c in text):
            raise EstargzOptError(f"invalid image reference {text!r}")
        _refuse_misspelled_transport(text)
        return ContainerdRef(text)
    rest = text[len("oci:") :]
    path, _, tag = rest.partition(":")
    if not path:
        raise EstargzOptError(f"invalid image reference {text!r}: no directory")
    return OCIRef(Path(path), tag or None)


def _refuse_misspelled_transport(text: str) -> None:
    """A UsageError for a transport spelled wrong (`docker:/x`), which would otherwise be
    taken for a containerd image name and fail later on the containerd socket."""
    m = _TRANSPORT_LIKE.match(text)
    if m is None:
        return
    right = _SPELLING.get(m.group(1).lower())
    raise UsageError(
        f"invalid image reference {text!r}: {m.group()!r} is not a transport"
        + (f" (did you mean {right}?)" if right else " nor part of an image name")
        + "; use docker://, oci:, oci-archive:, docker-archive: or a containerd image name"
    )


_OCI_ARCHIVE = "oci-archive:"
_DOCKER_ARCHIVE = "docker-archive:"


def _parse_archive(text: str) -> OCIArchiveRef | DockerArchiveRef | None:
    """An archive reference, split at the first colon after the prefix as skopeo does."""
    for prefix in (_OCI_ARCHIVE, _DOCKER_ARCHIVE):
        if text.startswith(prefix):
            break
    else:
        return None
    path, _, tag = text[len(prefix) :].partition(":")
    if not path:
        raise UsageError(f"invalid image reference {text!r}: no archive path")
    if prefix == _OCI_ARCHIVE:
        return OCIArchiveRef(Path(path), tag or None)
    if not tag:
        return DockerArchiveRef(Path(path), None)
    if tag.startswith("@"):
        if not tag[1:].isdigit():
            raise UsageError(f"invalid image reference {text!r}: @N needs an image number")
        return DockerArchiveRef(Path(path), f"@{int(tag[1:])}")
    return DockerArchiveRef(Path(path), docker_name(tag, text))


def docker_name(name: str, where: str) -> str:
    """`NAME[:TAG]` normalized as docker does (`app` is `docker.io/library/app:latest`),
    so that names written either way match. Digests are refused: an archive names its
    images by tag."""
    if "@" in name:
        raise UsageError(f"invalid image reference {where!r}: archives name images by tag")
    try:
        ref = RegistryRef.parse(DOCKER_PREFIX + name)
    except UsageError:
        raise UsageError(
            f"invalid image reference {where!r}: {name!r} is not a docker NAME:TAG"
        ) from None
    return f"{ref.registry}/{ref.repository}:{ref.tag}"
