"""`optimize` and `analyze` from end to end: references -> stores -> prioritized files ->
convert -> tag.

The tag is written only after every blob is in place; on any failure (or Ctrl-C) the
destination store rolls back what this run wrote.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from estargz_opt import descriptor as d
from estargz_opt import platforms, reference
from estargz_opt.cache import default_dir as default_cache_dir
from estargz_opt.constants import (
    DEFAULT_CACHE_MAX_SIZE,
    DEFAULT_CHUNK_SIZE,
    MAX_MANIFEST_SIZE,
    TOC_IMAGE_SUFFIX,
)
from estargz_opt.errors import OPTION_TERMS, EmptyProfileError
from estargz_opt.prioritize.layerindex import LayerNames
from estargz_opt.prioritize.prefetch import write_prefetch_list
from estargz_opt.prioritize.profile import (
    EXAMPLES,
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
from estargz_opt.cache import LayerCache
from estargz_opt.convert import (
    Converter,
    ConvertOptions,
    ConvertResult,
    LayerReport,
    toc_image,
)
from estargz_opt.descriptor import Descriptor, Manifest
from estargz_opt.errors import EstargzOptError, OptionsError, UsageError
from estargz_opt.events import ProgressListener
from estargz_opt.format import Format, LayerOptions
from estargz_opt.format.build import LayerResult
from estargz_opt.format.source import Spool
from estargz_opt.stores import Store, StoreOptions, open_store, pair, same_store
from estargz_opt.walk import images

log = logging.getLogger("estargz_opt")


@dataclass(frozen=True, slots=True)
class OptimizeRequest:
    """What `optimize` converts, and how. Build one with `from_options`: it fills the
    defaults that depend on other options and checks how the options combine."""

    src: str
    dst: str
    layer: LayerOptions = field(default_factory=LayerOptions)
    #: convert Docker media types to OCI ones (needed for the annotations)
    oci: bool = False
    #: keep layers that are already sound eStargz and get no prioritized files
    reuse: bool = False
    #: platforms to convert ("linux/arm64"); none: the host's
    platforms: tuple[str, ...] = ()
    all_platforms: bool = False
    #: convert without prioritized files (no workload run, no record)
    no_optimize: bool = False
    #: records and prefetch lists, merged in this order
    profiles: tuple[ProfileSource, ...] = ()
    #: a profile that prioritizes nothing is a warning instead of an error
    allow_empty_profile: bool = False
    #: run the workload with these options (any source); see workload.options
    sampler: SamplerOptions | None = None
    #: write the record of the workload run here (ctr-remote's --record-out)
    record_out: Path | None = None
    #: also write the workload run's (or the profiles') files as a prefetch list here
    prefetch_list_out: Path | None = None
    #: how to reach the source's and the destination's stores
    src_store: StoreOptions = field(default_factory=StoreOptions)
    dst_store: StoreOptions = field(default_factory=StoreOptions)
    #: the converted-layer cache (estargz_opt.cache); None: no cache
    cache_dir: Path | None = None
    cache_max_size: int = DEFAULT_CACHE_MAX_SIZE

    @classmethod
    def from_options(
        cls,
        src: str,
        dst: str,
        *,
        format: Format | str = Format.ESTARGZ,
        compression_level: int | None = None,
        chunk_size: int = 0,
        min_chunk_size: int = 0,
        workers: int | None = None,
        oci: bool = False,
        reuse: bool = False,
        platforms: Sequence[str] = (),
        all_platforms: bool = False,
        no_optimize: bool = False,
        profiles: Sequence[ProfileSource] = (),
        allow_empty_profile: bool = False,
        sampler: SamplerOptions | None = None,
        record_out: Path | None = None,
        prefetch_list_out: Path | None = None,
        src_store: StoreOptions | None = None,
        dst_store: StoreOptions | None = None,
        cache: bool = True,
        cache_dir: Path | None = None,
        cache_max_size: int = DEFAULT_CACHE_MAX_SIZE,
    ) -> OptimizeRequest:
        """A checked request, with every default that depends on other options filled in.

        The fields are those of the same names, except: compression_level None is the
        format's default; chunk_size 0 is DEFAULT_CHUNK_SIZE; min_chunk_size is dropped
        for zstdchunked (upstream ignores it there); records among `profiles` are
        dropped under no_optimize (as ctr-remote ignores its --record-in then) while
        prefetch lists are refused; `cache` with no cache_dir uses the default cache
        directory (estargz_opt.cache.default_dir). OptionsError if options contradict.
        """
        fmt = Format(format)
        layer = LayerOptions(
            format=fmt,
            compression_level=compression_level,
            chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
            min_chunk_size=0 if fmt is Format.ZSTDCHUNKED else min_chunk_size,
            workers=workers,
        )
        if no_optimize:
            profiles = [p for p in profiles if p.kind is not ProfileKind.RECORD]
        req = cls(
            src=src,
            dst=dst,
            layer=layer,
            oci=oci,
            reuse=reuse,
            platforms=tuple(platforms),
            all_platforms=all_platforms,
            no_optimize=no_optimize,
            profiles=tuple(profiles),
            allow_empty_profile=allow_empty_profile,
            sampler=sampler,
            record_out=record_out,
            prefetch_list_out=prefetch_list_out,
            src_store=src_store or StoreOptions(),
            dst_store=dst_store or StoreOptions(),
            cache_dir=(cache_dir or default_cache_dir()) if cache else None,
            cache_max_size=cache_max_size,
        )
        req.validate()
        return req

    @property
    def runs_workload(self) -> bool:
        return not (self.no_optimize or self.profiles)

    def validate(self) -> None:
        """Every check of how the options combine, as OptionsError (a UsageError)."""
        src, dst = reference.parse(self.src), reference.parse(self.dst)
        fmt = self.layer.format
        self.layer.validate()
        if fmt is Format.ZSTDCHUNKED and not self.oci:
            raise OptionsError("{fmt} requires {oci}", fmt=_FORMAT_TERM[fmt], oci="oci=True")
        if fmt is Format.EXTERNAL_TOC and self.reuse:
            raise OptionsError(
                "{fmt} cannot be combined with {reuse}", fmt=_FORMAT_TERM[fmt], reuse="reuse=True"
            )
        if self.no_optimize and any(p.kind is ProfileKind.PREFETCH_LIST for p in self.profiles):
            raise OptionsError(
                "{plist} cannot be combined with {no_opt}", plist=_PLIST, no_opt=_NO_OPTIMIZE
            )
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
            raise OptionsError(
                "{out} records a workload run; it cannot be combined with {rec}, {plist} "
                "or {no_opt}",
                out="record_out",
                rec=_RECORD,
                plist=_PLIST,
                no_opt=_NO_OPTIMIZE,
            )
        if self.prefetch_list_out and not (self.runs_workload or self.profiles):
            raise OptionsError(
                "{out} writes the files of a workload run or of the profiles; {no_opt} has "
                "neither",
                out="prefetch_list_out",
                no_opt=_NO_OPTIMIZE,
            )
        if self.allow_empty_profile and not self.profiles:
            raise OptionsError(
                "{allow} applies to {rec} and {plist}",
                allow="allow_empty_profile=True",
                rec=_RECORD,
                plist=_PLIST,
            )
        if self.cache_max_size < 0:
            raise OptionsError(
                "{size} must not be negative, got " + str(self.cache_max_size),
                size="cache_max_size",
            )
        if not (dst.tag or src.tag):
            raise UsageError(f"name the destination tag: {dst} needs oci:DIR:TAG")


#: how errors name the option terms (a front end spells them its own way: OptionsError)
_FORMAT_TERM = {f: f"format={f.value}" for f in Format}
_RECORD = f"profiles={ProfileKind.RECORD.value}"
_PLIST = f"profiles={ProfileKind.PREFETCH_LIST.value}"
_NO_OPTIMIZE = "no_optimize=True"


@dataclass(frozen=True, slots=True)
class AnalyzeRequest:
    """What `analyze` runs: the image's workload, recorded into `record_out`."""

    src: str
    record_out: Path
    sampler: SamplerOptions = field(default_factory=SamplerOptions)
    store: StoreOptions = field(default_factory=StoreOptions)
    #: also write the recorded files as a prefetch list here
    prefetch_list_out: Path | None = None


@dataclass(slots=True)
class OptimizeResult:
    """What `optimize` made: the new image's digest, per layer what happened, and the
    workload run or profile that ordered the files."""

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

    @property
    def layers(self) -> list[LayerReport]:
        """Per layer of every converted platform: source and target descriptors, what the
        engine did (None: reused as it was), whether the cache served it."""
        return self.result.layers

    def report(self) -> dict[str, Any]:
        """The result as a JSON object (what `optimize --json` prints)."""
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


def optimize(req: OptimizeRequest, progress: ProgressListener | None = None) -> OptimizeResult:
    """Convert req.src into req.dst, prioritized files first; see OptimizeRequest.

    The tag is written only after every blob is in place; on any failure (or
    KeyboardInterrupt) the destination store rolls back what this run wrote.
    """
    req.validate()
    src_ref, dst_ref = reference.parse(req.src), reference.parse(req.dst)
    matcher = platforms.matcher(req.platforms, req.all_platforms)
    run_workload = req.runs_workload
    if req.record_out:
        check_record_out(req.record_out)
    if req.prefetch_list_out:
        check_record_out(req.prefetch_list_out, "prefetch list")
    dst_tag = dst_ref.tag or src_ref.tag
    assert dst_tag  # validate() checked it
    with ExitStack() as stack:
        src = stack.enter_context(open_store(src_ref, req.src_store, create=False))
        root = src.resolve(src_ref.tag)
        log.info(
            "converting platforms: %s%s",
            matcher.describe(),
            ""
            if req.platforms or req.all_platforms
            else " (the host; use --platform or --all-platforms for others)",
        )
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
            # workload runs, so a refusal costs no run and no conversion.
            analysis = None
            if run_workload:
                analysis = _analyze(req, src, root, src_ref, matcher, spool, progress)
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
                progress=progress,
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
    return OptimizeResult(
        req.layer.format.value,
        root.digest,
        result.target.digest,
        extra,
        result,
        result.warnings,
        analysis,
        profile,
    )


def analyze(req: AnalyzeRequest, progress: ProgressListener | None = None) -> Analysis:
    """Run the workload of req.src and write its record; convert nothing."""
    src, sampler, record_out, prefetch_list_out = (
        req.src,
        req.sampler,
        req.record_out,
        req.prefetch_list_out,
    )
    ref = reference.parse(src)
    check_runner(ref, sampler)
    check_record_out(record_out)
    if prefetch_list_out:
        check_record_out(prefetch_list_out, "prefetch list")
    with open_store(ref, req.store, create=False) as store:
        root = store.resolve(ref.tag)
        host = _host_manifest(store, root)
        if host is None:
            raise EstargzOptError(
                f"{ref} has no image for the host platform {platforms.host()}: "
                "the workload cannot run here"
            )
        result = _run_workload(store, str(ref), host, sampler, progress)
    if result.sample.ended_by == "error":
        # analyze makes nothing but the record: an empty one would only mislead.
        raise EstargzOptError(
            f"the workload could not start, so nothing was recorded: {result.sample.error}"
        )
    write_record(record_out, result.entries)
    if prefetch_list_out:
        _write_prefetch_list_out(
            prefetch_list_out, str(ref), host[0].digest, [e.path for e in result.entries]
        )
    return result


def check_runner(src: reference.ImageRef, sampler: SamplerOptions) -> None:
    """The containerd runner runs only images in containerd (OptionsError otherwise)."""
    if sampler.runner == "containerd" and not isinstance(src, reference.ContainerdRef):
        raise OptionsError(
            "{containerd} runs images in containerd, and " + str(src).replace("{", "{{")
            + " is not one; drop {runner} (the runc runner runs it) or import the image "
            "into containerd",
            containerd="runner=containerd",
            runner="runner",
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
    progress: ProgressListener | None,
    spool: Spool | None = None,
) -> Analysis:
    """The workload run of optimize and analyze, with its countdown and output on stderr."""
    from estargz_opt.workload.analyzer import analyze

    return analyze(
        store,
        name,
        host[0],
        host[1],
        sampler,
        on_tick=progress.sampling if progress else None,
        # The sampler only writes and flushes its output, which the passthrough does.
        output=progress.workload_output() if progress else None,
        spool=spool,
    )


def _analyze(
    req: OptimizeRequest,
    src: Store,
    root: Descriptor,
    src_ref: reference.ImageRef,
    matcher: platforms.Matcher,
    spool: Spool,
    progress: ProgressListener | None,
) -> Analysis | None:
    """Run the workload of the host platform's image; None if the host is not converted."""
    host = _host_manifest(src, root)
    if host is None or not matcher.matches(platforms.host()):
        log.warning(
            "the workload runs only for the host platform %s, which is not converted "
            "here: no files are prioritized",
            platforms.host(),
        )
        return None
    if req.platforms or req.all_platforms:
        log.info(
            "the workload runs for the host platform %s only; other platforms are "
            "converted without prioritized files",
            platforms.host(),
        )
    host_desc, manifest = host
    result = _run_workload(
        src, str(src_ref), host, req.sampler or SamplerOptions(), progress, spool
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
                else "it is not converted here (the wrong platforms?)"
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
    """A profile that prioritizes nothing: an error, or a warning with allow_empty_profile."""
    allow = "allow_empty_profile=True"
    if not req.allow_empty_profile:
        raise EmptyProfileError.with_terms(
            "{reason}; nothing written ({allow} converts anyway)", reason=reason, allow=allow
        )
    log.warning(
        "%s: converting without prioritized files (%s)",
        reason,
        allow,
        extra={OPTION_TERMS: True},
    )


def _host_manifest(src: Store, desc: Descriptor) -> tuple[Descriptor, Manifest] | None:
    """The manifest a record refers to: the host platform's, matched strictly, as upstream."""
    host = platforms.matcher((), False)
    for image in images(src, desc, host, need_platform=True):
        return image.desc, image.manifest
    return None
