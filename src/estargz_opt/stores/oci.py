"""An OCI image layout directory (oci-layout, index.json, blobs/sha256/…) as a store.

Blobs are written under temporary names and renamed into place once complete; the tag
in index.json is written last and atomically. A failed run removes the blobs it added
(and the layout directory, if it created it), so the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, Self

from estargz_opt.atomic import atomic_write, temp_file
from estargz_opt.descriptor import OCI_INDEX, REF_NAME, Descriptor, Index
from estargz_opt.digest import digest_of, hasher, sha256_digest, sha256_hex
from estargz_opt.errors import BadInputError, EstargzOptError
from estargz_opt.stores import check_blob

_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
_READ = 1 << 20


class _Sink:
    def __init__(self, layout: OCILayout, f: BinaryIO, tmp: Path) -> None:
        self.file = f
        self._layout = layout
        self._tmp = tmp
        self.committed = False

    def commit(self, digest: str, size: int, diff_id: str | None = None) -> None:
        self.file.flush()
        self._layout._place(self._tmp, digest)
        self.committed = True


class OCILayout:
    """An OCI image layout as a Store; it holds nothing while open."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __init__(self, root: Path, *, create: bool = False) -> None:
        self.root = root
        self._created_root = False
        self._added: list[Path] = []
        if not (root / "index.json").is_file():
            if not create:
                raise EstargzOptError(f"{root} is not an OCI image layout (no index.json)")
            self._init_layout()

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
        manifests = self.index().manifests
        if name is None:
            if len(manifests) == 1:
                return manifests[0]
            raise EstargzOptError(
                f"{self.root} holds {len(manifests)} images; name one with oci:DIR:TAG "
                f"(tags: {', '.join(self.tags()) or 'none'})"
            )
        for desc in manifests:
            if (desc.annotations or {}).get(REF_NAME) == name:
                return desc
        raise EstargzOptError(
            f"no image tagged {name!r} in {self.root} (tags: {', '.join(self.tags()) or 'none'})"
        )

    def tags(self) -> list[str]:
        return [t for d in self.index().manifests if (t := (d.annotations or {}).get(REF_NAME))]

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

    def stream(self, desc: Descriptor, what: str) -> Iterator[bytes]:
        path = self._existing(desc, what)
        h = hasher()
        size = 0
        with open(path, "rb") as f:
            while block := f.read(_READ):
                h.update(block)
                size += len(block)
                yield block
        check_blob(desc, digest_of(h), size, what)

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

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes, source: Descriptor | None = None) -> None:
        with self.sink() as s:
            s.file.write(data)
            s.commit(sha256_digest(data), len(data))

    @contextlib.contextmanager
    def sink(self, source: Descriptor | None = None) -> Iterator[_Sink]:
        blobs = self.root / "blobs" / "sha256"
        try:
            blobs.mkdir(parents=True, exist_ok=True)
            f, tmp = temp_file(blobs, ".ingest-")
        except OSError as exc:
            raise EstargzOptError(f"cannot write blobs to {self.root}: {exc.strerror}") from None
        sink = None
        try:
            with f:
                sink = _Sink(self, f, tmp)
                yield sink
        finally:
            if sink is None or not sink.committed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _place(self, tmp: Path, digest: str) -> None:
        final = self.blob_path(digest)
        if final.exists():
            tmp.unlink()
            return
        os.replace(tmp, final)
        self._added.append(final)

    def tag(self, tags: Mapping[str, Descriptor]) -> None:
        index = self.index()
        kept = [d for d in index.manifests if (d.annotations or {}).get(REF_NAME) not in tags]
        added = [
            desc.with_changes(annotations={**(desc.annotations or {}), REF_NAME: name})
            for name, desc in tags.items()
        ]
        index.manifests = [*kept, *added]
        try:
            atomic_write(self.root / "index.json", index.to_bytes())
        except OSError as exc:
            raise EstargzOptError(
                f"cannot write {self.root / 'index.json'}: {exc.strerror}"
            ) from None

    def rollback(self) -> None:
        """Remove what this run added: its blobs, or the whole layout if it created it."""
        if self._created_root:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for path in self._added:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._added.clear()

    def _init_layout(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise EstargzOptError(f"cannot create an OCI layout at {self.root}: not a directory")
        try:
            if not self.root.exists():
                self.root.mkdir(parents=True)
                self._created_root = True
            (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            if not (self.root / "oci-layout").exists():
                atomic_write(self.root / "oci-layout", _LAYOUT)
        except OSError as exc:
            self.rollback()
            raise EstargzOptError(
                f"cannot create an OCI layout at {self.root}: {exc.strerror}"
            ) from None
