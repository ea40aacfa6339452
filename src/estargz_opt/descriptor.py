"""OCI descriptors, manifests and indexes as dataclasses that keep fields they do not know.

Upstream re-marshals manifests from typed structs and so drops unknown fields; we keep
every field we do not model in `extra`, and write it back unchanged.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Self

from estargz_opt import jsonlimits
from estargz_opt.constants import (
    DOCKER_CONFIG as DOCKER_CONFIG,
    DOCKER_FOREIGN as DOCKER_FOREIGN,
    DOCKER_FOREIGN_GZIP as DOCKER_FOREIGN_GZIP,
    DOCKER_LAYER as DOCKER_LAYER,
    DOCKER_LAYER_GZIP as DOCKER_LAYER_GZIP,
    DOCKER_LAYER_ZSTD as DOCKER_LAYER_ZSTD,
    DOCKER_LIST as DOCKER_LIST,
    DOCKER_MANIFEST as DOCKER_MANIFEST,
    OCI_CONFIG as OCI_CONFIG,
    OCI_FOREIGN as OCI_FOREIGN,
    OCI_INDEX as OCI_INDEX,
    OCI_LAYER as OCI_LAYER,
    OCI_LAYER_GZIP as OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD as OCI_LAYER_ZSTD,
    OCI_MANIFEST as OCI_MANIFEST,
)
from estargz_opt.errors import BadInputError

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
LAYER_TYPES = frozenset(
    {
        OCI_LAYER,
        OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD,
        OCI_FOREIGN,
        OCI_FOREIGN + "+gzip",
        OCI_FOREIGN + "+zstd",
        DOCKER_LAYER,
        DOCKER_LAYER_GZIP,
        DOCKER_FOREIGN,
        DOCKER_FOREIGN_GZIP,
        DOCKER_LAYER_ZSTD,
    }
)
DOCKER_TO_OCI = {
    DOCKER_LIST: OCI_INDEX,
    DOCKER_MANIFEST: OCI_MANIFEST,
    DOCKER_CONFIG: OCI_CONFIG,
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_LAYER: OCI_LAYER,
    DOCKER_LAYER_ZSTD: OCI_LAYER_ZSTD,
    DOCKER_FOREIGN_GZIP: OCI_FOREIGN + "+gzip",
    DOCKER_FOREIGN: OCI_FOREIGN,
}


def is_docker(media_type: str) -> bool:
    return media_type.startswith("application/vnd.docker.")


@dataclass(slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def from_json(cls, raw: Any) -> Platform:
        if not isinstance(raw, dict):
            raise ValueError("platform is not an object")
        extra = {
            k: v
            for k, v in raw.items()
            if k not in ("os", "architecture", "variant", "os.version", "os.features")
        }
        return cls(
            os=_str(raw, "os"),
            architecture=_str(raw, "architecture"),
            variant=str(raw.get("variant", "")),
            os_version=str(raw.get("os.version", "")),
            os_features=list(raw.get("os.features", []) or []),
            extra=extra,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = self.os_features
        if self.variant:
            out["variant"] = self.variant
        return out | self.extra


@dataclass(slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: list[str] | None = None
    annotations: dict[str, str] | None = None
    platform: Platform | None = None
    artifact_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any) -> Descriptor:
        if not isinstance(raw, dict):
            raise ValueError("descriptor is not an object")
        digest, size = raw.get("digest"), raw.get("size")
        if not isinstance(digest, str) or ":" not in digest:
            raise ValueError("descriptor has no valid digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"descriptor {digest} has no valid size")
        known = ("mediaType", "digest", "size", "urls", "annotations", "platform", "artifactType")
        return cls(
            media_type=str(raw.get("mediaType", "")),
            digest=digest,
            size=size,
            urls=raw.get("urls"),
            annotations=raw.get("annotations"),
            platform=Platform.from_json(raw["platform"]) if raw.get("platform") else None,
            artifact_type=raw.get("artifactType"),
            extra={k: v for k, v in raw.items() if k not in known},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.urls:
            out["urls"] = self.urls
        if self.annotations:
            out["annotations"] = self.annotations
        out |= self.extra
        if self.platform:
            out["platform"] = self.platform.to_json()
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out

    def with_changes(self, **changes: Any) -> Descriptor:
        return replace(self, **changes)


class _Document(ABC):
    """A JSON document read whole; the fields its class does not model stay in `extra`."""

    __slots__ = ()
    kind: ClassVar[str]

    @classmethod
    def parse(cls, data: bytes, where: str) -> Self:
        raw = _load(data, where)
        try:
            return cls.from_raw(raw)
        except ValueError as exc:
            raise BadInputError(f"malformed {cls.kind} {where}: {exc}") from None

    @classmethod
    @abstractmethod
    def from_raw(cls, raw: dict[str, Any]) -> Self:
        """The document from its decoded JSON object (ValueError if malformed)."""


@dataclass(slots=True)
class Manifest(_Document):
    """An image manifest."""

    kind: ClassVar[str] = "manifest"
    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> Manifest:
        return cls(
            media_type=str(raw.get("mediaType", OCI_MANIFEST)),
            config=Descriptor.from_json(raw.get("config")),
            layers=[Descriptor.from_json(d) for d in _list(raw, "layers")],
            extra=_extra(raw, "mediaType", "config", "layers"),
        )

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {"schemaVersion": self.extra.get("schemaVersion", 2)}
        if self.media_type:
            doc["mediaType"] = self.media_type
        doc["config"] = self.config.to_json()
        doc["layers"] = [d.to_json() for d in self.layers]
        return dump({**doc, **{k: v for k, v in self.extra.items() if k != "schemaVersion"}})


@dataclass(slots=True)
class Index(_Document):
    """An image index (or an OCI layout's index.json)."""

    kind: ClassVar[str] = "index"
    media_type: str
    manifests: list[Descriptor]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> Index:
        manifests = [Descriptor.from_json(d) for d in _list(raw, "manifests")]
        return cls(str(raw.get("mediaType", "")), manifests, _extra(raw, "mediaType", "manifests"))

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {"schemaVersion": self.extra.get("schemaVersion", 2)}
        if self.media_type:
            doc["mediaType"] = self.media_type
        doc["manifests"] = [d.to_json() for d in self.manifests]
        return dump({**doc, **{k: v for k, v in self.extra.items() if k != "schemaVersion"}})


def dump(doc: Any) -> bytes:
    """Compact, deterministic JSON for the blobs we write."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _extra(raw: dict[str, Any], *known: str) -> dict[str, Any]:
    """The document's fields not modelled by its class, kept to be written back."""
    return {k: v for k, v in raw.items() if k not in known}


def _load(data: bytes, where: str) -> dict[str, Any]:
    return jsonlimits.loads_object(data, where)


def load_json(data: bytes, where: str) -> dict[str, Any]:
    return _load(data, where)


def config_diff_ids(config: dict[str, Any], count: int, label: str) -> list[str]:
    """An image config's rootfs.diff_ids, checked against the manifest's layer count."""
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
        raise BadInputError(f"malformed config of {label}: rootfs.diff_ids is not a list")
    if len(ids) != count:
        raise BadInputError(f"malformed config of {label}: {len(ids)} diff_ids for {count} layers")
    return list(ids)


def _list(raw: dict[str, Any], key: str) -> list[Any]:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise ValueError(f"{key} is not a list")
    return value


def _str(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"platform {key} is not a string")
    return value
