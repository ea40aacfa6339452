"""Files that appear whole or not at all: written beside their target, then renamed.

A leaf module (it imports nothing of the project): the format engine writes converted
layers through it, the OCI layout store its blobs and index.json.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def temp_file(directory: Path, prefix: str) -> tuple[BinaryIO, Path]:
    """A new, open, world-readable temporary file in `directory`, and its path.

    mkstemp's mode 0600 would leave blobs unreadable to other users once renamed.
    """
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        return os.fdopen(fd, "w+b"), Path(tmp)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], prefix: str | None = None, *, into_special: bool = True
) -> Iterator[BinaryIO]:
    """A temporary file beside `path` that replaces it (synced) only if the block succeeds.

    `prefix` names the temporary file (default `.NAME.`), e.g. after its owner. A `path`
    that exists and is not a regular file (`/dev/null`, `/dev/stdout`, a FIFO) is written
    in place: renaming over it would replace a device node with a file. With
    `into_special` False nothing is ever written in place: whatever is at `path` (a
    symlink or device someone planted there) is replaced.
    """
    target = Path(path)
    try:
        special = into_special and not stat.S_ISREG(os.stat(target).st_mode)
    except FileNotFoundError:
        special = False
    if special:
        with open(target, "wb") as out:
            yield out
        return
    f, tmp = temp_file(target.parent, prefix or f".{target.name}.")
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(
    path: Path, data: bytes, prefix: str | None = None, *, into_special: bool = True
) -> None:
    """Replace `path` with `data` in one step (see atomic_output for `into_special`)."""
    with atomic_output(path, prefix, into_special=into_special) as f:
        f.write(data)
