"""Image references on the command line: `oci:DIR[:TAG]` today, containerd names later."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from estargz_opt.errors import EstargzOptError


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


ImageRef = OCIRef | ContainerdRef


def parse(text: str) -> ImageRef:
    """`oci:DIR[:TAG]` is an OCI layout; anything else names an image in containerd."""
    if not text.startswith("oci:"):
        if not text or any(c.isspace() for c in text):
            raise EstargzOptError(f"invalid image reference {text!r}")
        return ContainerdRef(text)
    rest = text[len("oci:") :]
    path, _, tag = rest.partition(":")
    if not path:
        raise EstargzOptError(f"invalid image reference {text!r}: no directory")
    return OCIRef(Path(path), tag or None)
