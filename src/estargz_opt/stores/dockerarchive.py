"""What `docker save` and `skopeo copy … docker-archive:` write, as a read-only store.

Such an archive has no manifests: `manifest.json` lists each image's config file,
RepoTags and layer files. `resolve` turns the chosen image into a Docker schema 2
manifest held in memory, whose config and layers are the archive's files, read in place
by offset (tarindex.py). A layer's media type follows its first bytes (plain tar, or the
gzip/zstd blobs newer docker versions save); its digest is the name docker gave it under
`blobs/sha256/`, or for a plain tar the DiffID its config declares (checked when read),
else computed once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Self

from estargz_opt import descriptor as d, jsonlimits
from estargz_opt.descriptor import Descriptor, Manifest
from estargz_opt.digest import sha256_digest, sha256_hex
from estargz_opt.errors import BadInputError, EstargzOptError, UsageError
from estargz_opt.magic import sniff
from estargz_opt.reference import docker_name
from estargz_opt.stores import BlobSink, check_blob
from estargz_opt.stores.tarindex import Member, TarIndex

_LAYER_TYPES = {"none": d.DOCKER_LAYER, "gzip": d.DOCKER_LAYER_GZIP, "zstd": d.DOCKER_LAYER_ZSTD}


@dataclass(frozen=True, slots=True)
class _Entry:
    """One image of manifest.json."""

    config: str
    repo_tags: list[str]
    layers: list[str]

    def names(self) -> list[str]:
        """RepoTags normalized as references are (docker writes `app:1`, skopeo
        `docker.io/library/app:1`); names that are not docker names are left out."""
        out = []
        for tag in self.repo_tags:
            with contextlib.suppress(UsageError):
                out.append(docker_name(tag, tag))
        return out


class DockerArchive:
    """A docker archive as a (read-only) Store."""

    def __init__(self, path: Path) -> None:
        self.what = f"docker-archive:{path}"
        self._tar = TarIndex.scan(path, self.what)
        member = self._tar.get("manifest.json")
        if member is None:
            raise BadInputError(f"{self.what} is not a docker archive (no manifest.json)")
        self._entries = _parse_manifest(self._tar.read(member), self.what)
        #: blobs of the resolved image: the manifest in memory, the rest in the tar
        self._json: dict[str, bytes] = {}
        self._files: dict[str, Member] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    # ------------------------------------------------------------------ reading

    def resolve(self, name: str | None) -> Descriptor:
        """The manifest of the image `name` (normalized NAME:TAG, or `@N`), or the only one."""
        entry = self._pick(name)
        config_member = self._file(entry.config, "config")
        config = self._tar.read(config_member)
        config_desc = Descriptor(d.DOCKER_CONFIG, sha256_digest(config), len(config))
        diff_ids = d.config_diff_ids(d.load_json(config, self.what), len(entry.layers), self.what)
        members = [self._file(path, f"layer {i}") for i, path in enumerate(entry.layers)]
        layers = [self._layer(m, diff_id) for m, diff_id in zip(members, diff_ids, strict=True)]
        manifest = Manifest(
            media_type=d.DOCKER_MANIFEST,
            config=config_desc,
            layers=layers,
            extra={"schemaVersion": 2},
        ).to_bytes()
        desc = Descriptor(d.DOCKER_MANIFEST, sha256_digest(manifest), len(manifest))
        self._json = {desc.digest: manifest}
        self._files = {config_desc.digest: config_member}
        self._files |= {x.digest: m for x, m in zip(layers, members, strict=True)}
        return desc

    def _pick(self, name: str | None) -> _Entry:
        known = ", ".join(n for e in self._entries for n in e.names()) or "none"
        if name is None:
            if len(self._entries) == 1:
                return self._entries[0]
            raise EstargzOptError(
                f"{self.what} holds {len(self._entries)} images; name one with "
                f"docker-archive:PATH:NAME:TAG or :@N (tags: {known})"
            )
        if name.startswith("@"):
            n = int(name[1:])
            if n < len(self._entries):
                return self._entries[n]
            raise EstargzOptError(f"{self.what} holds {len(self._entries)} images, no {name}")
        for entry in self._entries:
            if name in entry.names():
                return entry
        raise EstargzOptError(f"no image tagged {name!r} in {self.what} (tags: {known})")

    def _file(self, name: str, what: str) -> Member:
        member = self._tar.get(name)
        if member is None:
            raise BadInputError(f"{self.what}: manifest.json names {name!r} ({what}), not in it")
        return member

    def _layer(self, member: Member, diff_id: str) -> Descriptor:
        kind = sniff(self._tar.head(member, 4))
        name = member.name
        if name.startswith("blobs/sha256/") and sha256_hex("sha256:" + name[13:]):
            digest = "sha256:" + name[13:]
        elif kind == "none":
            digest = diff_id  # a plain layer's digest is its DiffID (checked when read)
        else:
            digest = self._tar.digest(member)
        return Descriptor(_LAYER_TYPES[kind], digest, member.size)

    def _blob(self, desc: Descriptor, what: str) -> bytes | Member:
        found = self._json.get(desc.digest) or self._files.get(desc.digest)
        if found is None:
            raise BadInputError(f"missing blob {desc.digest} ({what}) in {self.what}")
        return found

    def read(self, desc: Descriptor, what: str) -> bytes:
        blob = self._blob(desc, what)
        if isinstance(blob, Member):
            return self._tar.read_checked(blob, desc, what)
        check_blob(desc, sha256_digest(blob), len(blob), what)
        return blob

    def size_of(self, digest: str) -> int | None:
        if digest in self._json:
            return len(self._json[digest])
        member = self._files.get(digest)
        return member.size if member else None

    def holds(self, digest: str, size: int) -> bool:
        return self.size_of(digest) == size

    def stream(self, desc: Descriptor, what: str) -> Iterator[bytes]:
        blob = self._blob(desc, what)
        if isinstance(blob, Member):
            yield from self._tar.stream_checked(blob, desc, what)
        else:
            yield self.read(desc, what)

    @contextlib.contextmanager
    def local_file(self, desc: Descriptor, what: str) -> Iterator[Path]:
        blob = self._blob(desc, what)
        if not isinstance(blob, Member):
            raise EstargzOptError(f"{desc.digest} ({what}) is not a layer")
        with self._tar.local_copy(blob, desc, what) as path:
            yield path

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes, source: Descriptor | None = None) -> None:
        self._read_only()

    def sink(self, source: Descriptor | None = None) -> contextlib.AbstractContextManager[BlobSink]:
        self._read_only()

    def tag(self, tags: Mapping[str, Descriptor]) -> None:
        self._read_only()

    def rollback(self) -> None:
        pass

    def _read_only(self) -> NoReturn:
        raise EstargzOptError(f"{self.what}: docker-archive: images are read only")


def _parse_manifest(data: bytes, what: str) -> list[_Entry]:
    where = f"{what}/manifest.json"
    raw: Any = jsonlimits.loads(data, where)
    if not isinstance(raw, list) or not raw:
        raise BadInputError(f"malformed {where}: not a list of images")
    entries = []
    for item in raw:
        config, tags, layers = (
            item.get(k) if isinstance(item, dict) else None
            for k in ("Config", "RepoTags", "Layers")
        )
        if (
            not isinstance(config, str)
            or not isinstance(layers, list)
            or not all(isinstance(x, str) for x in layers)
            or not isinstance(tags, list | None)
            or not all(isinstance(x, str) for x in tags or [])
        ):
            raise BadInputError(f"malformed {where}: an image lacks Config or Layers")
        entries.append(_Entry(config, list(tags or []), list(layers)))
    return entries
