"""A tar of an OCI image layout (skopeo's `oci-archive:PATH[:TAG]`) as a store.

Read in place: one pass over the tar's headers finds every blob (tarindex.py), which is
then read by offset; nothing is extracted but the one layer the format engine converts
(`local_file`).

Written at `tag`, the run's last step: the blobs the run commits wait as files in one
private temporary directory beside the archive. `tag` streams the archive's previous
blobs (an archive keeps its other images, as a layout does), the new blobs, index.json
and oci-layout into a temporary file that then replaces the archive in one rename. A
failed run removes its directory, and any later run writing beside it removes the
directories and files of runs that were killed (their owner is in the name, owner.py).
Runs writing one archive at the same time all keep their images: `tag` holds an exclusive
flock on the archive's directory and starts from the archive as it is then.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, Self

from estargz_opt.atomic import atomic_output, temp_file
from estargz_opt.constants import IO_CHUNK
from estargz_opt.descriptor import OCI_INDEX, Descriptor, Index
from estargz_opt.digest import sha256_digest, sha256_hex
from estargz_opt.errors import BadInputError, EstargzOptError
from estargz_opt.stores import check_blob, write_through_sink
from estargz_opt.stores.oci import (
    LAYOUT_FILE,
    FileSink,
    file_sink,
    lock_dir,
    resolve_in,
    retag,
    stream_file_checked,
)
from estargz_opt.stores.owner import is_dead, temp_owner, temp_prefix
from estargz_opt.stores.tarindex import Member, TarIndex

log = logging.getLogger("estargz_opt")

_KIND = "oci-archive"
_BLOBS = "blobs/sha256/"


class OCIArchive:
    """An OCI archive as a Store; `create` opens it as a destination (it may not exist)."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = path
        self.what = f"oci-archive:{path}"
        #: the archive as it is on disk; None: there is none yet (a new destination)
        self._tar: TarIndex | None = None
        self._index = Index(media_type=OCI_INDEX, manifests=[], extra={"schemaVersion": 2})
        #: the run's private directory of committed blobs (a destination only)
        self._work: Path | None = None
        self._new: dict[str, Path] = {}
        #: what the archive on disk was when read (another run may replace it meanwhile)
        self._identity: tuple[int, ...] | None = None
        self._lock = threading.Lock()
        if not create or path.exists():
            self._open()
        if create:
            self._start_writing()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._drop_work()

    def _open(self) -> None:
        self._identity = _identity(self.path)
        self._tar = TarIndex.scan(self.path, self.what)
        member = self._tar.get("index.json")
        if member is None:
            raise BadInputError(f"{self.what} is not an OCI archive (no index.json)")
        self._index = Index.parse(self._tar.read(member), f"{self.what}/index.json")

    # ------------------------------------------------------------------ reading

    def resolve(self, name: str | None) -> Descriptor:
        return resolve_in(self._index, name, self.what, "oci-archive:PATH:TAG")

    def _member(self, digest: str) -> Member | None:
        hexpart = sha256_hex(digest)
        if hexpart is None or self._tar is None:
            return None
        return self._tar.get(_BLOBS + hexpart)

    def _source(self, desc: Descriptor, what: str) -> Path | Member:
        with self._lock:
            new = self._new.get(desc.digest)
        if new is not None:
            return new
        member = self._member(desc.digest)
        if member is None:
            raise BadInputError(f"missing blob {desc.digest} ({what}) in {self.what}")
        return member

    def read(self, desc: Descriptor, what: str) -> bytes:
        src = self._source(desc, what)
        if isinstance(src, Member):
            assert self._tar is not None
            return self._tar.read_checked(src, desc, what)
        data = src.read_bytes()
        check_blob(desc, sha256_digest(data), len(data), what)
        return data

    def size_of(self, digest: str) -> int | None:
        with self._lock:
            new = self._new.get(digest)
        if new is not None:
            return new.stat().st_size
        member = self._member(digest)
        return member.size if member else None

    def holds(self, digest: str, size: int) -> bool:
        # Every blob of the archive is carried into the one `tag` writes.
        return self.size_of(digest) == size

    def stream(self, desc: Descriptor, what: str) -> Iterator[bytes]:
        src = self._source(desc, what)
        if isinstance(src, Member):
            assert self._tar is not None
            yield from self._tar.stream_checked(src, desc, what)
            return
        yield from stream_file_checked(src, desc, what)

    @contextlib.contextmanager
    def local_file(self, desc: Descriptor, what: str) -> Iterator[Path]:
        src = self._source(desc, what)
        if isinstance(src, Member):
            assert self._tar is not None
            with self._tar.local_copy(src, desc, what) as path:
                yield path
            return
        for _ in self.stream(desc, what):  # already a file of this run: only check it
            pass
        yield src

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes, source: Descriptor | None = None) -> None:
        write_through_sink(self, data)

    @contextlib.contextmanager
    def sink(self, source: Descriptor | None = None) -> Iterator[FileSink]:
        work = self._start_writing()
        try:
            f, tmp = temp_file(work, "ingest-")
        except OSError as exc:
            raise EstargzOptError(f"cannot write {self.what}: {exc.strerror}") from None
        with file_sink(f, tmp, self._place) as sink:
            yield sink

    def _place(self, tmp: Path, digest: str) -> None:
        hexpart = sha256_hex(digest)
        if hexpart is None:
            raise BadInputError(f"unsupported or malformed digest {digest!r}")
        final = tmp.with_name(hexpart)
        with self._lock:
            if digest in self._new or self._member(digest) is not None:
                tmp.unlink()
                return
            os.replace(tmp, final)
            self._new[digest] = final

    def tag(self, tags: Mapping[str, Descriptor]) -> None:
        """Write the archive: its previous blobs, this run's, and the index with `tags`.

        Under an exclusive flock on the archive's directory, and from the archive as it
        is then: runs that wrote it since this one read it keep their images (every
        write keeps every blob, so what this run's images use is still there)."""
        try:
            fd = lock_dir(self.path.parent, fcntl.LOCK_EX)
            if fd is None:
                raise FileNotFoundError(2, os.strerror(2), str(self.path.parent))
            try:
                if _identity(self.path) != self._identity:
                    if self._identity is not None and not self.path.exists():
                        raise EstargzOptError(f"{self.what} was removed during the run")
                    self._open()
                index = Index(
                    self._index.media_type, list(self._index.manifests), dict(self._index.extra)
                )
                retag(index, tags)
                with atomic_output(self.path, temp_prefix(_KIND)) as out:
                    self._write_tar(out, index)
            finally:
                os.close(fd)
        except OSError as exc:
            raise EstargzOptError(f"cannot write {self.what}: {exc.strerror}") from None
        self._drop_work()
        self._open()

    def _write_tar(self, out: BinaryIO, index: Index) -> None:
        with tarfile.TarFile(fileobj=out, mode="w", copybufsize=IO_CHUNK) as tar:
            for name in ("blobs", "blobs/sha256"):
                tar.addfile(_info(name, 0, tarfile.DIRTYPE))
            if self._tar is not None:
                # Every blob name the archive had, as a regular file: a blob held by a
                # symlink or hardlink member (to a file outside blobs/ or another blob)
                # is read through it, so it is written whole, never dropped.
                with open(self._tar.path, "rb") as old:
                    for name, member in sorted(self._tar.members.items()):
                        if name.startswith(_BLOBS):
                            old.seek(member.offset)
                            tar.addfile(_info(name, member.size), old)
            for digest, path in sorted(self._new.items()):
                if self._member(digest) is not None:  # another run wrote it meanwhile
                    continue
                with open(path, "rb") as f:
                    tar.addfile(_info(_BLOBS + path.name, os.fstat(f.fileno()).st_size), f)
            for name, data in (("index.json", index.to_bytes()), ("oci-layout", LAYOUT_FILE)):
                tar.addfile(_info(name, len(data)), io.BytesIO(data))

    def rollback(self) -> None:
        self._drop_work()

    def _start_writing(self) -> Path:
        """The run's private directory beside the archive (made on first use)."""
        with self._lock:
            if self._work is None:
                parent = self.path.parent
                try:
                    self._work = Path(
                        tempfile.mkdtemp(dir=parent, prefix=temp_prefix(_KIND), suffix=".tmp")
                    )
                except OSError as exc:
                    raise EstargzOptError(f"cannot write {self.what}: {exc.strerror}") from None
                _remove_dead(parent)
            return self._work

    def _drop_work(self) -> None:
        with self._lock:
            work, self._work = self._work, None
            self._new = {}
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def _identity(path: Path) -> tuple[int, ...] | None:
    """Which file `path` is now (None: none): a rename over it changes this."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _info(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def _remove_dead(where: Path) -> None:
    """Delete what killed runs left beside an archive: work directories, partial tars."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(where):
            owner = temp_owner(entry.name)
            if entry.name.startswith(f".{_KIND}@") and owner is not None and is_dead(owner):
                log.info("deleting %s, left by a run that was killed", entry.path)
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
