"""The image converter: walk index -> manifests -> config and layers, rewrite what changed.

It reads from one store and writes to another (they may be the same), calls the format
engine for each layer, and returns the new top descriptor. Tagging is the caller's last
step, so a failure here never leaves a half-written image behind a name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from estargz_opt import descriptor as d
from estargz_opt.cache import LayerCache, Slot, cached_build, layer_key
from estargz_opt.cache.remote import RemoteCache, Trust
from estargz_opt.constants import (
    IO_CHUNK,
    REFERENCE_DIGEST_ANNOTATION,
    SOURCE_DIGEST_ANNOTATION,
    TOC_DIGEST_ANNOTATION,
    TOC_LAYER_DIGEST_ANNOTATION,
)
from estargz_opt.descriptor import Descriptor, Manifest
from estargz_opt.digest import sha256_digest
from estargz_opt.errors import BadInputError, Cancelled, EstargzOptError
from estargz_opt.events import ProgressListener
from estargz_opt.format import (
    Format,
    LayerOptions,
    LayerResult,
    build_layer,
    open_layer,
    zchunked,
    zchunked_verify,
)
from estargz_opt.format.source import Spool, TarSource, open_tar
from estargz_opt.platforms import Matcher
from estargz_opt.stores import Mounting, Prefetching, Store
from estargz_opt.walk import (
    attested,
    is_attestation,
    is_image,
    no_match,
    read_index,
    read_manifest,
)

log = logging.getLogger("estargz_opt")

_EMPTY_CONFIG = b"{}"


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    layer: LayerOptions = field(default_factory=LayerOptions)
    platforms: Matcher = field(default_factory=lambda: Matcher((), all=True))
    oci: bool = False
    reuse: bool = False
    prioritized: Mapping[str, Sequence[str]] = field(default_factory=dict)  # layer digest -> paths
    progress: ProgressListener | None = None
    cache: LayerCache | None = None  # None: --no-cache
    remote: RemoteCache | None = None  # --cache-ref
    #: source layers already checked and decompressed (during the workload run), by digest
    spool: Spool | None = None
    #: leave BuildKit's attestation manifests out of converted indexes
    drop_attestations: bool = False
    #: the converted top manifest's `subject` is the source's (nydusify's --with-referrer)
    with_referrer: bool = False


@dataclass(slots=True)
class LayerReport:
    platform: str
    source: Descriptor
    target: Descriptor
    diff_id: str
    result: LayerResult | None  # None when the layer was kept (--reuse)
    seconds: float
    #: "hit", "remote-hit", "miss" or "off" (no cache, or it could not be used)
    cache: str = "off"


@dataclass(slots=True)
class ConvertResult:
    target: Descriptor
    layers: list[LayerReport]
    toc_layers: list[Descriptor]  # external TOC blobs, for the TOC image
    warnings: list[str]
    #: source manifest or index digest -> its converted one (artifacts, kept, are not here)
    converted: dict[str, Descriptor] = field(default_factory=dict)


def repoint(att: Descriptor, new: str) -> Descriptor:
    """The index entry of attestation *att* naming manifest *new*; the digest it named
    before is kept under SOURCE_DIGEST_ANNOTATION (unchanged if nothing moved)."""
    old = attested(att)
    if old == new:
        return att
    annotations = dict(att.annotations or {})
    annotations[REFERENCE_DIGEST_ANNOTATION] = new
    if old:
        annotations[SOURCE_DIGEST_ANNOTATION] = old
    return replace(att, annotations=annotations)


class Converter:
    def __init__(self, src: Store, dst: Store, opts: ConvertOptions, same_store: bool) -> None:
        self.src = src
        self.dst = dst
        self.opts = opts
        self.same_store = same_store
        self.layers: list[LayerReport] = []
        self.toc_layers: list[Descriptor] = []
        self.warnings: list[str] = []
        self.cancel = threading.Event()
        self._lock = threading.Lock()
        self._copied: set[str] = set()
        self._converted: dict[str, Descriptor] = {}
        self._root: Descriptor | None = None

    # ------------------------------------------------------------------ walk

    def convert(self, desc: Descriptor) -> ConvertResult:
        self._root = desc
        target = self._node(desc, platform=str(desc.platform) if desc.platform else "")
        return ConvertResult(
            target, self.layers, self.toc_layers, self.warnings, self._converted
        )

    def _node(self, desc: Descriptor, platform: str) -> Descriptor:
        if desc.media_type in d.INDEX_TYPES:
            new = self._index(desc)
        elif desc.media_type in d.MANIFEST_TYPES:
            new = self._manifest(desc, platform)
        else:
            self._copy(desc, "unknown media type")
            return desc
        if new.digest != desc.digest:  # what signed the source no longer names this
            self._converted[desc.digest] = new
        return new

    def _index(self, desc: Descriptor) -> Descriptor:
        index = read_index(self.src, desc)
        slots: list[Descriptor | None] = []
        new_digest: dict[str, str] = {}
        attestations: dict[int, Descriptor] = {}
        for child in index.manifests:
            if is_attestation(child):
                attestations[len(slots)] = child
                slots.append(None)
            elif child.media_type in d.INDEX_TYPES | d.MANIFEST_TYPES:
                if child.platform is not None and not self.opts.platforms.matches(child.platform):
                    continue
                converted = self._node(child, str(child.platform or ""))
                new_digest[child.digest] = converted.digest
                slots.append(converted)
            else:
                self._copy(child, "unknown media type")
                slots.append(child)
        if not new_digest:
            raise no_match(f"index {desc.digest}", self.opts.platforms, index)
        # An attestation stays in place when the manifest it describes is kept, re-pointed
        # at the converted manifest (same files, new encoding) so that tools looking up a
        # platform manifest's SBOM find it; its own bytes, which name the source, are kept.
        for pos, att in attestations.items():
            new = new_digest.get(attested(att) or "")
            if new is not None and not self.opts.drop_attestations:
                self._copy(att, "attestation")
                slots[pos] = repoint(att, new)
        kept = [s for s in slots if s is not None]
        index.manifests = kept
        index.media_type = self._map_type(index.media_type)
        self._link_source(desc, index.extra)
        return self._put_json(index.to_bytes(), desc, index.media_type)

    def _manifest(self, desc: Descriptor, platform: str) -> Descriptor:
        manifest = read_manifest(self.src, desc, platform)
        if not is_image(manifest):
            self._copy(desc, "artifact")  # an artifact, not an image: pass it through
            return desc
        label = platform or "image"
        config_raw = d.load_json(
            self.src.read(manifest.config, f"config of {label}"), f"config of {label}"
        )
        layer_slots = [i for i, x in enumerate(manifest.layers) if x.media_type in d.LAYER_TYPES]
        diff_ids = d.config_diff_ids(config_raw, len(layer_slots), label)
        spool = self.opts.spool
        to_fetch = [
            n
            for n, i in enumerate(layer_slots)
            if spool is None or manifest.layers[i].digest not in spool
        ]
        if isinstance(self.src, Prefetching) and to_fetch:
            # Downloads run ahead of the conversions (a registry: layer N+1 arrives while
            # layer N converts and N-1 uploads); a spooled layer needs no download.
            self.src.prefetch(
                [manifest.layers[layer_slots[n]] for n in to_fetch],
                [f"layer {n} of {label}" for n in to_fetch],
            )
        workers = max(1, min(len(layer_slots), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layer") as pool:
            futures = [
                pool.submit(self._layer, manifest.layers[i], f"layer {n} of {label}", label)
                for n, i in enumerate(layer_slots)
            ]
            try:
                results = [f.result() for f in futures]
            except BaseException:
                self.cancel.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        # Reported in manifest order, whichever layer finished first.
        self.layers.extend(report for _, _, report in results)
        new_layers = list(manifest.layers)
        for n, (i, (new_desc, new_diff, _)) in enumerate(zip(layer_slots, results, strict=True)):
            new_layers[i] = new_desc
            if new_diff:
                diff_ids[n] = new_diff
        for i, layer in enumerate(manifest.layers):
            if i not in layer_slots:
                self._copy(layer, f"non-layer blob of {label}")
        manifest.layers = new_layers
        manifest.config = self._config(manifest.config, config_raw, diff_ids)
        if manifest.media_type:
            manifest.media_type = self._map_type(manifest.media_type)
        new_type = self._map_type(desc.media_type)
        self._link_source(desc, manifest.extra)
        return self._put_json(manifest.to_bytes(), desc, new_type)

    def copy_referrer(self, ref: Descriptor, source: str, subject: Descriptor) -> Descriptor | None:
        """Referrer `ref` of source manifest `source` (an SBOM, a provenance) written to
        the destination as a referrer of its converted `subject`: its blobs as they are,
        its manifest naming the new subject, the source digest kept under
        SOURCE_DIGEST_ANNOTATION. None if it does not name `source` (a stale listing)."""
        what = f"referrer {ref.digest} of {source}"
        raw = d.load_json(self.src.read(ref, what), what)
        named = raw.get("subject")
        if not isinstance(named, dict) or named.get("digest") != source:
            return None
        blobs = [raw.get("config"), *(raw.get("layers") or [])]
        for blob in blobs:
            try:
                self._copy(Descriptor.from_json(blob), what)
            except ValueError as exc:
                raise BadInputError(f"malformed {what}: {exc}") from None
        raw["subject"] = {"mediaType": subject.media_type, "digest": subject.digest,
                          "size": subject.size}
        annotations = raw.get("annotations")
        raw["annotations"] = {**(annotations if isinstance(annotations, dict) else {}),
                              SOURCE_DIGEST_ANNOTATION: source}
        data = d.dump(raw)
        self.dst.write(data, source=ref)
        return Descriptor(
            media_type=str(raw.get("mediaType") or ref.media_type),
            digest=sha256_digest(data),
            size=len(data),
            annotations=ref.annotations,
            artifact_type=ref.artifact_type,
        )

    def _link_source(self, desc: Descriptor, extra: dict[str, Any]) -> None:
        """With with_referrer, the top document names the source as its `subject`, so
        that a registry lists the converted image among the source's referrers."""
        if self.opts.with_referrer and desc is self._root:
            extra["subject"] = {"mediaType": desc.media_type, "digest": desc.digest,
                                "size": desc.size}

    def _config(self, desc: Descriptor, raw: dict[str, Any], diff_ids: list[str]) -> Descriptor:
        rootfs = raw.get("rootfs")
        if isinstance(rootfs, dict):
            raw["rootfs"] = {"type": rootfs.get("type", "layers"), "diff_ids": diff_ids}
        for key in ("config", "container_config"):
            section = raw.get(key)
            if isinstance(section, dict):
                section.pop("Image", None)
        data = d.dump({k: raw[k] for k in sorted(raw)})
        return self._put_json(data, desc, self._map_type(desc.media_type))

    # ------------------------------------------------------------------ layers

    def _layer(
        self, desc: Descriptor, what: str, platform: str
    ) -> tuple[Descriptor, str | None, LayerReport]:
        if self.cancel.is_set():
            raise Cancelled("interrupted")
        started = time.monotonic()
        prioritized = list(self.opts.prioritized.get(desc.digest, ()))
        if self.opts.reuse and not prioritized and self._reusable(desc, what):
            kept = self._strip_if_docker(
                desc.with_changes(media_type=self._map_type(desc.media_type))
            )
            self._copy(desc, what)
            return kept, None, self._report(platform, desc, kept, "", None, started)
        opts = replace(self.opts.layer, prioritized=prioritized)
        key = layer_key(desc.digest, opts)
        remote_hit: list[bool] = []

        def serve(slot: Slot | None) -> LayerResult | None:
            local = self._from_cache(desc, what, slot) if slot else None
            if local is None and (remote := self._from_remote(desc, what, opts, key, slot)):
                remote_hit.append(True)
                return remote
            return local

        def build(slot: Slot | None) -> LayerResult:
            built = self._build(desc, what, opts, slot)
            if self.opts.remote and slot and (blob := slot.stored_blob()):
                self.opts.remote.defer(key, built, blob)
            return built

        if self.opts.cache is None and self.opts.remote is not None:
            served = serve(None)
            result, state = (served, "hit") if served else (build(None), "off")
        else:
            result, state = cached_build(self.opts.cache, key, serve, build)
        if remote_hit:
            state = "remote-hit"
        if result.missing_prioritized:
            self._warn(
                f"{what}: {len(result.missing_prioritized)} prioritized path(s) not in the layer "
                f"were skipped"
            )
        if result.toc_blob is not None:
            self.dst.write(result.toc_blob)
            toc_desc = Descriptor(
                media_type=d.OCI_LAYER_GZIP,
                digest=sha256_digest(result.toc_blob),
                size=len(result.toc_blob),
                annotations={TOC_LAYER_DIGEST_ANNOTATION: result.digest},
            )
            with self._lock:
                self.toc_layers.append(toc_desc)
        new = desc.with_changes(
            media_type=self._map_type(_layer_type(desc.media_type, self.opts.layer.format)),
            digest=result.digest,
            size=result.size,
            annotations={**(desc.annotations or {}), **result.annotations},
        )
        new = self._strip_if_docker(new)
        report = self._report(platform, desc, new, result.diff_id, result, started)
        report.cache = state
        return new, result.diff_id, report

    def _from_cache(self, desc: Descriptor, what: str, slot: Slot) -> LayerResult | None:
        """The cached conversion, in the destination (copied unless it holds it already)."""
        hit = slot.lookup()
        if hit is None:
            return None
        # The source must be there and sound, as for a conversion: a hit never turns a
        # missing or corrupt source blob into a success. (Read and hashed, not converted.)
        for _ in self.src.stream(desc, what):
            pass
        r = hit.result
        if self.dst.holds(r.digest, r.size):
            slot.served_elsewhere()
            served = True
        else:
            with self.dst.sink(source=desc) as sink:
                served = slot.copy_to(hit, sink.file)
                if served:
                    sink.commit(r.digest, r.size, r.diff_id)
        if not served:
            return None
        if self.opts.progress:
            self.opts.progress.cached(desc.digest, r.size)
        return r

    def _from_remote(
        self, desc: Descriptor, what: str, opts: LayerOptions, key: str, slot: Slot | None
    ) -> LayerResult | None:
        """The remote cache's entry `key`, checked (cache/remote.py), in the destination:
        mounted from the cache repository when they share a registry, else downloaded
        once (into the local cache too)."""
        remote = self.opts.remote
        entry = remote.lookup(key) if remote else None
        if remote is None or entry is None:
            return None
        r = entry.result
        with contextlib.ExitStack() as stack:
            blob: Path | None = None
            if remote.trust is Trust.FULL:
                blob = stack.enter_context(remote.download(entry))
                if blob is None:
                    return None
                tar = stack.enter_context(self._source(desc, what))
                if not remote.check(entry, blob, tar, opts.prioritized):
                    return None
            else:  # the source must still be there and sound, as for a conversion
                for _ in self.src.stream(desc, what):
                    pass
            host, repo = remote.client.session.host, remote.client.repository
            if isinstance(self.dst, Mounting) and self.dst.mount_blob(host, repo, r.digest,
                                                                       r.size):
                pass  # moved no bytes
            elif not self.dst.holds(r.digest, r.size):
                if blob is None:
                    blob = stack.enter_context(remote.download(entry))
                    if blob is None:
                        return None
                with (
                    self.dst.sink(source=desc) as sink,
                    slot.fill() if slot else contextlib.nullcontext() as fill,
                    open(blob, "rb") as f,
                ):
                    out = fill.tee(sink.file) if fill else sink.file
                    while block := f.read(IO_CHUNK):
                        out.write(block)
                    sink.commit(r.digest, r.size, r.diff_id)
                    if slot and fill:
                        slot.store(fill, r)
        if self.opts.progress:
            self.opts.progress.cached(desc.digest, r.size)
        return r

    def _build(
        self, desc: Descriptor, what: str, opts: LayerOptions, slot: Slot | None
    ) -> LayerResult:
        """Convert the layer into the destination (and, with a slot, into the cache)."""
        shown = self.opts.progress

        def progress(bytes_in: int, bytes_out: int) -> None:
            if self.cancel.is_set():
                raise Cancelled("interrupted")
            if shown:
                shown.update(desc.digest, bytes_in, bytes_out)

        with contextlib.ExitStack() as stack:
            tar = stack.enter_context(self._source(desc, what))
            sink = stack.enter_context(self.dst.sink(source=desc))
            fill = stack.enter_context(slot.fill()) if slot else None
            finished: list[bool] = []
            if shown:
                shown.start(desc.digest, tar.size)
                # An interrupted or failed layer leaves the display without being "done".
                stack.callback(_abandon_unless, finished, shown, desc.digest)
            try:
                out = fill.tee(sink.file) if fill else sink.file
                result = build_layer(tar, out, opts, progress)
            except BadInputError as exc:
                raise BadInputError(f"{what} ({desc.digest}): {exc}") from None
            sink.commit(result.digest, result.size, result.diff_id)
            if shown:
                shown.finish(desc.digest, tar.size, result.size)
                finished.append(True)
            if slot and fill:
                slot.store(fill, result)
        return result

    @contextlib.contextmanager
    def _source(self, desc: Descriptor, what: str) -> Iterator[TarSource]:
        """The layer's tar: spooled during the workload run if it was, else from the store."""
        spooled = self.opts.spool.take(desc.digest) if self.opts.spool else None
        log.debug("%s: %s", what, "spooled" if spooled else "read from the store")
        if spooled is not None:
            with spooled.f:
                yield spooled
            return
        with self.src.local_file(desc, what) as path, open_tar(path) as tar:
            yield tar

    def _reusable(self, desc: Descriptor, what: str) -> bool:
        """Upstream's --reuse test, plus every chunk verified: keep only sound eStargz layers."""
        if self.opts.layer.containers:
            return self._reusable_containers(desc, what)
        toc_digest = (desc.annotations or {}).get(TOC_DIGEST_ANNOTATION)
        if not toc_digest:
            return False
        with self.src.local_file(desc, what) as path:
            try:
                with open_layer(path, toc_digest=toc_digest) as layer:
                    layer.verify()
            except EstargzOptError as exc:
                log.info("%s (%s) is not reusable: %s", what, desc.digest, exc)
                return False
        return True

    def _reusable_containers(self, desc: Descriptor, what: str) -> bool:
        """For the containers flavour, only a sound containers-flavour layer is kept."""
        ann = desc.annotations or {}
        if not ann.get(zchunked.MANIFEST_CHECKSUM):
            return False
        with self.src.local_file(desc, what) as path:
            if not zchunked_verify.is_containers_path(path):
                return False
            errors = zchunked_verify.verify_containers_layer(path, ann, None).errors
        if errors:
            log.info("%s (%s) is not reusable: %s", what, desc.digest, errors[0])
        return not errors

    def _report(
        self,
        platform: str,
        src: Descriptor,
        dst: Descriptor,
        diff_id: str,
        result: LayerResult | None,
        started: float,
    ) -> LayerReport:
        return LayerReport(platform, src, dst, diff_id, result, time.monotonic() - started)

    # ------------------------------------------------------------------ helpers

    def _map_type(self, media_type: str) -> str:
        return d.DOCKER_TO_OCI.get(media_type, media_type) if self.opts.oci else media_type

    def _strip_if_docker(self, desc: Descriptor) -> Descriptor:
        if d.is_docker(desc.media_type) and desc.annotations:
            self._warn(
                "Docker media types cannot carry annotations: the eStargz TOC digest is "
                "stripped and lazy pulling will fetch whole layers; convert with --oci"
            )
            return desc.with_changes(annotations=None)
        return desc

    def _warn(self, message: str) -> None:
        with self._lock:
            if message not in self.warnings:
                self.warnings.append(message)
                log.warning("%s", message)

    def _put_json(self, data: bytes, old: Descriptor, media_type: str) -> Descriptor:
        self.dst.write(data, source=old)
        return old.with_changes(media_type=media_type, digest=sha256_digest(data), size=len(data))

    def _copy(self, desc: Descriptor, what: str) -> None:
        """Make a blob we keep (and what it references) present in the destination."""
        if self.same_store or desc.digest in self._copied:
            return
        with self._lock:
            self._copied.add(desc.digest)
        if desc.media_type in d.INDEX_TYPES | d.MANIFEST_TYPES or desc.media_type.endswith("json"):
            data = self.src.read(desc, what)
            self.dst.write(data, source=desc)
            for child in _children(data):
                self._copy(child, what)
            return
        if self.dst.holds(desc.digest, desc.size):
            return  # already there (or mounted from the source's repository): no bytes move
        with (
            self.src.local_file(desc, what) as path,
            open(path, "rb") as f,
            self.dst.sink(source=desc) as s,
        ):
            while block := f.read(IO_CHUNK):
                s.file.write(block)
            s.commit(desc.digest, desc.size)


def toc_image(toc_layers: list[Descriptor], dst: Store) -> Descriptor:
    """The single TOC image for every converted layer of every platform (upstream's layout)."""
    dst.write(_EMPTY_CONFIG)
    manifest = Manifest(
        media_type=d.OCI_MANIFEST,
        config=Descriptor(d.OCI_CONFIG, sha256_digest(_EMPTY_CONFIG), len(_EMPTY_CONFIG)),
        layers=sorted(toc_layers, key=lambda x: x.digest),
        extra={"schemaVersion": 2},
    )
    data = manifest.to_bytes()
    dst.write(data)
    return Descriptor(d.OCI_MANIFEST, sha256_digest(data), len(data))


def _layer_type(media_type: str, fmt: Format) -> str:
    foreign = "foreign" in media_type or "nondistributable" in media_type
    if fmt is Format.ZSTDCHUNKED:
        return (d.OCI_FOREIGN if foreign else d.OCI_LAYER) + "+zstd"
    if d.is_docker(media_type):
        return d.DOCKER_FOREIGN_GZIP if foreign else d.DOCKER_LAYER_GZIP
    return (d.OCI_FOREIGN if foreign else d.OCI_LAYER) + "+gzip"


def _children(data: bytes) -> list[Descriptor]:
    """Descriptors a JSON blob references (config, layers, manifests, subject), best effort."""
    try:
        raw = d.load_json(data, "blob")
    except BadInputError:
        return []
    found = []
    for key in ("config", "subject"):
        if isinstance(raw.get(key), dict):
            found.append(raw[key])
    for key in ("layers", "manifests", "blobs"):
        if isinstance(raw.get(key), list):
            found.extend(x for x in raw[key] if isinstance(x, dict))
    out = []
    for item in found:
        try:
            out.append(Descriptor.from_json(item))
        except ValueError:
            continue
    return out


def _abandon_unless(finished: list[bool], listener: ProgressListener, digest: str) -> None:
    """Tell the listener a layer stopped, unless it was finished (then nothing is said)."""
    if not finished:
        listener.abandon(digest)
