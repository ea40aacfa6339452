"""What compression a blob's first bytes say it has. A leaf (imports nothing of the
project): the format engine opens layers by it, the archive stores type layers by it."""

from __future__ import annotations

GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def sniff(head: bytes) -> str:
    """ "gzip", "zstd" or "none" (a plain tar, or anything else) for a blob's first 4 bytes."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"
