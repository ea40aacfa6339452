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


def parse(text: str) -> OCIRef:
    if not text.startswith("oci:"):
        raise EstargzOptError(
            f"unsupported image reference {text!r}: use oci:DIR[:TAG] (an OCI image layout)"
        )
    rest = text[len("oci:") :]
    path, _, tag = rest.partition(":")
    if not path:
        raise EstargzOptError(f"invalid image reference {text!r}: no directory")
    return OCIRef(Path(path), tag or None)
