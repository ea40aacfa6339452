"""`optimize` and `analyze` from end to end: references -> stores -> prioritized files ->
convert -> tag.

The tag is written only after every blob is in place; on any failure (or Ctrl-C) the
destination store rolls back what this run wrote.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from estargz_opt import attest, descriptor as d, platforms, reference, signatures
from estargz_opt.constants import (
    MAX_MANIFEST_SIZE,
    TOC_IMAGE_SUFFIX,
)
from estargz_opt.errors import (
    OPTION_TERMS,
    EmptyProfileError,
    EmulationUnavailableError,
    literal,
)
from estargz_opt.prioritize.layerindex import LayerNames
from estargz_opt.prioritize.prefetch import write_prefetch_list
from estargz_opt.prioritize.profile import (
    EXAMPLES,
    LayerId,
    Profile,
    ProfileKind,
    match_profile,
)
from estargz_opt.prioritize.record import (
    check_record_out,
    prioritized_from_record,
    read_record,
    write_record,
)
from estargz_opt.report import OptimizeResult
from estargz_opt.request import AnalyzeRequest, OptimizeRequest, check_runner
from estargz_opt.workload.options import SamplerOptions

if TYPE_CHECKING:
    from estargz_opt.workload.analyzer import Analysis
from estargz_opt.cache import LayerCache
from estargz_opt.cache.remote import open_remote
from estargz_opt.convert import (
    Converter,
    ConvertOptions,
    ConvertResult,
    toc_image,
)
from estargz_opt.descriptor import Descriptor, Manifest, Platform
from estargz_opt.errors import EstargzOptError
from estargz_opt.events import ProgressListener
from estargz_opt.format import Format
from estargz_opt.format.source import Spool
from estargz_opt.stores import Referring, Store, open_store, pair, same_store
from estargz_opt.walk import PlatformImage, check_selection, images, root_platform
from estargz_opt.workload import emulation
from estargz_opt.workload.emulation import Emulation

log = logging.getLogger("estargz_opt")


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
        # The host layers, decompressed while the workload runs, for their conversion.
        spool = Spool()
        stack.callback(spool.close)
        same = same_store(src_ref, dst_ref)
        cache = LayerCache(req.cache_dir, req.cache_max_size) if req.cache_dir else None
        if cache:
            stack.callback(cache.finish)
        remote = (
            stack.enter_context(open_remote(req.cache_ref, req.dst_store.registry,
                                            req.cache_ref_trust))
            if req.cache_ref else None
        )
        dst: Store = (
            src if same else stack.enter_context(open_store(dst_ref, req.dst_store, create=True))
        )
        pair(src, dst)
        try:
            # The destination is opened (a registry's push access checked) before the
            # workload runs, so a refusal costs no run and no conversion; then the platforms
            # are checked (which reads a single manifest's config), before the run too.
            check_selection(src, root, matcher, str(src_ref))
            if matcher.host_default:
                log.info(
                    "converting platforms: %s; use %s or %s for others",
                    matcher.describe(),
                    "platforms",
                    "all_platforms",
                    extra={OPTION_TERMS: True},
                )
            else:
                log.info("converting platforms: %s", matcher.describe())
            analysis = None
            if run_workload:
                analysis = _analyze(req, src, root, src_ref, matcher, spool, progress)
                prioritized = analysis.prioritized if analysis else {}
                profile = None
            else:
                profile, lists = _profile(req, src, root, matcher)
                prioritized = profile.prioritized if profile else {}
                if profile and req.prefetch_list_out:
                    _write_prefetch_lists(req.prefetch_list_out, str(src_ref), lists, "profile's")
            opts = ConvertOptions(
                layer=req.layer,
                platforms=matcher,
                oci=req.oci,
                reuse=req.reuse,
                prioritized=prioritized,
                progress=progress,
                cache=cache,
                remote=remote,
                spool=spool,
                drop_attestations=req.drop_attestations,
                with_referrer=req.with_referrer,
            )
            converter = Converter(src, dst, opts, same_store=same)
            result = converter.convert(root)
            signed = signatures.find(src, list(result.converted))
            for message in signed.warnings(result.converted, signatures.image_name(dst_ref)):
                log.warning("%s", message)
                result.warnings.append(message)
            if cache and cache.warning:
                result.warnings.append(cache.warning)
            if (
                profile
                and profile.prioritized
                and not any(lay.result and lay.result.prioritized_files for lay in result.layers)
            ):
                _empty_profile(req, literal(profile.empty_reason(req.profiles)))
            attach = _referrers(
                req, root.digest, converter, result, signed, dst, dst_ref, prioritized
            )
            tags = {dst_tag: result.target}
            extra = None
            if req.layer.format is Format.EXTERNAL_TOC:
                tags[dst_tag + TOC_IMAGE_SUFFIX] = toc_image(result.toc_layers, dst)
                extra = str(dst_ref.with_tag(dst_tag + TOC_IMAGE_SUFFIX))
            dst.tag(tags)
            if isinstance(dst, Referring):
                if req.with_referrer:
                    attach.append((root.digest, result.target))
                for subject, referrer in attach:
                    dst.attach(subject, referrer)
            if remote is not None:
                remote.publish_all(
                    (dst_ref.api_host, dst_ref.repository)
                    if isinstance(dst_ref, reference.RegistryRef) else None
                )
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
        signed,
    )


def _referrers(
    req: OptimizeRequest,
    source: str,
    converter: Converter,
    result: ConvertResult,
    signed: signatures.Signatures,
    dst: Store,
    dst_ref: reference.ImageRef,
    prioritized: Mapping[str, Sequence[str]],
) -> list[tuple[str, Descriptor]]:
    """The referrers written for the converted image, as (subject digest, referrer), for
    the destination to list once tagged: the source's SBOM and provenance referrers, moved
    onto the converted manifests, and the --attest statement. A destination that keeps no
    referrers (containerd, archives) gets none, and a warning says what was left out."""
    copies = [] if req.drop_attestations else [
        (old, target, ref)
        for old, target in result.converted.items()
        for ref in signed.attachments.get(old, [])
    ]
    if not isinstance(dst, Referring):
        left = [f"{len(copies)} referrers of the source"] if copies else []
        left += ["the conversion attestation"] if req.attest else []
        if left:
            message = f"{dst_ref} keeps no OCI referrers: not attached: {', '.join(left)}"
            log.warning("%s", message)
            result.warnings.append(message)
        return []
    out = [
        (target.digest, copied)
        for old, target, ref in copies
        if (copied := converter.copy_referrer(ref, old, target)) is not None
    ]
    if req.attest:
        doc = attest.statement(
            source,
            result.target,
            signatures.image_name(dst_ref) or str(dst_ref),
            result,
            req.layer,
            prioritized,
        )
        out.append((result.target.digest, attest.write(dst, result.target, doc)))
    return out


def analyze(req: AnalyzeRequest, progress: ProgressListener | None = None) -> Analysis:
    """Run the workload of req.src and write its record; convert nothing. The runc runner
    keeps unpacked layers under req.cache_dir (None: for this run only)."""
    ref = reference.parse(req.src)
    check_runner(ref, req.sampler)
    check_record_out(req.record_out)
    if req.prefetch_list_out:
        check_record_out(req.prefetch_list_out, "prefetch list")
    with open_store(ref, req.store, create=False) as store:
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
        result = _run_workload(
            store, str(ref), host, req.sampler, progress, cache_dir=req.cache_dir
        )
    write_record(req.record_out, result.entries)
    if req.prefetch_list_out:
        _write_prefetch_list_out(
            req.prefetch_list_out, str(ref), host[0].digest, [e.path for e in result.entries]
        )
    return result


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
        output=progress.workload_output() if progress else None,
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
    progress: ProgressListener | None,
) -> Analysis | None:
    """Run the workload once per selected platform (foreign ones under qemu-user); None if
    no platform ran. Each platform's files go to its own layers; the record holds every
    platform's entries under its own manifest digest."""
    runs = _workload_images(src, root, matcher, src_ref, req.allow_empty_profile)
    if not runs:
        return None
    sampler = req.sampler or SamplerOptions()
    combined: Analysis | None = None
    lists: list[tuple[Platform, str, list[str]]] = []
    for emu, desc, manifest in runs:
        if len(runs) > 1 or emu.entry:
            log.info("running the workload for %s", emu.describe())
        result = _run_workload(
            src, str(src_ref), (desc, manifest), sampler, progress, spool, cache_dir=req.cache_dir
        )
        lists.append((emu.platform, desc.digest, [e.path for e in result.entries]))
        mine = prioritized_from_record(result.entries, desc.digest, manifest)
        result.platform = str(emu.platform)
        if combined is None:
            combined = result
            combined.prioritized = mine
            continue
        combined.others.append(result)
        combined.entries.extend(result.entries)
        for layer, paths in mine.items():
            have = combined.prioritized.setdefault(layer, [])
            have.extend(x for x in paths if x not in have)
    assert combined is not None
    if req.record_out:
        write_record(req.record_out, combined.entries)
    if req.prefetch_list_out:
        _write_prefetch_lists(req.prefetch_list_out, str(src_ref), lists)
    return combined


def _write_prefetch_lists(
    path: Path, image: str, lists: list[tuple[Platform, str, list[str]]], what: str = "workload"
) -> None:
    """One list per platform: `path` itself for one, `path.<os>-<arch>[-<variant>]` each
    for several (plain lists stay readable by every tool; a marker inside would not)."""
    for platform, digest, paths in lists:
        out = (
            path if len(lists) == 1 else path.with_name(f"{path.name}.{platform_suffix(platform)}")
        )
        _write_prefetch_list_out(out, image, digest, paths, what)


def platform_suffix(p: Platform) -> str:
    """`linux-arm64-v8`: the suffix of a platform's own prefetch list."""
    return "-".join(x for x in (p.os, p.architecture, p.variant) if x)


def _workload_images(
    src: Store,
    root: Descriptor,
    matcher: platforms.Matcher,
    src_ref: reference.ImageRef,
    allow_empty_profile: bool,
) -> list[tuple[Emulation, Descriptor, Manifest]]:
    """The selected platforms' manifests whose workload can run here, natively or emulated.

    A platform that cannot run refuses the run (EmulationUnavailableError), or with
    allow_empty_profile is converted without prioritized files, as ctr-remote does.
    """
    if matcher.host_default:
        host = _host_manifest(src, root)
        if host is None:
            log.warning(
                "%s has no image for the host platform %s: no files are prioritized",
                src_ref,
                platforms.host(),
            )
            return []
        return [(Emulation(platforms.host()), *host)]
    out: list[tuple[Emulation, Descriptor, Manifest]] = []
    for image in images(src, root, matcher, need_platform=True):
        try:
            emu = emulation.find(_platform_of(src, image))
        except EmulationUnavailableError as exc:
            if not allow_empty_profile:
                raise EmulationUnavailableError.with_terms(
                    str(exc).replace("{", "{{").replace("}", "}}")
                    + "; or {allow} converts it without prioritized files",
                    allow="allow_empty_profile=True",
                ) from None
            log.warning("%s: converting it without prioritized files", exc)
            continue
        out.append((emu, image.desc, image.manifest))
    return out


def _profile(
    req: OptimizeRequest, src: Store, root: Descriptor, matcher: platforms.Matcher
) -> tuple[Profile | None, list[tuple[Platform, str, list[str]]]]:
    """Match the profiles to each selected platform's image; EmptyProfileError if that
    prioritizes nothing. Returns the first matched platform's profile, its `prioritized`
    holding every platform's layers (each platform's files in its own layers), and each
    platform's files in order (for the prefetch lists)."""
    if not req.profiles:
        return None, []
    targets = _profile_targets(req, src, root, matcher)
    if not targets and not matcher.host_default:
        _empty_profile(req, "the profiles have lines for none of the selected platforms")
        return None, []
    if not targets:
        host = _host_manifest(src, root)
        _empty_profile(
            req,
            f"the profile applies to the host platform {platforms.host()}, and "
            + (
                "the image has no manifest for it (the wrong platform?)"
                if host is None
                else "it is not converted here (the wrong {platforms}?)"
            ),
            platforms="platforms",
        )
        return None, []
    merged: Profile | None = None
    lists: list[tuple[Platform, str, list[str]]] = []
    for platform, desc, manifest, from_manifest in targets:
        profile = _match_one(req, src, desc, manifest, from_manifest)
        lists.append((platform, desc.digest, list(profile.order)))
        if merged is None:
            merged = profile
            continue
        for layer, paths in profile.prioritized.items():
            merged.prioritized.setdefault(layer, []).extend(paths)
    assert merged is not None
    if not merged.prioritized:
        _empty_profile(req, literal(merged.empty_reason(req.profiles)))
    return merged, lists


def _profile_targets(
    req: OptimizeRequest, src: Store, root: Descriptor, matcher: platforms.Matcher
) -> list[tuple[Platform, Descriptor, Manifest, str | None]]:
    """(platform, descriptor, manifest, whose record lines to apply by path or None) per platform.

    A platform the records name gets its own lines. One they do not name while they name a
    sibling platform gets nothing, unless profile_platform names the sibling to apply by
    path. Records naming no manifest of the image (a rebuilt image) and prefetch lists
    apply to every platform by path, the portable rules.
    """
    if matcher.host_default:
        host = _host_manifest(src, root)
        return [(platforms.host(), *host, None)] if host else []
    selected = [
        (_platform_of(src, image), image.desc, image.manifest)
        for image in images(src, root, matcher, need_platform=True)
    ]
    every = {
        _platform_key(_platform_of(src, image)): image.desc.digest
        for image in images(src, root, platforms.matcher((), True), need_platform=True)
    }
    named = {
        e.manifest_digest
        for source in req.profiles
        if source.kind is ProfileKind.RECORD
        for e in read_record(source.path)
    }
    lists = any(source.kind is ProfileKind.PREFETCH_LIST for source in req.profiles)
    chosen = None
    if req.profile_platform:
        chosen = every.get(_platform_key(platforms.parse(req.profile_platform)))
        if chosen is None or chosen not in named:
            raise EstargzOptError.with_terms(
                f"{{pp}} {req.profile_platform}: the image has no such platform, or the "
                "records have no lines for it",
                pp="profile_platform",
            )
    siblings = named & set(every.values())
    out: list[tuple[Platform, Descriptor, Manifest, str | None]] = []
    for platform, desc, manifest in selected:
        if desc.digest in named or lists or not siblings:
            out.append(
                (platform, desc, manifest, None)
            )  # its own lines, path lists, a rebuilt image
            continue
        if chosen is not None:
            out.append((platform, desc, manifest, chosen))  # another platform's lines, by path
            continue
        log.warning(
            "the records have no lines for %s: converting it without prioritized files "
            "(%s applies another platform's by path)",
            platform,
            "profile_platform",
            extra={OPTION_TERMS: True},
        )
    return out


def _platform_of(src: Store, image: PlatformImage) -> Platform:
    if image.desc.platform:
        return image.desc.platform
    if image.platform:
        return platforms.parse(image.platform)
    return root_platform(src, image.desc, image.manifest) or platforms.host()


def _platform_key(p: Platform) -> tuple[str, str, str]:
    return platforms.normalize(p)


def _match_one(
    req: OptimizeRequest,
    src: Store,
    desc: Descriptor,
    manifest: Manifest,
    from_manifest: str | None,
) -> Profile:
    def layer_names() -> LayerNames:
        layers = [x for x in manifest.layers if x.media_type in d.LAYER_TYPES]
        names = []
        for i, layer in enumerate(layers):
            with src.local_file(layer, f"layer {i} of {desc.digest}") as p:
                names.append(LayerNames.names_in(p))
        return LayerNames(names)

    profile = match_profile(
        req.profiles,
        desc.digest,
        manifest,
        layer_names,
        lambda m: _layer_ids(src, m),
        from_manifest=from_manifest,
    )
    log.info(
        "prioritized files: %d in %d layer(s) of %s",
        profile.matched,
        len(profile.prioritized),
        desc.digest,
    )
    if profile.prioritized and profile.matched * 2 < profile.files:
        log.warning(
            "the profile matches only %d of its %d files in %s (e.g. not found: %s)",
            profile.matched,
            profile.files,
            desc.digest,
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


def _empty_profile(req: OptimizeRequest, reason: str, **terms: str) -> None:
    """A profile that prioritizes nothing: an error, or a warning with allow_empty_profile.
    `reason` is a template over `terms` (see EstargzOptError.with_terms)."""
    terms["allow"] = "allow_empty_profile=True"
    error = EmptyProfileError.with_terms(
        reason + "; nothing written ({allow} converts anyway)", **terms
    )
    if not req.allow_empty_profile:
        raise error
    log.warning(
        "%s: converting without prioritized files (%s)",
        str(error).split("; nothing written", 1)[0],
        terms["allow"],
        extra={OPTION_TERMS: True},
    )


def _host_manifest(src: Store, desc: Descriptor) -> tuple[Descriptor, Manifest] | None:
    """The manifest a record refers to: the host platform's, matched strictly, as upstream."""
    host = platforms.matcher((), False)
    for image in images(src, desc, host, need_platform=True):
        return image.desc, image.manifest
    return None
