"""An OCI image layout directory (oci-layout, index.json, blobs/sha256/…) as a store.

Blobs are written under temporary names and renamed into place once complete; the tag
in index.json is written last and atomically. A failed run removes the blobs it added
(and the layout directory, if it created it and nothing else is in it), so the
destination is left as it was.

Several runs may write into one layout at once. Two flocks, on directories every layout
has (so no lock file is left behind), keep them from losing each other's work:

* ``index.json`` is updated under an exclusive lock on the layout directory, and re-read
  under it, so concurrent tags all land;
* every run that writes holds a shared lock on ``blobs/`` until it ends. A blob that is
  already present is not written again, so a live run may depend on a blob another run
  added; a rollback therefore deletes only under an exclusive *try*-lock on ``blobs/``
  (no other writer is alive) and only blobs that no image in the re-read index
  references. If other runs are alive it deletes nothing and says so; ``verify`` lists
  such unreferenced blobs.

Temporary files carry their writer's owner (see stores/owner.py), so any run that opens
the layout for writing removes those of runs that were killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, Self

from estargz_opt.atomic import atomic_write, temp_file
from estargz_opt.constants import IO_CHUNK, MAX_MANIFEST_SIZE, REF_NAME_ANNOTATION
from estargz_opt.descriptor import (
    LAYER_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    Descriptor,
    Index,
    load_json,
)
from estargz_opt.digest import digest_of, digest_tag, hasher, sha256_digest, sha256_hex
from estargz_opt.errors import BadInputError, EstargzOptError
from estargz_opt.stores import check_blob, write_through_sink
from estargz_opt.stores.owner import is_dead, temp_owner, temp_prefix

log = logging.getLogger("estargz_opt")

#: the oci-layout file every layout (and OCI archive) holds
LAYOUT_FILE = b'{"imageLayoutVersion":"1.0.0"}'
#: Larger blobs are layers, not manifests or indexes: not read to find references.


def stream_file_checked(path: Path, desc: Descriptor, what: str) -> Iterator[bytes]:
    """A blob file as a stream of pieces, checked against `desc` once read to its end
    (the OCI layout's blobs, and the OCI archive's blobs committed by this run)."""
    h = hasher()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(IO_CHUNK):
            h.update(block)
            size += len(block)
            yield block
    check_blob(desc, digest_of(h), size, what)


class FileSink:
    """A blob written to a temporary file, which `place` moves under its digest on
    commit (the OCI layout's and the OCI archive's sinks)."""

    def __init__(self, f: BinaryIO, place: Callable[[Path, str], None], tmp: Path) -> None:
        self.file = f
        self._place = place
        self._tmp = tmp
        self.committed = False

    def commit(self, digest: str, size: int, diff_id: str | None = None) -> None:
        self.file.flush()
        self._place(self._tmp, digest)
        self.committed = True


@contextlib.contextmanager
def file_sink(f: BinaryIO, tmp: Path, place: Callable[[Path, str], None]) -> Iterator[FileSink]:
    """A FileSink on the open temporary file `f` at `tmp`, removed unless committed."""
    sink = None
    try:
        with f:
            sink = FileSink(f, place, tmp)
            yield sink
    finally:
        if sink is None or not sink.committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class OCILayout:
    """An OCI image layout as a Store; while open for writing it holds blobs/ (shared)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_writing()

    def __init__(self, root: Path, *, create: bool = False) -> None:
        self.root = root
        self._created_root = False
        self._added: list[Path] = []
        #: fd of blobs/, share-locked while this run may write (see the module docstring)
        self._writer: int | None = None
        if create:
            if (root / "index.json").exists():
                self.index()  # a damaged index.json fails here, before any blob is written
            self._start_writing()
        elif not (root / "index.json").is_file():
            raise EstargzOptError(f"{root} is not an OCI image layout (no index.json)")

    # ------------------------------------------------------------------ reading

    def index(self) -> Index:
        try:
            data = (self.root / "index.json").read_bytes()
        except FileNotFoundError:
            return Index(media_type=OCI_INDEX, manifests=[], extra={"schemaVersion": 2})
        except OSError as exc:
            raise EstargzOptError(
                f"cannot read {self.root / 'index.json'}: {exc.strerror}"
            ) from None
        return Index.parse(data, f"{self.root}/index.json")

    def resolve(self, name: str | None) -> Descriptor:
        return resolve_in(self.index(), name, str(self.root), "oci:DIR:TAG")

    def has_tag(self, tag: str) -> bool:
        return tag in tags_of(self.index())

    def attach(self, subject: str, referrer: Descriptor) -> None:
        """An untagged index.json entry, where `referrers` (and oras) look for it."""
        self._start_writing()
        try:
            with self._index_locked():
                index = self.index()
                if any(m.digest == referrer.digest for m in index.manifests):
                    return
                index.manifests.append(referrer)
                atomic_write(
                    self.root / "index.json", index.to_bytes(), prefix=temp_prefix("index.json")
                )
        except OSError as exc:
            raise EstargzOptError(
                f"cannot write {self.root / 'index.json'}: {exc.strerror}"
            ) from None

    def referrers(self, digest: str) -> list[Descriptor]:
        """A layout has no referrers API: the manifests of index.json whose subject is
        `digest` (where oras and cosign put them), and the tag-schema index if tagged."""
        index = self.index()
        found: list[Descriptor] = []
        tag = digest_tag(digest)
        for desc in index.manifests:
            where = f"{self.root}: manifest {desc.digest}"
            if (desc.annotations or {}).get(REF_NAME_ANNOTATION) == tag:
                found += Index.parse(self.read(desc, where), where).manifests
            elif desc.media_type in MANIFEST_TYPES and desc.digest != digest:
                raw = load_json(self.read(desc, where), where)
                subject, config = raw.get("subject"), raw.get("config")
                if isinstance(subject, dict) and subject.get("digest") == digest:
                    kind = raw.get("artifactType") or (
                        config.get("mediaType") if isinstance(config, dict) else None
                    )
                    found.append(desc.with_changes(artifact_type=str(kind or "")))
        return found

    def blob_path(self, digest: str) -> Path:
        hexpart = sha256_hex(digest)
        if hexpart is None:
            raise BadInputError(f"unsupported or malformed digest {digest!r}")
        return self.root / "blobs" / "sha256" / hexpart

    def read(self, desc: Descriptor, what: str) -> bytes:
        path = self._existing(desc, what)
        data = path.read_bytes()
        check_blob(desc, sha256_digest(data), len(data), what)
        return data

    def size_of(self, digest: str) -> int | None:
        if sha256_hex(digest) is None:
            return None
        path = self.blob_path(digest)
        return path.stat().st_size if path.is_file() else None

    def holds(self, digest: str, size: int) -> bool:
        # A blob in place is never removed while this run lives (it holds blobs/ shared).
        if self.size_of(digest) != size:
            return False
        self._start_writing()
        return self.size_of(digest) == size

    def stream(self, desc: Descriptor, what: str) -> Iterator[bytes]:
        yield from stream_file_checked(self._existing(desc, what), desc, what)

    @contextlib.contextmanager
    def local_file(self, desc: Descriptor, what: str) -> Iterator[Path]:
        for _ in self.stream(desc, what):  # the blob is already a file: only check it
            pass
        yield self.blob_path(desc.digest)

    def _existing(self, desc: Descriptor, what: str) -> Path:
        path = self.blob_path(desc.digest)
        if not path.is_file():
            raise BadInputError(f"missing blob {desc.digest} ({what}) in {self.root}")
        return path

    def referenced(self) -> set[str]:
        """Digests of every blob an image in index.json reaches: the descriptors in every
        small JSON blob reached (manifests, indexes, artifacts). The children of an
        unreadable blob cannot be known and are left out."""
        seen: set[str] = set()
        todo = list(self.index().manifests)
        while todo:
            desc = todo.pop()
            if desc.digest in seen:
                continue
            seen.add(desc.digest)
            if desc.size > MAX_MANIFEST_SIZE or desc.media_type in LAYER_TYPES:
                continue
            try:
                raw = load_json(self.read(desc, "manifest"), desc.digest)
            except EstargzOptError:
                continue
            children = [raw.get("config"), raw.get("subject")]
            for key in ("manifests", "layers", "blobs"):
                if isinstance(raw.get(key), list):
                    children += raw[key]
            for child in children:
                with contextlib.suppress(ValueError, TypeError):
                    todo.append(Descriptor.from_json(child))
        return seen

    def unreferenced(self) -> list[tuple[str, int]]:
        """(digest, size) of the blobs no image in index.json reaches."""
        keep = self.referenced()
        blobs = self.root / "blobs" / "sha256"
        out = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(blobs):
                digest = "sha256:" + entry.name
                if sha256_hex(digest) and digest not in keep and entry.is_file():
                    out.append((digest, entry.stat().st_size))
        return sorted(out)

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes, source: Descriptor | None = None) -> None:
        write_through_sink(self, data)

    @contextlib.contextmanager
    def sink(self, source: Descriptor | None = None) -> Iterator[FileSink]:
        self._start_writing()
        blobs = self.root / "blobs" / "sha256"
        try:
            f, tmp = temp_file(blobs, temp_prefix("ingest"))
        except OSError as exc:
            raise EstargzOptError(f"cannot write blobs to {self.root}: {exc.strerror}") from None
        with file_sink(f, tmp, self._place) as sink:
            yield sink

    def _place(self, tmp: Path, digest: str) -> None:
        final = self.blob_path(digest)
        if final.exists():
            # Another run (alive: it holds blobs/ too) or image may own it: not ours.
            tmp.unlink()
            return
        os.replace(tmp, final)
        self._added.append(final)

    def tag(self, tags: Mapping[str, Descriptor]) -> None:
        self._start_writing()
        try:
            with self._index_locked():
                index = self.index()  # under the lock: other runs' tags since we began
                retag(index, tags)
                atomic_write(
                    self.root / "index.json", index.to_bytes(), prefix=temp_prefix("index.json")
                )
        except OSError as exc:
            raise EstargzOptError(
                f"cannot write {self.root / 'index.json'}: {exc.strerror}"
            ) from None

    def rollback(self) -> None:
        """Remove the blobs this run added that nothing else can need (module docstring),
        and the layout if this run created it and it is empty again."""
        if self._writer is None:
            return
        self._stop_writing()  # our own shared lock would fail the exclusive one
        added, self._added = self._added, []
        try:
            with self._index_locked():
                try:
                    alone = lock_dir(self.root / "blobs", fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    alone = None
                if alone is None:
                    if added:
                        size = sum(p.stat().st_size for p in added if p.exists())
                        log.warning(
                            "left %d blob(s) (%d bytes) in %s: other runs writing into it "
                            "may share them (verify lists blobs no image references)",
                            len(added),
                            size,
                            self.root,
                        )
                    return
                try:
                    keep = self.referenced()
                    for path in added:
                        if "sha256:" + path.name not in keep:
                            with contextlib.suppress(FileNotFoundError):
                                path.unlink()
                    if self._created_root:
                        self._remove_if_empty()
                finally:
                    os.close(alone)
        except (OSError, EstargzOptError) as exc:
            log.warning("could not remove what this run added to %s: %s", self.root, exc)

    def _start_writing(self) -> None:
        """Create the layout if need be and hold blobs/ (shared) until the run ends."""
        if self._writer is not None:
            return
        try:
            while self._writer is None:
                self._init_layout()
                # None: a rollback removed the empty layout meanwhile; create it again
                self._writer = lock_dir(self.root / "blobs", fcntl.LOCK_SH)
        except OSError as exc:
            raise EstargzOptError(
                f"cannot create an OCI layout at {self.root}: {exc.strerror}"
            ) from None
        self._remove_dead_temp_files()

    def _stop_writing(self) -> None:
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None

    @contextlib.contextmanager
    def _index_locked(self) -> Iterator[None]:
        while (fd := lock_dir(self.root, fcntl.LOCK_EX)) is None:
            if not self.root.is_dir():
                raise FileNotFoundError(2, os.strerror(2), str(self.root))
        try:
            yield
        finally:
            os.close(fd)

    def _init_layout(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise EstargzOptError(f"cannot create an OCI layout at {self.root}: not a directory")
        if not self.root.is_dir():
            try:
                self.root.mkdir(parents=True)
                self._created_root = True
            except FileExistsError:  # another run created it just now
                pass
        try:
            (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            if not (self.root / "oci-layout").exists():
                atomic_write(
                    self.root / "oci-layout", LAYOUT_FILE, prefix=temp_prefix("oci-layout")
                )
        except OSError:
            if self._created_root:
                self._remove_if_empty()
            raise

    def _remove_if_empty(self) -> None:
        """Remove the layout skeleton this run created, unless anything else is in it."""
        with contextlib.suppress(OSError):
            if not {e.name for e in os.scandir(self.root)} <= {"oci-layout", "blobs"}:
                return
            blobs = self.root / "blobs"
            if blobs.exists():
                if not {e.name for e in os.scandir(blobs)} <= {"sha256"}:
                    return
                with contextlib.suppress(FileNotFoundError):
                    (blobs / "sha256").rmdir()
                blobs.rmdir()
            with contextlib.suppress(FileNotFoundError):
                (self.root / "oci-layout").unlink()
            self.root.rmdir()

    def _remove_dead_temp_files(self) -> None:
        """Delete the temporary files of runs that were killed (their owner is gone)."""
        for where in (self.root, self.root / "blobs" / "sha256"):
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(where):
                    owner = temp_owner(entry.name)
                    if owner is not None and is_dead(owner):
                        log.info("deleting %s, left by a run that was killed", entry.path)
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)


def resolve_in(index: Index, name: str | None, where: str, form: str) -> Descriptor:
    """The image `name` (its ref.name annotation) of a layout's index, or its only image;
    `form` is how the user names one (`oci:DIR:TAG`)."""
    manifests = index.manifests
    known = ", ".join(tags_of(index)) or "none"
    if name is None:
        if len(manifests) == 1:
            return manifests[0]
        raise EstargzOptError(
            f"{where} holds {len(manifests)} images; name one with {form} (tags: {known})"
        )
    for desc in manifests:
        if (desc.annotations or {}).get(REF_NAME_ANNOTATION) == name:
            return desc
    raise EstargzOptError(f"no image tagged {name!r} in {where} (tags: {known})")


def retag(index: Index, tags: Mapping[str, Descriptor]) -> None:
    """Point each name of `tags` at its descriptor in a layout's index (in place)."""
    kept = [
        d for d in index.manifests if (d.annotations or {}).get(REF_NAME_ANNOTATION) not in tags
    ]
    added = [
        desc.with_changes(annotations={**(desc.annotations or {}), REF_NAME_ANNOTATION: name})
        for name, desc in tags.items()
    ]
    index.manifests = [*kept, *added]


def tags_of(index: Index) -> list[str]:
    return [t for d in index.manifests if (t := (d.annotations or {}).get(REF_NAME_ANNOTATION))]


def lock_dir(path: Path, how: int) -> int | None:
    """An fd of directory `path` holding flock `how`, or None if `path` was removed or
    replaced while we waited (the lock is then on a directory nobody uses: start over).
    With LOCK_NB, BlockingIOError when another process holds a conflicting lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, how)
        now, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        os.close(fd)
        return None
    return fd
