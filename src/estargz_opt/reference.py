"""Image references on the command line, as skopeo spells them: `oci:DIR[:TAG]`,
`oci-archive:PATH[:TAG]`, `docker-archive:PATH[:NAME:TAG]`; anything else names an image
in containerd."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

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


ImageRef = OCIRef | ContainerdRef | OCIArchiveRef | DockerArchiveRef


def parse(text: str) -> ImageRef:
    """`oci:DIR[:TAG]` is an OCI layout; anything else names an image in containerd."""
    archive = _parse_archive(text)
    if archive is not None:
        return archive
    if not text.startswith("oci:"):
        if not text or any(c.isspace() for c in text):
            raise EstargzOptError(f"invalid image reference {text!r}")
        return ContainerdRef(text)
    rest = text[len("oci:") :]
    path, _, tag = rest.partition(":")
    if not path:
        raise EstargzOptError(f"invalid image reference {text!r}: no directory")
    return OCIRef(Path(path), tag or None)


_OCI_ARCHIVE = "oci-archive:"
_DOCKER_ARCHIVE = "docker-archive:"
#: a docker name component and a tag (distribution's reference grammar)
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")


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
    repo, tag = name, "latest"
    colon = name.rfind(":")
    if colon > name.rfind("/"):  # a colon before the last slash is a registry's port
        repo, tag = name[:colon], name[colon + 1 :]
    first, _, rest = repo.partition("/")
    if not rest or ("." not in first and ":" not in first and first != "localhost"):
        first, rest = "docker.io", repo
    if first == "docker.io" and "/" not in rest:
        rest = "library/" + rest
    if not _TAG.fullmatch(tag) or not all(_COMPONENT.fullmatch(c) for c in rest.split("/")):
        raise UsageError(f"invalid image reference {where!r}: {name!r} is not a docker NAME:TAG")
    return f"{first}/{rest}:{tag}"
