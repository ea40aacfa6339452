"""A layer cache kept in a registry repository (`--cache-ref`), shared by a fleet of runs.

Entry format: one small OCI artifact per key, tagged ``layer-KEY`` (KEY is the local
cache's key, `keys.layer_key`). Its config blob is the same LayerResult JSON the local
cache writes (bound to its key), its one layer the converted blob. Why a tag per key and
not an index per key prefix: a lookup is one HEAD (a miss) or a HEAD and two small GETs
(a hit), the same as an index would cost; a publish is one manifest PUT, which the
registry makes atomic, so two runs writing the same key at once write the same bytes
under the same tag (the first complete entry wins, the second changes nothing), where a
shared index would need a read-modify-write that loses concurrent writers' entries.

Trust: anyone who can push to the cache repository can plant an entry. A remote entry
is used only after (a) its config names the requested key and its layer is the blob it
describes, and, unless trust is `digest-only`, (b) its blob verifies as a layer of the
requested format (footer, TOC digest, every chunk, DiffID) and (c) its TOC holds exactly
the source layer's entries (names, types, modes, owners, link targets, content digests)
with the prioritized files first, in their order. A failing entry is warned about and
the layer converted afresh: a remote cache never fails a run, and no remote failure
(network, refusal) does either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from estargz_opt import descriptor as d, jsonlimits
from estargz_opt.cache.files import MAX_META, Damaged, result_from_json, result_to_json
from estargz_opt.constants import LANDMARKS, MAX_MANIFEST_SIZE, TOC_TAR_NAME
from estargz_opt.descriptor import Descriptor
from estargz_opt.digest import digest_of, hasher, sha256_digest
from estargz_opt.errors import EstargzOptError
from estargz_opt.format import LayerResult, open_layer
from estargz_opt.format.source import TarSource
from estargz_opt.format.tarfmt import iter_entries
from estargz_opt.reference import RegistryRef
from estargz_opt.stores.registry.client import Client
from estargz_opt.stores.registry.options import RegistryOptions
from estargz_opt.stores.registry.session import open_session

log = logging.getLogger("estargz_opt")

ENV_REF = "ESTARGZ_OPT_CACHE_REF"
ARTIFACT_TYPE = "application/vnd.estargz-opt.cache.layer.v1"
ENTRY_TYPE = "application/vnd.estargz-opt.cache.entry.v1+json"
_TYPE_OF = {"reg": "0", "symlink": "2", "hardlink": "1", "char": "3", "block": "4",
            "dir": "5", "fifo": "6"}


class Trust(Enum):
    """How far a remote entry is checked before use (module docstring)."""

    FULL = "full"
    DIGEST_ONLY = "digest-only"


def tag_of(key: str) -> str:
    """The tag of the entry `key` (70 characters: within the distribution spec's 128)."""
    return f"layer-{key}"


@dataclass(frozen=True, slots=True)
class RemoteEntry:
    key: str
    result: LayerResult
    layer: Descriptor


class RemoteCache:
    """The cache repository `client` names, for one run (several threads)."""

    def __init__(self, client: Client, trust: Trust = Trust.FULL) -> None:
        self.client = client
        self.trust = trust
        self._lock = threading.Lock()
        self._writable: bool | None = None
        self._pending: list[tuple[str, LayerResult, Path]] = []
        #: the one line said when the cache could not be read this run (then off)
        self.off: str | None = None

    @property
    def where(self) -> str:
        return f"{self.client.session.host}/{self.client.repository}"

    def _turn_off(self, why: str) -> None:
        with self._lock:
            if self.off is None:
                self.off = f"the remote layer cache {self.where} cannot be used ({why})"
                log.warning("%s: converting without it", self.off)

    # ------------------------------------------------------------------ reading

    def lookup(self, key: str) -> RemoteEntry | None:
        """The entry `key`, its metadata checked (its blob is not read here)."""
        if self.off is not None:
            return None
        tag = tag_of(key)
        try:  # a registry that fails the first request is off for the run
            if self.client.manifest_size(tag) is None:
                return None
        except EstargzOptError as exc:
            self._turn_off(str(exc))
            return None
        try:  # past it, what fails is this entry
            _, raw = self.client.get_manifest(tag, f"cache entry {tag}")
            manifest = jsonlimits.loads_object(raw, "cache entry", max_size=MAX_MANIFEST_SIZE)
            config = Descriptor.from_json(manifest.get("config"))
            layers = manifest.get("layers")
            if (manifest.get("artifactType") != ARTIFACT_TYPE or config.media_type != ENTRY_TYPE
                    or not isinstance(layers, list) or len(layers) != 1):
                return self._refuse(key, "it is not an entry of ours")
            layer = Descriptor.from_json(layers[0])
            if config.size > MAX_META:
                return self._refuse(key, "its metadata is too large")
            result = result_from_json(self.client.read_blob(config, f"cache entry {tag}"), key)
        except Damaged as exc:
            return self._refuse(key, str(exc))
        except (ValueError, TypeError, AttributeError) as exc:
            return self._refuse(key, f"its manifest is malformed ({exc})")
        except EstargzOptError as exc:
            return self._refuse(key, str(exc))
        if layer.digest != result.digest or layer.size != result.size:
            return self._refuse(key, "its layer is not the blob its metadata describes")
        return RemoteEntry(key, result, layer)

    def _refuse(self, key: str, why: str) -> RemoteEntry | None:
        """Warn that the entry `key` is not used; None (what a lookup then returns)."""
        log.warning("remote layer cache %s: entry %s ignored (%s): converting afresh",
                    self.where, tag_of(key), why)
        return None

    @contextlib.contextmanager
    def download(self, entry: RemoteEntry) -> Iterator[Path | None]:
        """The entry's blob in a temporary file (None: it could not be fetched)."""
        fd, name = tempfile.mkstemp(prefix="estargz-opt-remote-", suffix=".tmp")
        path = Path(name)
        try:
            with os.fdopen(fd, "w+b") as f:
                try:
                    self.client.download(entry.layer, f"cache entry {tag_of(entry.key)}", f)
                except EstargzOptError as exc:
                    self._refuse(entry.key, f"its blob cannot be fetched: {exc}")
                    yield None
                    return
            yield path
        finally:
            path.unlink(missing_ok=True)

    def check(self, entry: RemoteEntry, blob: Path, source: TarSource,
              prioritized: Sequence[str]) -> bool:
        """Whether the downloaded blob may stand for converting `source` (module
        docstring, (b) and (c)); a failure is warned about."""
        why = mismatch(entry.result, blob, source, prioritized)
        if why is not None:
            self._refuse(entry.key, why)
        return why is None

    # ------------------------------------------------------------------ writing

    def writable(self) -> bool:
        """Whether these credentials may push to the cache (asked once; a refusal is
        one info line: a pull-only pipeline reads the cache and never writes it)."""
        with self._lock:
            if self._writable is None:
                try:
                    self.client.check_push()
                    self._writable = True
                except EstargzOptError:
                    self._writable = False
                    log.info("remote layer cache %s is read-only for these credentials: "
                             "conversions are not published to it", self.where)
            return self._writable

    def defer(self, key: str, result: LayerResult, blob: Path) -> None:
        """Publish this conversion once the run's image is written (`publish_all`)."""
        with self._lock:
            self._pending.append((key, result, blob))

    def publish_all(self, mount_from: tuple[str, str] | None) -> None:
        """Publish the deferred conversions. Their blobs are by now in the destination:
        one on this registry (`mount_from`: host, repository) gives them by mount, so a
        fleet uploads each converted layer once, not once more for the cache."""
        with self._lock:
            pending, self._pending = self._pending, []
        for key, result, blob in pending:
            self.publish(key, result, blob, mount_from)

    def publish(self, key: str, result: LayerResult, blob: Path,
                mount_from: tuple[str, str] | None = None) -> None:
        """Push the blob (by mount when it can), then its entry (the tag last). An entry
        already there wins."""
        if self.off is not None or not self.writable():
            return
        tag = tag_of(key)
        meta = result_to_json(key, result)
        config = Descriptor(ENTRY_TYPE, sha256_digest(meta), len(meta))
        layer = Descriptor(d.OCI_LAYER + ("+zstd" if blob_is_zstd(blob) else "+gzip"),
                           result.digest, result.size)
        manifest = d.dump({
            "schemaVersion": 2,
            "mediaType": d.OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": config.to_json(),
            "layers": [layer.to_json()],
        })
        try:
            if self.client.manifest_size(tag) is not None:
                return  # the first complete entry wins
            mounted = (mount_from is not None and mount_from[0] == self.client.session.host
                       and self.client.mount(result.digest, mount_from[1]))
            if not mounted and self.client.blob_size(result.digest) != result.size:
                self.client.upload(blob, result.digest, result.size, lambda _: None)
            with tempfile.NamedTemporaryFile(prefix="estargz-opt-remote-") as f:
                f.write(meta)
                f.flush()
                if self.client.blob_size(config.digest) != config.size:
                    self.client.upload(Path(f.name), config.digest, config.size,
                                       lambda _: None)
            self.client.put_manifest(tag, d.OCI_MANIFEST, manifest)
        except (EstargzOptError, OSError) as exc:  # the image is written: never fail it
            log.warning("remote layer cache %s: entry %s not published: %s",
                        self.where, tag, exc)


@contextlib.contextmanager
def open_remote(ref: str, opts: RegistryOptions, trust: Trust) -> Iterator[RemoteCache | None]:
    """The remote cache `ref` (docker://HOST/REPO; a tag is ignored) for one run. A
    registry that cannot be reached turns it off with one warning, never fails the run."""
    parsed = RegistryRef.parse(ref)
    try:
        session = open_session(parsed.api_host, opts)
    except EstargzOptError as exc:
        log.warning("the remote layer cache %s cannot be used (%s): converting without it",
                    ref, exc)
        session = None
    if session is None:
        yield None
        return
    try:
        yield RemoteCache(Client(session, parsed.repository), trust)
    finally:
        session.close()


def blob_is_zstd(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x28\xb5\x2f\xfd"


def mismatch(result: LayerResult, blob: Path, source: TarSource,
              prioritized: Sequence[str]) -> str | None:
    """Why the blob is not the conversion of `source`, or None."""
    try:
        with open_layer(blob, toc_digest=result.toc_digest,
                        external_toc=result.toc_blob) as layer:
            layer.verify(expected_diff_id=result.diff_id)
            toc = [e for e in layer.toc.entries if e.type != "chunk"]
    except EstargzOptError as exc:
        return f"its blob does not verify: {exc}"
    got = [(_clean(e.name), _TYPE_OF.get(e.type, e.type), e.mode & 0o7777, e.uid, e.gid,
            _clean(e.link_name) if e.type == "hardlink" else e.link_name, e.digest)
           for e in toc if not _landmark(e.name)]
    want = []
    source.f.seek(0)
    for entry in iter_entries(source.f, source.size):
        digest = ""
        if entry.typeflag in ("0", "\x00", "7"):
            h = hasher()
            source.f.seek(entry.data_offset)
            left = entry.size
            while left and (piece := source.f.read(min(left, 1 << 20))):
                h.update(piece)
                left -= len(piece)
            digest = digest_of(h)
        kind = "0" if entry.typeflag in ("\x00", "7") else entry.typeflag
        link = _clean(entry.linkname) if kind == "1" else entry.linkname
        want.append((_clean(entry.name), kind, entry.mode & 0o7777, entry.uid, entry.gid,
                     link, digest))
    if sorted(got) != sorted(want):
        missing = sorted(set(want) - set(got))[:1] or sorted(set(got) - set(want))[:1]
        return f"its entries differ from the source layer's (first: {missing[0][0]!r})"
    order = [name for name, *_ in got]
    first = [_clean(p) for p in prioritized if _clean(p) in set(order)]
    placed = [n for n in order if n in set(first)]
    if placed[: len(first)] != first:
        return "its prioritized files are not in the requested order"
    return None


def _clean(name: str) -> str:
    return name.strip("/").removeprefix("./")


def _landmark(name: str) -> bool:
    return name in LANDMARKS or name == TOC_TAR_NAME
