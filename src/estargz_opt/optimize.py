"""`optimize` from end to end: references -> stores -> prioritized files -> convert -> tag.

The tag is written only after every blob is in place; on any failure (or Ctrl-C) the
destination store rolls back what this run wrote.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from estargz_opt import descriptor as d
from estargz_opt import platforms, reference
from estargz_opt.prioritize.layerindex import LayerNames
from estargz_opt.prioritize.prefetch import write_prefetch_list
from estargz_opt.prioritize.profile import (
    EXAMPLES,
    EmptyProfileError,
    LayerId,
    Profile,
    ProfileKind,
    ProfileSource,
    match_profile,
)
from estargz_opt.prioritize.record import (
    check_record_out,
    prioritized_from_record,
    write_record,
)
from estargz_opt.workload.options import SamplerOptions

if TYPE_CHECKING:
    from estargz_opt.workload.analyzer import Analysis
from estargz_opt.cache import DEFAULT_MAX_SIZE, LayerCache
from estargz_opt.convert import Converter, ConvertOptions, ConvertResult, toc_image
from estargz_opt.descriptor import Descriptor, Manifest
from estargz_opt.errors import EstargzOptError, UsageError
from estargz_opt.format import Format, LayerOptions
from estargz_opt.format.build import LayerResult
from estargz_opt.format.source import Spool
from estargz_opt.progress import Progress
from estargz_opt.stores import Store, StoreOptions, open_store, pair, same_store
from estargz_opt.walk import check_selection, images

log = logging.getLogger("estargz_opt")
TOC_IMAGE_SUFFIX = "-esgztoc"
#: a record's manifest bigger than this is not read (it names no image we could use)
MAX_MANIFEST_SIZE = 4 << 20


@dataclass(frozen=True, slots=True)
class OptimizeRequest:
    src: str
    dst: str
    layer: LayerOptions = field(default_factory=LayerOptions)
    oci: bool = False
    reuse: bool = False
    platforms: tuple[str, ...] = ()
    all_platforms: bool = False
    no_optimize: bool = False
    #: --record-in and --prefetch-list files, merged in this order
    profiles: tuple[ProfileSource, ...] = ()
    #: a profile that prioritizes nothing is a warning instead of an error
    allow_empty_profile: bool = False
    #: run the workload with these options (any source; --runner); see workload.options
    sampler: SamplerOptions | None = None
    #: write the record of the workload run here (ctr-remote's --record-out)
    record_out: Path | None = None
    #: also write the workload run's files as a prefetch list here
    prefetch_list_out: Path | None = None
    #: how to reach the source's and the destination's stores
    src_store: StoreOptions = field(default_factory=StoreOptions)
    dst_store: StoreOptions = field(default_factory=StoreOptions)
    progress: Progress | None = None
    #: the converted-layer cache (estargz_opt.cache); None: no cache (--no-cache)
    cache_dir: Path | None = None
    cache_max_size: int = DEFAULT_MAX_SIZE

    @property
    def runs_workload(self) -> bool:
        return not (self.no_optimize or self.profiles)

    @staticmethod
    def layer_format(zstdchunked: bool, external_toc: bool, flavor: str = "stargz") -> Format:
        """The layer format the flags ask for (they exclude each other)."""
        if zstdchunked and external_toc:
            raise UsageError("--zstdchunked and --estargz-external-toc do not go together")
        if flavor != "stargz" and not zstdchunked:
            raise UsageError("--zstdchunked-flavor needs --zstdchunked")
        if zstdchunked:
            return Format.ZSTDCHUNKED
        return Format.EXTERNAL_TOC if external_toc else Format.ESTARGZ

    def validate(self) -> None:
        """Every check of how optimize's options combine, as UsageError (exit 2)."""
        src, dst = reference.parse(self.src), reference.parse(self.dst)
        fmt = self.layer.format
        if fmt is Format.ZSTDCHUNKED and not self.oci:
            raise UsageError("--zstdchunked requires --oci")
        if fmt is Format.EXTERNAL_TOC and self.reuse:
            raise UsageError("--estargz-external-toc cannot be combined with --reuse")
        if self.no_optimize and any(p.kind is ProfileKind.PREFETCH_LIST for p in self.profiles):
            raise UsageError("--prefetch-list cannot be combined with --no-optimize")
        if isinstance(dst, reference.DockerArchiveRef):
            raise UsageError(
                f"{dst}: docker-archive: images are read only; write oci-archive:PATH[:TAG] "
                "or oci:DIR[:TAG]"
            )
        if self.runs_workload and self.sampler is not None:
            check_runner(src, self.sampler)
        if isinstance(dst, reference.RegistryRef) and dst.digest:
            raise UsageError(f"the destination {dst} names a digest; give it a tag instead")
        if self.record_out and not self.runs_workload:
            raise UsageError(
                "--record-out records a workload run; it cannot be combined with --record-in, "
                "--prefetch-list or --no-optimize"
            )
        if self.prefetch_list_out and not (self.runs_workload or self.profiles):
            raise UsageError(
                "--prefetch-list-out writes the files of a workload run or of the profiles; "
                "--no-optimize has neither"
            )
        if self.allow_empty_profile and not self.profiles:
            raise UsageError("--allow-empty-profile applies to --record-in and --prefetch-list")
        if self.cache_max_size < 0:
            raise UsageError(f"--cache-max-size must not be negative, got {self.cache_max_size}")
        if not (dst.tag or src.tag):
            raise UsageError(f"name the destination tag: {dst} needs oci:DIR:TAG")


@dataclass(slots=True)
class OptimizeOutcome:
    format: str
    source_digest: str
    digest: str
    extra_image: str | None
    result: ConvertResult
    warnings: list[str] = field(default_factory=list)
    #: the workload run, when optimize ran one
    analysis: Analysis | None = None
    #: the --record-in / --prefetch-list profile as matched to the host image
    profile: Profile | None = None

    def report(self) -> dict[str, Any]:
        """The `optimize --json` report."""
        layers = []
        for lay in self.result.layers:
            r = lay.result
            layers.append(
                {
                    "platform": lay.platform,
                    "source": {
                        "digest": lay.source.digest,
                        "size": lay.source.size,
                        "mediaType": lay.source.media_type,
                    },
                    "target": {
                        "digest": lay.target.digest,
                        "size": lay.target.size,
                        "mediaType": lay.target.media_type,
                    },
                    "diffID": lay.diff_id or None,
                    "format": "reused" if r is None else self.format,
                    "prioritizedFiles": r.prioritized_files if r else 0,
                    "prefetchBytes": r.prefetch_size if r else None,
                    **self._profile_counts(lay.source.digest, r),
                    "cache": lay.cache,
                    "seconds": round(lay.seconds, 3),
                }
            )
        return {
            "source": self.source_digest,
            "target": self.digest,
            "layers": layers,
            "extraImage": self.extra_image,
            "warnings": self.warnings,
            "workload": None if self.analysis is None else self.analysis.report(),
            "profile": None
            if self.profile is None
            else {
                "files": self.profile.files,
                "matched": self.profile.matched,
                "missing": len(self.profile.missing),
                "missingExamples": self.profile.missing[:EXAMPLES],
            },
        }

    def _profile_counts(self, digest: str, r: LayerResult | None) -> dict[str, int]:
        """Of one layer: prioritized files that came from the profile, profile paths missing."""
        if self.profile is None:
            return {}
        listed = len(self.profile.prioritized.get(digest, ()))
        absent = len(r.missing_prioritized) if r else 0
        return {
            "profileFiles": listed - absent,
            "profileMissing": self.profile.missing_by_layer.get(digest, 0) + absent,
        }


def optimize(req: OptimizeRequest) -> OptimizeOutcome:
    req.validate()
    src_ref, dst_ref = reference.parse(req.src), reference.parse(req.dst)
    matcher = platforms.matcher(req.platforms, req.all_platforms)
    run_workload = req.runs_workload
    if req.record_out:
        check_record_out(req.record_out)
    if req.prefetch_list_out:
        check_record_out(req.prefetch_list_out, "--prefetch-list-out")
    dst_tag = dst_ref.tag or src_ref.tag
    assert dst_tag  # validate() checked it
    with ExitStack() as stack:
        src = stack.enter_context(open_store(src_ref, req.src_store, create=False))
        root = src.resolve(src_ref.tag)
        # The host layers, decompressed while the workload runs, for their conversion.
        spool = Spool()
        stack.callback(spool.close)
        same = same_store(src_ref, dst_ref)
        cache = LayerCache(req.cache_dir, req.cache_max_size) if req.cache_dir else None
        if cache:
            stack.callback(cache.finish)
        dst: Store = (
            src if same else stack.enter_context(open_store(dst_ref, req.dst_store, create=True))
        )
        pair(src, dst)
        try:
            # The destination is opened (a registry's push access checked) before the
            # workload runs, so a refusal costs no run and no conversion; then the platforms
            # are checked (which reads a single manifest's config), before the run too.
            check_selection(src, root, matcher, str(src_ref))
            log.info(
                "converting platforms: %s%s",
                matcher.describe(),
                "; use --platform or --all-platforms for others" if matcher.host_default else "",
            )
            analysis = None
            if run_workload:
                analysis = _analyze(req, src, root, src_ref, matcher, spool)
                prioritized = analysis.prioritized if analysis else {}
                profile = None
            else:
                profile = _profile(req, src, root, matcher)
                prioritized = profile.prioritized if profile else {}
                if profile and req.prefetch_list_out:
                    _write_prefetch_list_out(
                        req.prefetch_list_out,
                        str(src_ref),
                        profile.manifest_digest,
                        profile.order,
                        "profile's",
                    )
            opts = ConvertOptions(
                layer=req.layer,
                platforms=matcher,
                oci=req.oci,
                reuse=req.reuse,
                prioritized=prioritized,
                progress=req.progress,
                cache=cache,
                spool=spool,
            )
            result = Converter(src, dst, opts, same_store=same).convert(root)
            if cache and cache.warning:
                result.warnings.append(cache.warning)
            if (
                profile
                and profile.prioritized
                and not any(lay.result and lay.result.prioritized_files for lay in result.layers)
            ):
                _empty_profile(req, profile.empty_reason(req.profiles))
            tags = {dst_tag: result.target}
            extra = None
            if req.layer.format is Format.EXTERNAL_TOC:
                tags[dst_tag + TOC_IMAGE_SUFFIX] = toc_image(result.toc_layers, dst)
                extra = str(dst_ref.with_tag(dst_tag + TOC_IMAGE_SUFFIX))
            dst.tag(tags)
        except BaseException:
            dst.rollback()
            raise
    return OptimizeOutcome(
        req.layer.format.value,
        root.digest,
        result.target.digest,
        extra,
        result,
        result.warnings,
        analysis,
        profile,
    )


def analyze_image(
    src: str,
    sampler: SamplerOptions,
    record_out: Path,
    store_opts: StoreOptions,
    progress: Progress | None = None,
    prefetch_list_out: Path | None = None,
    *,
    cache_dir: Path | None,
) -> Analysis:
    """`estargz-opt analyze`: run the workload and write its record; convert nothing.
    The runc runner keeps unpacked layers under `cache_dir` (None: --no-cache)."""
    ref = reference.parse(src)
    check_runner(ref, sampler)
    check_record_out(record_out)
    if prefetch_list_out:
        check_record_out(prefetch_list_out, "--prefetch-list-out")
    with open_store(ref, store_opts, create=False) as store:
        root = store.resolve(ref.tag)
        check_selection(
            store,
            root,
            platforms.matcher((), False),
            str(ref),
            "the workload runs only on the host platform",
        )
        host = _host_manifest(store, root)
        if host is None:
            raise EstargzOptError(
                f"{ref} has no image for the host platform {platforms.host()}: "
                "the workload cannot run here"
            )
        result = _run_workload(store, str(ref), host, sampler, progress, cache_dir=cache_dir)
    write_record(record_out, result.entries)
    if prefetch_list_out:
        _write_prefetch_list_out(
            prefetch_list_out, str(ref), host[0].digest, [e.path for e in result.entries]
        )
    return result


def check_runner(src: reference.ImageRef, sampler: SamplerOptions) -> None:
    """--runner containerd runs only images in containerd (UsageError otherwise)."""
    if sampler.runner == "containerd" and not isinstance(src, reference.ContainerdRef):
        raise UsageError(
            f"--runner containerd runs images in containerd, and {src} is not one; drop "
            "--runner (the runc runner runs it) or import the image into containerd"
        )


def _write_prefetch_list_out(
    path: Path, image: str, manifest_digest: str, paths: list[str], what: str = "workload"
) -> None:
    """The prioritized files as a prefetch list: reviewable, and matched by path."""
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_prefetch_list(
        path,
        paths,
        [
            f"estargz-opt prefetch list: the {what} files of {image} ({manifest_digest}), "
            f"written {when}",
            "one path per line, in access order; use with estargz-opt optimize --prefetch-list",
        ],
    )


def _run_workload(
    store: Store,
    name: str,
    host: tuple[Descriptor, Manifest],
    sampler: SamplerOptions,
    progress: Progress | None,
    spool: Spool | None = None,
    *,
    cache_dir: Path | None,
) -> Analysis:
    """The workload run of optimize and analyze, with its countdown and output on stderr;
    the runc runner keeps unpacked layers under `cache_dir` (None: --no-cache)."""
    from estargz_opt.workload.analyzer import analyze

    return analyze(
        store,
        name,
        host[0],
        host[1],
        sampler,
        on_tick=progress.sampling if progress else None,
        # The sampler only writes and flushes its output, which the passthrough does.
        output=progress.passthrough() if progress else None,  # type: ignore[arg-type]
        spool=spool,
        cache_dir=cache_dir,
    )


def _analyze(
    req: OptimizeRequest,
    src: Store,
    root: Descriptor,
    src_ref: reference.ImageRef,
    matcher: platforms.Matcher,
    spool: Spool,
) -> Analysis | None:
    """Run the workload of the host platform's image; None if the host is not converted."""
    host = _host_manifest(src, root)
    if host is None or not matcher.matches(platforms.host()):
        # ctr-remote too skips its analyzer when no --platform is the host's.
        log.warning(
            "the workload runs only on the host platform %s, and %s: no files are prioritized",
            platforms.host(),
            f"{src_ref} has no image for it" if host is None else "--platform does not convert it",
        )
        return None
    if req.platforms or req.all_platforms:
        log.info(
            "the workload runs for the host platform %s only; other platforms are "
            "converted without prioritized files",
            platforms.host(),
        )
    host_desc, manifest = host
    sampler = req.sampler or SamplerOptions()
    result = _run_workload(
        src, str(src_ref), host, sampler, req.progress, spool, cache_dir=req.cache_dir
    )
    if req.record_out:
        write_record(req.record_out, result.entries)
    if req.prefetch_list_out:
        _write_prefetch_list_out(
            req.prefetch_list_out, str(src_ref), host_desc.digest, [e.path for e in result.entries]
        )
    result.prioritized = prioritized_from_record(result.entries, host_desc.digest, manifest)
    return result


def _profile(
    req: OptimizeRequest, src: Store, root: Descriptor, matcher: platforms.Matcher
) -> Profile | None:
    """Match the profiles to the host image; EmptyProfileError if that prioritizes nothing."""
    if not req.profiles:
        return None
    host = _host_manifest(src, root)
    if host is None or not matcher.matches(platforms.host()):
        _empty_profile(
            req,
            f"the profile applies to the host platform {platforms.host()}, and "
            + (
                "the image has no manifest for it (the wrong platform?)"
                if host is None
                else "it is not converted here (the wrong --platform?)"
            ),
        )
        return None
    host_desc, manifest = host

    def layer_names() -> LayerNames:
        layers = [x for x in manifest.layers if x.media_type in d.LAYER_TYPES]
        names = []
        for i, layer in enumerate(layers):
            with src.local_file(layer, f"layer {i} of the host image") as p:
                names.append(LayerNames.names_in(p))
        return LayerNames(names)

    profile = match_profile(
        req.profiles, host_desc.digest, manifest, layer_names, lambda m: _layer_ids(src, m)
    )
    log.info(
        "prioritized files: %d in %d layer(s) of %s",
        profile.matched,
        len(profile.prioritized),
        host_desc.digest,
    )
    if not profile.prioritized:
        _empty_profile(req, profile.empty_reason(req.profiles))
    elif profile.matched * 2 < profile.files:
        log.warning(
            "the profile matches only %d of its %d files in %s (e.g. not found: %s)",
            profile.matched,
            profile.files,
            host_desc.digest,
            ", ".join(profile.missing[:EXAMPLES]),
        )
    return profile


def _layer_ids(store: Store, manifest_digest: str) -> list[LayerId] | None:
    """The layers of the manifest `manifest_digest`, if the store holds it (and its config)."""
    size = store.size_of(manifest_digest)
    if size is None or size > MAX_MANIFEST_SIZE:
        return None
    where = f"manifest {manifest_digest}"
    try:
        manifest = Manifest.parse(
            store.read(Descriptor(d.OCI_MANIFEST, manifest_digest, size), where), where
        )
        layers = [x for x in manifest.layers if x.media_type in d.LAYER_TYPES]
        config = d.load_json(store.read(manifest.config, f"config of {where}"), where)
        diff_ids = d.config_diff_ids(config, len(layers), where)
    except EstargzOptError as exc:
        log.debug("the layers of %s are unknown: %s", manifest_digest, exc)
        return None
    return [LayerId(x.digest, i) for x, i in zip(layers, diff_ids, strict=True)]


def _empty_profile(req: OptimizeRequest, reason: str) -> None:
    """A profile that prioritizes nothing: an error, or a warning under --allow-empty-profile."""
    if not req.allow_empty_profile:
        raise EmptyProfileError(
            f"{reason}; nothing written (--allow-empty-profile converts anyway)"
        )
    log.warning("%s: converting without prioritized files (--allow-empty-profile)", reason)


def _host_manifest(src: Store, desc: Descriptor) -> tuple[Descriptor, Manifest] | None:
    """The manifest a record refers to: the host platform's, matched strictly, as upstream."""
    host = platforms.matcher((), False)
    for image in images(src, desc, host, need_platform=True):
        return image.desc, image.manifest
    return None
