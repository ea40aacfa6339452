"""`optimize` and `analyze`: parse the flags into the library's request, run it, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from estargz_opt.cache.remote import ENV_REF as ENV_CACHE_REF, Trust
from estargz_opt.cli.help import CACHE, FORMAT, IMAGE, OUTPUT, PROFILE, SectionedCommand, option
from estargz_opt.cli.params import (
    INPUT_FILE,
    OUTPUT_FILE,
    ZSTD_FLAVOR,
    ZSTD_LEVEL_DEFAULT,
    Size,
    cache_dir_option,
    format_size,
    prefetch_list_out_option,
    registry,
    registry_options,
    sampler,
    workload_run_options,
)
from estargz_opt.cli.progress import Progress
from estargz_opt.constants import DEFAULT_CACHE_MAX_SIZE, DEFAULT_CHUNK_SIZE, TOC_IMAGE_SUFFIX
from estargz_opt.errors import UsageError
from estargz_opt.format import Format
from estargz_opt.pipeline import analyze, optimize
from estargz_opt.prioritize.profile import ProfileKind, ProfileSource
from estargz_opt.request import AnalyzeRequest, OptimizeRequest
from estargz_opt.stores import StoreOptions
from estargz_opt.stores.containerd.model import ContainerdOptions

GZIP_NEGATIVE_LEVELS = (
    "-1 is Go's default (6); -2 is Huffman-only, written by zlib's Z_HUFFMAN_ONLY"
)


class _ProfileOrder(SectionedCommand):
    """Keeps the command-line order of --record-in and --prefetch-list, which are merged in it.

    click gathers each repeated option into its own tuple; the parser's order of
    occurrences is the only record of how the two were interleaved, so the arguments are
    parsed once more here, for that order alone.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _opts, _args, order = self.make_parser(ctx).parse_args(args=list(args))
        ctx.meta[_PROFILE_ORDER] = [p.name for p in order if p.name in _PROFILE_KINDS]
        return super().parse_args(ctx, args)


_PROFILE_ORDER = "estargz_opt.profile_order"
_PROFILE_KINDS = {"record_in": ProfileKind.RECORD, "prefetch_list": ProfileKind.PREFETCH_LIST}


def _profiles(records: tuple[Path, ...], lists: tuple[Path, ...]) -> tuple[ProfileSource, ...]:
    """The profile files in the order given on the command line."""
    order = click.get_current_context().meta.get(_PROFILE_ORDER, [])
    values = {"record_in": iter(records), "prefetch_list": iter(lists)}
    out = [ProfileSource(_PROFILE_KINDS[name], next(values[name])) for name in order]
    if len(out) != len(records) + len(lists):  # not parsed by _ProfileOrder: records first
        out = [ProfileSource(ProfileKind.RECORD, p) for p in records]
        out += [ProfileSource(ProfileKind.PREFETCH_LIST, p) for p in lists]
    return tuple(out)


def _format(zstdchunked: bool, external_toc: bool) -> Format:
    """The layer format two flags ask for (they exclude each other)."""
    if zstdchunked and external_toc:
        raise UsageError("--zstdchunked and --estargz-external-toc do not go together")
    if zstdchunked:
        return Format.ZSTDCHUNKED
    return Format.EXTERNAL_TOC if external_toc else Format.ESTARGZ


@click.command("optimize", cls=_ProfileOrder)
@click.pass_obj
@click.argument("src")
@click.argument("dst")
@option(
    IMAGE,
    "--oci",
    is_flag=True,
    help="Convert Docker media types to OCI ones (needed for annotations).",
)
@option(
    IMAGE,
    "--platform",
    "platform_specs",
    multiple=True,
    help="Platform to convert (repeatable), e.g. linux/arm64; default: the host's.",
)
@option(IMAGE, "--all-platforms", is_flag=True, help="Convert every platform of an index.")
@option(PROFILE, "--no-optimize", is_flag=True, help="Convert without prioritized files.")
@option(
    PROFILE,
    "--record-in",
    type=INPUT_FILE,
    multiple=True,
    help="Prioritize the files of a record (ctr-remote --record-out JSON lines); repeatable. "
    "A record of another build of the image is matched by path.",
)
@option(
    PROFILE,
    "--prefetch-list",
    type=INPUT_FILE,
    multiple=True,
    help="Prioritize these paths and globs (*, ?, [], **), one per line; # comments; "
    "repeatable. Profiles are merged in the order given, the first occurrence wins.",
)
@option(
    PROFILE,
    "--profile-platform",
    metavar="OS/ARCH",
    help="With --record-in: selected platforms the record has no lines for take this "
    "platform's lines, matched by path (else they convert without prioritized files).",
)
@option(
    PROFILE,
    "--allow-empty-profile",
    is_flag=True,
    help="Convert even if the profiles prioritize no file of the image, or a selected "
    "platform cannot run here (no qemu-user): without a profile (else exit 1).",
)
@option(
    FORMAT,
    "--reuse",
    is_flag=True,
    help="Keep layers that are already sound eStargz and have no prioritized files.",
)
@option(
    FORMAT,
    "--drop-attestations",
    is_flag=True,
    help="Leave BuildKit's attestation manifests (SBOM, provenance) out of the converted "
    "index; by default they follow the converted manifests.",
)
@option(
    FORMAT,
    "--with-referrer",
    is_flag=True,
    help="Make the source the converted image's subject, so that a registry lists the "
    "converted image among the source's referrers (changes the manifest's bytes).",
)
@option(
    FORMAT,
    "--attest",
    is_flag=True,
    help="Attach an unsigned in-toto statement of the conversion (digests of the image and "
    "of each layer, DiffIDs, TOC digests, options, profile) as a referrer of the result.",
)
@option(FORMAT, "--zstdchunked", is_flag=True, help="Write zstd:chunked layers (needs --oci).")
@ZSTD_FLAVOR
@option(
    FORMAT,
    "--zstdchunked-compression-level",
    type=int,
    show_default=ZSTD_LEVEL_DEFAULT,
    help="zstd level 1-22.",
)
@option(
    FORMAT,
    "--estargz-compression-level",
    type=int,
    default=Format.ESTARGZ.default_level,
    help=f"gzip level 0-9; {GZIP_NEGATIVE_LEVELS}.",
)
@option(
    FORMAT,
    "--estargz-chunk-size",
    type=int,
    default=0,
    show_default=True,
    help=f"Chunk size in bytes (0: {format_size(DEFAULT_CHUNK_SIZE)}).",
)
@option(
    FORMAT,
    "--estargz-min-chunk-size",
    type=int,
    default=0,
    show_default=True,
    help="Minimal gzip member size (breaks upstream VerifyTOC).",
)
@option(
    FORMAT,
    "--estargz-external-toc",
    is_flag=True,
    help=f"Keep TOCs in a separate image DST{TOC_IMAGE_SUFFIX}.",
)
@cache_dir_option(default_on=True)
@option(CACHE, "--no-cache", is_flag=True, help="Neither use nor fill the converted-layer cache.")
@option(
    CACHE,
    "--cache-max-size",
    type=Size(),
    default=format_size(DEFAULT_CACHE_MAX_SIZE),
    help="Evict least recently used cache entries beyond this size after the run.",
)
@option(
    CACHE,
    "--cache-ref",
    envvar=ENV_CACHE_REF,
    metavar="docker://HOST/REPO",
    help="Also share converted layers through this registry repository (env "
    "ESTARGZ_OPT_CACHE_REF; the destination's registry credentials; pull-only ones read it).",
)
@option(
    CACHE,
    "--cache-ref-trust",
    type=click.Choice([t.value for t in Trust]),
    default=Trust.FULL.value,
    help="full: a remote entry is used once its blob verifies and matches the source "
    "layer's files; digest-only: trust the cache repository as the destination (no check).",
)
@option(
    OUTPUT,
    "--record-out",
    type=OUTPUT_FILE,
    help="Also write the record of the workload run (JSON lines) to this file.",
)
@prefetch_list_out_option
@registry_options("src-", "dest-")
@workload_run_options
def optimize_cmd(
    containerd: ContainerdOptions,
    src: str,
    dst: str,
    oci: bool,
    no_optimize: bool,
    record_in: tuple[Path, ...],
    prefetch_list: tuple[Path, ...],
    allow_empty_profile: bool,
    profile_platform: str | None,
    reuse: bool,
    drop_attestations: bool,
    with_referrer: bool,
    attest: bool,
    platform_specs: tuple[str, ...],
    all_platforms: bool,
    zstdchunked: bool,
    zstdchunked_flavor: str,
    zstdchunked_compression_level: int | None,
    estargz_compression_level: int,
    estargz_chunk_size: int,
    estargz_min_chunk_size: int,
    estargz_external_toc: bool,
    record_out: Path | None,
    prefetch_list_out: Path | None,
    cache_dir: Path | None,
    no_cache: bool,
    cache_max_size: int,
    cache_ref: str | None,
    cache_ref_trust: str,
    as_json: bool,
    quiet: bool,
    authfile: Path | None,
    **flags: Any,
) -> None:
    """Convert the image SRC into DST with prioritized files first.

    SRC and DST are images in containerd (names, as ctr shows them), OCI image layouts
    (oci:DIR[:TAG]) or registries (docker://HOST[:PORT]/REPO[:TAG|@DIGEST]), in any
    combination. The last line printed is the digest of the new image.

    Archives, as skopeo names them: oci-archive:PATH[:TAG] (SRC or DST) and
    docker-archive:PATH[:NAME:TAG] (what docker save writes; SRC only).

    Unless --record-in, --prefetch-list or --no-optimize is given, the image's workload
    runs for --period seconds in a sample container (host platform only; as root in
    containerd for an image in containerd, else with runc directly; when not root,
    rootless, with the rootfs held in memory: --runner), and the files it opens go first
    in their layers. Its output goes to stderr.

    \b
    Examples:
      estargz-opt optimize --oci --period 5 --wait-on-line ready app:1.0 app:1.0-esgz
      estargz-opt optimize --oci --record-in record.jsonl oci:app:1.0 oci:app:1.0-esgz
      estargz-opt optimize --oci --no-optimize --all-platforms oci:in:latest oci:out:latest
    """
    fmt = _format(zstdchunked, estargz_external_toc)
    src_registry = registry(flags, "src-", authfile)
    dst_registry = registry(flags, "dest-", authfile)
    workload = sampler(flags)
    progress = Progress()
    request = OptimizeRequest.from_options(
        src,
        dst,
        format=fmt,
        zstd_flavor=zstdchunked_flavor,
        compression_level=zstdchunked_compression_level
        if fmt is Format.ZSTDCHUNKED
        else estargz_compression_level,
        chunk_size=estargz_chunk_size,
        min_chunk_size=estargz_min_chunk_size,
        oci=oci,
        reuse=reuse,
        drop_attestations=drop_attestations,
        with_referrer=with_referrer,
        attest=attest,
        platforms=platform_specs,
        all_platforms=all_platforms,
        no_optimize=no_optimize,
        profiles=_profiles(record_in, prefetch_list),
        allow_empty_profile=allow_empty_profile,
        profile_platform=profile_platform,
        sampler=workload,
        record_out=record_out,
        prefetch_list_out=prefetch_list_out,
        src_store=StoreOptions(containerd, src_registry),
        dst_store=StoreOptions(containerd, dst_registry),
        cache=not no_cache,
        cache_dir=cache_dir,
        cache_max_size=cache_max_size,
        cache_ref=cache_ref,
        cache_ref_trust=cache_ref_trust,
    )
    result = optimize(request, None if quiet else progress)
    progress.close()
    if as_json:
        click.echo(json.dumps(result.report()))
        return
    if result.extra_image:
        click.echo(f"extra image: {result.extra_image}")
    click.echo(result.digest)


@click.command("analyze", cls=SectionedCommand)
@click.pass_obj
@click.argument("src")
@option(
    OUTPUT,
    "--record-out",
    required=True,
    type=OUTPUT_FILE,
    help="Where to write the record (JSON lines, ctr-remote's format).",
)
@cache_dir_option(default_on=True)
@option(
    CACHE,
    "--no-cache",
    is_flag=True,
    help="Keep no unpacked layers: the runc runner unpacks the image for this run only.",
)
@prefetch_list_out_option
@registry_options("")
@workload_run_options
def analyze_cmd(
    containerd: ContainerdOptions,
    src: str,
    record_out: Path,
    cache_dir: Path | None,
    no_cache: bool,
    prefetch_list_out: Path | None,
    as_json: bool,
    quiet: bool,
    authfile: Path | None,
    **flags: Any,
) -> None:
    """Run the workload of the image SRC (in containerd, or any source with --runner runc,
    or rootless with the rootfs in memory) and record the files it opens.

    Nothing is converted. The record feeds `optimize --record-in` later, on any machine,
    with or without containerd. The workload's output goes to stderr.

    \b
    Examples:
      estargz-opt analyze --period 5 --record-out app.jsonl docker.io/library/app:1.0
      estargz-opt optimize --oci --record-in app.jsonl oci:app:1.0 oci:app:1.0-esgz
    """
    store_opts = StoreOptions(containerd, registry(flags, "", authfile))
    request = AnalyzeRequest.from_options(
        src,
        record_out,
        sampler=sampler(flags),
        store=store_opts,
        prefetch_list_out=prefetch_list_out,
        cache=not no_cache,
        cache_dir=cache_dir,
    )
    progress = Progress()
    result = analyze(request, None if quiet else progress)
    progress.close()
    if as_json:
        click.echo(json.dumps({"record": str(record_out), **result.report()}))
    else:
        click.echo(f"recorded {len(result.entries)} files to {record_out}")
