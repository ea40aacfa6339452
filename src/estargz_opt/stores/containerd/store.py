"""containerd's content store and image service as a Store, the way ctr-remote uses them.

The whole run holds a lease, so garbage collection never takes content that is still
being written; when the run fails the lease goes and so does everything it wrote. New
blobs carry the labels upstream gives them: the source blob's labels, the DiffID as
`containerd.io/uncompressed`, and GC references from manifests and indexes to children.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

from estargz_opt.descriptor import Descriptor, load_json
from estargz_opt.errors import BadInputError, EstargzOptError
from estargz_opt.stores.containerd.client import (
    Client,
    ContentNotFoundError,
    Image,
    ImageNotFoundError,
    NamespaceNotFoundError,
)

UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
GC_CONTENT = "containerd.io/gc.ref.content"
_READ = 1 << 20


class _Sink:
    def __init__(self, store: ContainerdStore, f: BinaryIO, source: Descriptor | None) -> None:
        self.file = f
        self._store = store
        self._source = source

    def commit(self, digest: str, size: int, diff_id: str | None = None) -> None:
        self.file.flush()
        self.file.seek(0)
        labels = self._store.source_labels(self._source)
        if diff_id:
            labels[UNCOMPRESSED_LABEL] = diff_id
        self._store.upload(self.file, digest, size, labels)


class ContainerdStore:
    """Images of one containerd namespace, used inside a lease (use it as a context manager)."""

    def __init__(self, client: Client, tmp_dir: str | None = None) -> None:
        self.client = client
        self._tmp_dir = tmp_dir
        self._stack = ExitStack()

    def __enter__(self) -> ContainerdStore:
        # Check first: taking a lease in a namespace that does not exist would create it.
        if not self.client.namespace_exists(self.client.namespace):
            raise NamespaceNotFoundError(self.client._no_namespace_message())
        self._stack.enter_context(self.client.lease(labels={"estargz-opt": "optimize"}))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def where(self) -> str:
        return f"containerd namespace {self.client.namespace!r} at {self.client.address}"

    # ------------------------------------------------------------------ reading

    def resolve(self, name: str | None) -> Descriptor:
        if not name:
            raise EstargzOptError("name an image in containerd")
        try:
            return self.client.get_image(name).target
        except ImageNotFoundError:
            raise EstargzOptError(f"image {name!r} not found in {self.where}") from None

    def read(self, desc: Descriptor, what: str) -> bytes:
        try:
            data = self.client.read_all(desc.digest, verify=False)
        except ContentNotFoundError:
            raise self._missing(desc, what) from None
        if len(data) != desc.size or "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest:
            raise BadInputError(f"blob {desc.digest} ({what}) does not match its digest or size")
        return data

    @contextlib.contextmanager
    def local_file(self, desc: Descriptor, what: str) -> Iterator[Path]:
        h = hashlib.sha256()
        size = 0
        # An anonymous file: nothing is left in TMPDIR even if the process is killed.
        with tempfile.TemporaryFile(dir=self._tmp_dir, prefix="estargz-opt-") as f:
            try:
                for block in self.client.read_content(desc.digest):
                    f.write(block)
                    h.update(block)
                    size += len(block)
            except ContentNotFoundError:
                raise self._missing(desc, what) from None
            f.flush()
            if size != desc.size or "sha256:" + h.hexdigest() != desc.digest:
                raise BadInputError(
                    f"blob {desc.digest} ({what}) does not match its digest or size"
                )
            yield Path(f"/proc/self/fd/{f.fileno()}")

    def _missing(self, desc: Descriptor, what: str) -> BadInputError:
        return BadInputError(
            f"missing blob {desc.digest} ({what}) in {self.where}: the image was pulled for "
            "another platform only, or lazily; pull it in full (ctr images pull "
            "--platform/--all-platforms) first"
        )

    def source_labels(self, source: Descriptor | None) -> dict[str, str]:
        """Labels of the blob a new one replaces (e.g. distribution sources), minus GC refs."""
        if source is None:
            return {}
        try:
            labels = self.client.content_info(source.digest).labels
        except ContentNotFoundError:
            return {}
        return {
            k: v
            for k, v in labels.items()
            if not k.startswith(GC_CONTENT) and k != UNCOMPRESSED_LABEL
        }

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes, source: Descriptor | None = None) -> None:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        labels = self.source_labels(source) | _gc_labels(data)
        self.upload(data, digest, len(data), labels)

    @contextlib.contextmanager
    def sink(self, source: Descriptor | None = None) -> Iterator[_Sink]:
        with tempfile.TemporaryFile(dir=self._tmp_dir, prefix="estargz-opt-") as f:
            yield _Sink(self, f, source)

    def upload(
        self, data: bytes | BinaryIO, digest: str, size: int, labels: Mapping[str, str]
    ) -> None:
        # A ref named after the content lets a rerun resume an interrupted upload.
        self.client.write_content(
            f"estargz-opt-{digest}", data, expected_digest=digest, expected_size=size, labels=labels
        )

    def tag(self, tags: Mapping[str, Descriptor]) -> None:
        for name, desc in tags.items():
            self.client.put_image(Image(name=name, target=desc))

    def rollback(self) -> None:
        """Nothing to undo by hand: unreferenced content goes with the lease."""


def _gc_labels(data: bytes) -> dict[str, str]:
    """GC references from a manifest or index to its children, as containerd expects."""
    try:
        raw = load_json(data, "blob")
    except BadInputError:
        return {}
    labels: dict[str, str] = {}
    if isinstance(raw.get("config"), dict) and isinstance(raw["config"].get("digest"), str):
        labels[f"{GC_CONTENT}.config"] = raw["config"]["digest"]
    for key, short in (("layers", "l"), ("manifests", "m")):
        items = raw.get(key)
        if isinstance(items, list):
            for i, item in enumerate(items):
                if isinstance(item, dict) and isinstance(item.get("digest"), str):
                    labels[f"{GC_CONTENT}.{short}.{i}"] = item["digest"]
    return labels
