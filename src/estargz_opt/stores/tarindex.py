"""Random access to the files of an (uncompressed) tar, for the archive stores.

One pass over the tar's headers records where each regular file's data lies, so a blob
is then read in place, by offset, and nothing is extracted. Links (docker save writes
symlinks for layers two images share) resolve to the file they name.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from estargz_opt.constants import IO_CHUNK
from estargz_opt.descriptor import Descriptor
from estargz_opt.digest import digest_of, hasher, sha256_digest
from estargz_opt.errors import BadInputError, EstargzOptError
from estargz_opt.magic import sniff
from estargz_opt.stores import check_blob

_BLOCK = 512
#: links followed before a name is declared a loop
_MAX_HOPS = 16


@dataclass(frozen=True, slots=True)
class Member:
    """Where a regular file's data lies in the tar."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class TarIndex:
    """The regular files of a tar by normalized name (`./a/b` and `a/b` are one name)."""

    path: Path
    members: dict[str, Member]

    @classmethod
    def scan(cls, path: Path, what: str) -> TarIndex:
        """Index the tar at `path` (`what` names it in errors: "oci-archive:PATH")."""
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise EstargzOptError(f"cannot read {what}: {exc.strerror}") from None
        with f:
            if not f.seekable():
                raise BadInputError(
                    f"{what} is a pipe or other stream: an archive is read by offset, so it "
                    f"must be a file (save it to one first)"
                )
            kind = sniff(f.read(4))
            if kind != "none":
                raise BadInputError(
                    f"{what} is {kind}-compressed; archives are read as plain tar files "
                    f"(decompress it first)"
                )
            f.seek(0)
            files, links = _scan(f, what)
        members = dict(files)
        for name in links:  # a dangling link matters only if a blob needs it: left out
            if (resolved := _follow(name, files, links)) is not None:
                members[name] = resolved
        return cls(path, members)

    def get(self, name: str) -> Member | None:
        return self.members.get(_norm(name))

    def chunks(self, member: Member) -> Iterator[bytes]:
        """The member's data in pieces of at most 1 MiB."""
        with open(self.path, "rb") as f:
            f.seek(member.offset)
            left = member.size
            while left:
                block = f.read(min(left, IO_CHUNK))
                if not block:
                    raise BadInputError(f"{self.path} is truncated inside {member.name}")
                left -= len(block)
                yield block

    def head(self, member: Member, n: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(member.offset)
            return f.read(min(n, member.size))

    def read(self, member: Member) -> bytes:
        return b"".join(self.chunks(member))

    def digest(self, member: Member) -> str:
        h = hasher()
        for block in self.chunks(member):
            h.update(block)
        return digest_of(h)

    # ---------------------------------------------------------------- checked reads

    def read_checked(self, member: Member, desc: Descriptor, what: str) -> bytes:
        data = self.read(member)
        check_blob(desc, sha256_digest(data), len(data), what)
        return data

    def stream_checked(self, member: Member, desc: Descriptor, what: str) -> Iterator[bytes]:
        """The member's data, checked against `desc` once read to its end."""
        h = hasher()
        size = 0
        for block in self.chunks(member):
            h.update(block)
            size += len(block)
            yield block
        check_blob(desc, digest_of(h), size, what)

    @contextlib.contextmanager
    def local_copy(self, member: Member, desc: Descriptor, what: str) -> Iterator[Path]:
        """A checked temporary copy of one member (the format engine reads files), removed
        when the block ends."""
        with tempfile.NamedTemporaryFile(prefix="estargz-opt-blob-") as tmp:
            for block in self.stream_checked(member, desc, what):
                tmp.write(block)
            tmp.flush()
            yield Path(tmp.name)


def _scan(f: BinaryIO, what: str) -> tuple[dict[str, Member], dict[str, str]]:
    """Regular files and links (name -> target name) of the tar open as `f`."""
    files: dict[str, Member] = {}
    links: dict[str, str] = {}
    size = os.fstat(f.fileno()).st_size
    try:
        with tarfile.TarFile(fileobj=f, mode="r") as tar:
            while (info := tar.next()) is not None:
                name = _norm(info.name)
                if info.isreg():
                    if info.offset_data + info.size > size:
                        raise BadInputError(f"{what} is truncated (inside {info.name})")
                    files[name] = Member(name, info.offset_data, info.size)
                elif info.issym():
                    links[name] = _norm(posixpath.join(posixpath.dirname(name), info.linkname))
                elif info.islnk():
                    links[name] = _norm(info.linkname)
            end = tar.offset
    except (tarfile.TarError, EOFError, ValueError, UnicodeError) as exc:
        raise BadInputError(f"{what} is not a readable tar archive: {exc}") from None
    f.seek(end)
    marker = f.read(_BLOCK)
    if len(marker) < _BLOCK or marker.count(0) != _BLOCK:
        # tarfile stops quietly at a header cut short or garbled; a whole tar ends in zeros
        raise BadInputError(f"{what} is truncated or corrupt at byte {end} (no end-of-archive)")
    return files, links


def _follow(name: str, files: dict[str, Member], links: dict[str, str]) -> Member | None:
    for _ in range(_MAX_HOPS):
        if name in files:
            return files[name]
        if name not in links:
            return None
        name = links[name]
    return None


def _norm(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")
