"""Content digests as OCI writes them ("sha256:<64 lowercase hex>").

A leaf module (it imports nothing of the project), so the format engine, the stores
and the CLI all name blobs the same way.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

ALGORITHM = "sha256"
PREFIX = ALGORITHM + ":"
_HEX = frozenset("0123456789abcdef")


class Hasher(Protocol):
    """What hashlib's sha256() objects offer (they have no public type)."""

    @property
    def name(self) -> str: ...

    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def hasher() -> Hasher:
    """A fresh sha256, for digests computed while streaming."""
    return hashlib.sha256()


def digest_of(h: Hasher) -> str:
    """The digest a streaming hasher has reached ("sha256:…")."""
    return f"{h.name}:{h.hexdigest()}"


def sha256_digest(data: bytes | memoryview) -> str:
    """The digest of a whole blob in memory."""
    return PREFIX + hashlib.sha256(data).hexdigest()


def sha256_hex(digest: str) -> str | None:
    """The hex part of a well-formed sha256 digest, or None for any other string."""
    algo, _, hexpart = digest.partition(":")
    if algo != ALGORITHM or len(hexpart) != 64 or not _HEX.issuperset(hexpart):
        return None
    return hexpart


def digest_tag(digest: str, suffix: str = "") -> str:
    """The tag naming something attached to `digest` ("sha256:ab" -> "sha256-ab" + suffix):
    cosign's `.sig`/`.att` tags and the OCI referrers tag schema (no suffix) share it,
    since a tag cannot hold a colon."""
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}-{hexpart}{suffix}"


def hasher_for(digest: str) -> Hasher | None:
    """A fresh hasher of the digest's algorithm, or None if hashlib does not know it."""
    algo = digest.partition(":")[0]
    return hashlib.new(algo) if algo in hashlib.algorithms_available else None


def matches(digest: str, data: bytes | memoryview) -> bool:
    """Whether `data` has `digest`. A digest of an algorithm hashlib lacks cannot be
    checked here and counts as matching (containerd verifies it on commit)."""
    h = hasher_for(digest)
    if h is None:
        return True
    h.update(data)
    return digest_of(h) == digest
