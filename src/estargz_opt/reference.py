"""Image references on the command line: `oci:DIR[:TAG]`, `docker://…` (a registry), and
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


ImageRef = OCIRef | ContainerdRef | RegistryRef


def parse(text: str) -> ImageRef:
    """`oci:DIR[:TAG]` is an OCI layout, `docker://…` an image in a registry; any other
    `TRANSPORT://` is an error (exit 2); anything else names an image in containerd."""
    if text.startswith(DOCKER_PREFIX):
        return RegistryRef.parse(text)
    if (m := _TRANSPORT.match(text)) is not None:
        raise UsageError(
            f"invalid image reference {text!r}: unknown transport {m.group()!r} "
            "(use docker://, oci: or a containerd image name)"
        )
    if not text.startswith("oci:"):
        if not text or any(c.isspace() for c in text):
            raise EstargzOptError(f"invalid image reference {text!r}")
        return ContainerdRef(text)
    rest = text[len("oci:") :]
    path, _, tag = rest.partition(":")
    if not path:
        raise EstargzOptError(f"invalid image reference {text!r}: no directory")
    return OCIRef(Path(path), tag or None)
