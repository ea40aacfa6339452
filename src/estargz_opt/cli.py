"""The estargz-opt command line: parse, call the library, print. Nothing else lives here."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from estargz_opt import __version__, cache, check, platforms
from estargz_opt.errors import EstargzOptError, Interrupted, UsageError
from estargz_opt.format import (
    DEFAULT_CHUNK_SIZE,
    Format,
    LayerOptions,
    ZstdFlavor,
    atomic_output,
    convert_layer,
    open_layer,
)
from estargz_opt.optimize import OptimizeRequest, analyze_image, optimize
from estargz_opt.prioritize.profile import ProfileKind, ProfileSource
from estargz_opt.progress import Progress
from estargz_opt.stores import StoreOptions
from estargz_opt.stores.containerd.model import (
    DEFAULT_ADDRESS,
    DEFAULT_NAMESPACE,
    ContainerdOptions,
)
from estargz_opt.stores.registry.options import (
    DEFAULT_MIN_RATE,
    DEFAULT_TIMEOUT,
    RegistryOptions,
)
from estargz_opt.workload.options import DEFAULT_PERIOD, DEFAULT_RUNTIME, RUNNERS, SamplerOptions

log = logging.getLogger("estargz_opt")
_ZSTD_FLAVOR = click.option(
    "--zstdchunked-flavor",
    type=click.Choice([f.value for f in ZstdFlavor]),
    default=ZstdFlavor.STARGZ.value,
    show_default=True,
    help="Whose zstd:chunked: stargz (ctr-remote's; stargz-snapshotter lazily pulls it) or "
    "containers (containers/storage's, with tar-split; podman and CRI-O pull it partially "
    "with enable_partial_images).",
)
_GZIP_NEGATIVE_LEVELS = (
    "-1 is Go's default (6); -2 is Huffman-only, written by zlib's Z_HUFFMAN_ONLY"
)
#: An existing file argument, and a file to be written.
_INPUT_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_OUTPUT_FILE = click.Path(dir_okay=False, path_type=Path)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class _Size(click.ParamType[int]):
    """A byte count: 1073741824, 512M, 10G (K, M, G, T: powers of 1024)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
        number = text[: len(text) - len(unit)]
        if not number.isdigit():
            self.fail(f"{value!r} is not a size such as 10G, 512M or 1048576", param, ctx)
        return int(number) * _SIZE_UNITS[unit]


def _cache_dir_option(default_on: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=cache.ENV_DIR,
        help="The converted-layer cache (env ESTARGZ_OPT_CACHE_DIR; default "
        "$XDG_CACHE_HOME/estargz-opt, ~/.cache/estargz-opt, or /var/cache/estargz-opt "
        "for root)."
        if default_on
        else "Take converted layers from (and add them to) this cache directory.",
    )


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise EstargzOptError(f"cannot read {path}: {exc.strerror}") from None
    return [line for line in text.splitlines() if line.strip()]


def _read_optional(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise EstargzOptError(f"cannot read {path}: {exc.strerror}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="estargz-opt")
@click.option(
    "-a",
    "--address",
    envvar="CONTAINERD_ADDRESS",
    default=DEFAULT_ADDRESS,
    show_default=True,
    help="containerd's socket (env CONTAINERD_ADDRESS), as ctr.",
)
@click.option(
    "-n",
    "--namespace",
    envvar="CONTAINERD_NAMESPACE",
    default=DEFAULT_NAMESPACE,
    show_default=True,
    help="containerd namespace (env CONTAINERD_NAMESPACE), as ctr.",
)
@click.option("--timeout", type=float, help="Seconds for each containerd request.")
@click.option("--debug", is_flag=True, help="Log debug output (same as --log-level debug).")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines on stderr as text or as JSON objects.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.pass_context
def cli(
    ctx: click.Context,
    address: str,
    namespace: str,
    timeout: float | None,
    debug: bool,
    log_format: str,
    log_level: str,
) -> None:
    """Optimize container images for lazy pulling (eStargz, zstd:chunked).

    \b
    Examples:
      estargz-opt -a /run/containerd/containerd.sock optimize --oci --record-in rec.jsonl \\
          docker.io/library/app:1.0 docker.io/library/app:1.0-esgz
      estargz-opt optimize --oci --no-optimize oci:app:1.0 oci:app:1.0-esgz
      estargz-opt layer convert layer.tar.gz out.blob --prioritized-files files.txt
    """
    _configure_logging(log_format, "debug" if debug else log_level)
    ctx.obj = ContainerdOptions(address=address, namespace=namespace, timeout=timeout)


_prefetch_list_out_option = click.option(
    "--prefetch-list-out",
    type=_OUTPUT_FILE,
    help="Also write the files the workload opened as a prefetch list (one path per line, "
    "access order): stable across rebuilds, reviewable, for --prefetch-list.",
)


def _workload_run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """What every command that runs the workload takes: the report, quiet, the sampler flags."""
    f = _sampler_options(f)
    f = click.option("-q", "--quiet", is_flag=True, help="No progress output.")(f)
    return click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON report on stdout at the end."
    )(f)


def _sampler_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """ctr-remote's sampler flags, with its names and defaults (they shape the workload run)."""
    options = [
        click.option("-t", "--terminal", is_flag=True, help="Give the workload a TTY (needs -i)."),
        click.option("-i", "stdin", is_flag=True, help="Attach our stdin to the workload."),
        click.option(
            "--period",
            type=int,
            default=DEFAULT_PERIOD,
            show_default=True,
            help="Seconds to watch the workload.",
        ),
        click.option("--user", default="", help="user[:group] to run as (names or ids)."),
        click.option("--cwd", default="", help="Working directory of the workload."),
        click.option("--args", default="", help='Replace the image Cmd: JSON array, e.g. ["-v"].'),
        click.option("--entrypoint", default="", help="Replace the image Entrypoint: JSON array."),
        click.option("--env", multiple=True, help="K=V for the workload (repeatable)."),
        click.option("--env-file", default="", help="File of K=V lines for the workload."),
        click.option(
            "--mount",
            "mounts",
            multiple=True,
            help="type=bind,source=/src,destination=/dst,options=rbind:ro (repeatable).",
        ),
        click.option("--dns-nameservers", default="8.8.8.8", show_default=True, help="CSV."),
        click.option("--dns-search-domains", default="", help="CSV."),
        click.option("--dns-options", default="", help="CSV."),
        click.option("--add-hosts", default="", help="CSV of host:IP for /etc/hosts."),
        click.option("--cni", is_flag=True, help="Network the workload with the first CNI config."),
        click.option("--cni-plugin-conf-dir", default="", help="CNI config dir (/etc/cni/net.d)."),
        click.option("--cni-plugin-dir", default="", help="CNI plugin dir (/opt/cni/bin)."),
        click.option("--gpus", default="", help="GPUs for the workload: all, or indices 0,1."),
        click.option("--net-host", is_flag=True, help="Run the workload in the host network."),
        click.option(
            "--wait-on-line", default="", help="End the run when a stdout line contains this."
        ),
        click.option(
            "--wait-on-signal", is_flag=True, help="Run until the workload exits or Ctrl-C."
        ),
        click.option(
            "--runner",
            type=click.Choice(("", *RUNNERS)),
            default="",
            help="How the sample container runs: containerd (its task service), runc (the "
            "runtime's CLI, no daemon) or rootless (no privilege at all; the rootfs is held "
            "in memory, a tmpfs the size of the image; with only your own id mapped, no "
            "/etc/subuid range or no capabilities, every file is yours and the workload "
            "runs as root of its namespace, so an image whose User is not root is "
            "refused). Default: rootless when not root; as root, containerd for an image "
            "in containerd, runc for any other source.",
        ),
        click.option("--rootless", is_flag=True, help="The same as --runner rootless."),
        click.option(
            "--runtime",
            default=DEFAULT_RUNTIME,
            show_default=True,
            help="The OCI runtime: runc, crun or a path (with any runner).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _sampler(kw: dict[str, Any]) -> SamplerOptions:
    """Take the sampler flags out of a command's keyword arguments."""
    # The option names are the field names (click turns tuples into lists below).
    values = {f.name: kw.pop(f.name) for f in dataclasses.fields(SamplerOptions)}
    fields: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    fields["runner"] = fields["runner"] or ""
    if kw.pop("rootless"):
        if fields["runner"] not in ("", "rootless"):
            raise UsageError(f"--rootless contradicts --runner {fields['runner']}")
        fields["runner"] = "rootless"
    opts = SamplerOptions(**fields)
    try:
        opts.validate()
    except EstargzOptError as exc:
        raise UsageError(str(exc)) from None
    return opts


def _registry_options(*prefixes: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """skopeo's flags for reaching registries, one set per side: prefixes ("src-", "dest-")
    for a command with a source and a destination, ("",) for one image."""

    def add(f: Callable[..., Any]) -> Callable[..., Any]:
        options = [
            click.option(
                "--authfile",
                type=click.Path(dir_okay=False, path_type=Path),
                help="Registry credentials file (else REGISTRY_AUTH_FILE, containers' "
                "auth.json, then Docker's config.json).",
            ),
            click.option(
                "--registry-timeout",
                type=click.FloatRange(min=0, min_open=True),
                default=DEFAULT_TIMEOUT,
                show_default=True,
                envvar="ESTARGZ_OPT_REGISTRY_TIMEOUT",
                metavar="SECONDS",
                help="Seconds any one registry request may take in all, beyond the time "
                "its bytes need at --registry-min-rate; a server that stalls or trickles "
                "fails then (env ESTARGZ_OPT_REGISTRY_TIMEOUT).",
            ),
            click.option(
                "--registry-min-rate",
                type=click.IntRange(min=1),
                default=DEFAULT_MIN_RATE >> 10,
                show_default=True,
                envvar="ESTARGZ_OPT_REGISTRY_MIN_RATE",
                metavar="KIB_PER_S",
                help="Slowest average rate, in KiB/s, a registry transfer may keep "
                "(env ESTARGZ_OPT_REGISTRY_MIN_RATE).",
            ),
        ]
        for p in prefixes:
            side = {"src-": "the source's ", "dest-": "the destination's "}.get(p, "the ")
            options += [
                click.option(
                    f"--{p}creds",
                    metavar="USER[:PASS]",
                    help=f"Credentials for {side}registry (over any auth file).",
                ),
                click.option(
                    f"--{p}no-creds", is_flag=True, help=f"Access {side}registry anonymously."
                ),
                click.option(
                    f"--{p}tls-verify",
                    type=click.BOOL,
                    default=True,
                    is_flag=False,
                    flag_value=True,
                    metavar="BOOL",
                    help=f"Verify {side}registry's TLS certificate (false also allows plain HTTP).",
                ),
                click.option(
                    f"--{p}cert-dir",
                    type=click.Path(file_okay=False, path_type=Path),
                    help=f"CA certificates (*.crt) and client certificates (*.cert, *.key) "
                    f"for {side}registry, instead of the certs.d directories.",
                ),
            ]
        for option in reversed(options):
            f = option(f)
        return f

    return add


def _registry(kw: dict[str, Any], prefix: str, authfile: Path | None) -> RegistryOptions:
    """Take one side's registry flags out of a command's keyword arguments."""
    p = prefix.replace("-", "_")
    return RegistryOptions(
        authfile=authfile,
        creds=kw.pop(f"{p}creds"),
        creds_flag=f"--{prefix}creds",
        no_creds=kw.pop(f"{p}no_creds"),
        tls_verify=kw.pop(f"{p}tls_verify"),
        cert_dir=kw.pop(f"{p}cert_dir"),
        env=os.environ,
        # one pair for both sides
        timeout=kw["registry_timeout"],
        min_rate=kw["registry_min_rate"] << 10,
    )


class _ProfileOrder(click.Command):
    """Keeps the command-line order of --record-in and --prefetch-list, which are merged in it.

    click gathers each repeated option into its own tuple; the parser's order of
    occurrences is the only record of how the two were interleaved.
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


@cli.command("optimize", cls=_ProfileOrder)
@click.pass_obj
@click.argument("src")
@click.argument("dst")
@click.option(
    "--oci", is_flag=True, help="Convert Docker media types to OCI ones (needed for annotations)."
)
@click.option("--no-optimize", is_flag=True, help="Convert without prioritized files.")
@click.option(
    "--record-in",
    type=_INPUT_FILE,
    multiple=True,
    help="Prioritize the files of a record (ctr-remote --record-out JSON lines); repeatable. "
    "A record of another build of the image is matched by path.",
)
@click.option(
    "--prefetch-list",
    type=_INPUT_FILE,
    multiple=True,
    help="Prioritize these paths and globs (*, ?, [], **), one per line; # comments; "
    "repeatable. Profiles are merged in the order given, the first occurrence wins.",
)
@click.option(
    "--allow-empty-profile",
    is_flag=True,
    help="Convert even if the profiles prioritize no file of the image (else exit 1).",
)
@click.option(
    "--reuse",
    is_flag=True,
    help="Keep layers that are already sound eStargz and have no prioritized files.",
)
@click.option(
    "--platform",
    "platform_specs",
    multiple=True,
    help="Platform to convert (repeatable), e.g. linux/arm64.",
)
@click.option("--all-platforms", is_flag=True, help="Convert every platform of an index.")
@click.option("--zstdchunked", is_flag=True, help="Write zstd:chunked layers (needs --oci).")
@_ZSTD_FLAVOR
@click.option(
    "--zstdchunked-compression-level",
    type=int,
    help="zstd level 1-22 (default 3; 7 with --zstdchunked-flavor containers).",
)
@click.option(
    "--estargz-compression-level",
    type=int,
    default=9,
    show_default=True,
    help=f"gzip level 0-9; {_GZIP_NEGATIVE_LEVELS}.",
)
@click.option("--estargz-chunk-size", type=int, default=0, help="Chunk size in bytes (0: 4 MiB).")
@click.option(
    "--estargz-min-chunk-size",
    type=int,
    default=0,
    help="Minimal gzip member size (breaks upstream VerifyTOC).",
)
@click.option(
    "--estargz-external-toc", is_flag=True, help="Keep TOCs in a separate image DST-esgztoc."
)
@click.option(
    "--record-out",
    type=_OUTPUT_FILE,
    help="Also write the record of the workload run (JSON lines) to this file.",
)
@_cache_dir_option(default_on=True)
@click.option("--no-cache", is_flag=True, help="Neither use nor fill the converted-layer cache.")
@click.option(
    "--cache-max-size",
    type=_Size(),
    default=cache.DEFAULT_MAX_SIZE,
    help="Evict least recently used cache entries beyond this size after the run (default 10G).",
)
@_prefetch_list_out_option
@_registry_options("src-", "dest-")
@_workload_run_options
def optimize_cmd(
    containerd: ContainerdOptions,
    src: str,
    dst: str,
    oci: bool,
    no_optimize: bool,
    record_in: tuple[Path, ...],
    prefetch_list: tuple[Path, ...],
    allow_empty_profile: bool,
    reuse: bool,
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
    fmt = OptimizeRequest.layer_format(zstdchunked, estargz_external_toc, zstdchunked_flavor)
    layer_opts = LayerOptions(
        format=fmt,
        compression_level=zstdchunked_compression_level
        if zstdchunked
        else estargz_compression_level,
        chunk_size=estargz_chunk_size or DEFAULT_CHUNK_SIZE,
        min_chunk_size=0 if zstdchunked else estargz_min_chunk_size,
        zstd_flavor=ZstdFlavor(zstdchunked_flavor),
    )
    src_registry = _registry(flags, "src-", authfile)
    dst_registry = _registry(flags, "dest-", authfile)
    sampler = _sampler(flags)
    progress = Progress()
    outcome = optimize(
        OptimizeRequest(
            src=src,
            dst=dst,
            layer=layer_opts,
            oci=oci,
            reuse=reuse,
            platforms=platform_specs,
            all_platforms=all_platforms,
            no_optimize=no_optimize,
            profiles=_profiles(() if no_optimize else record_in, prefetch_list),
            allow_empty_profile=allow_empty_profile,
            sampler=sampler,
            record_out=record_out,
            prefetch_list_out=prefetch_list_out,
            src_store=StoreOptions(containerd, src_registry),
            dst_store=StoreOptions(containerd, dst_registry),
            progress=None if quiet else progress,
            cache_dir=None if no_cache else cache_dir or cache.default_dir(),
            cache_max_size=cache_max_size,
        )
    )
    progress.close()
    if as_json:
        click.echo(json.dumps(outcome.report()))
        return
    if outcome.extra_image:
        click.echo(f"extra image: {outcome.extra_image}")
    click.echo(outcome.digest)


@cli.command("analyze")
@click.pass_obj
@click.argument("src")
@click.option(
    "--record-out",
    required=True,
    type=_OUTPUT_FILE,
    help="Where to write the record (JSON lines, ctr-remote's format).",
)
@_cache_dir_option(default_on=True)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Keep no unpacked layers: the runc runner unpacks the image for this run only.",
)
@_prefetch_list_out_option
@_registry_options("")
@_workload_run_options
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
    store_opts = StoreOptions(containerd, _registry(flags, "", authfile))
    sampler = _sampler(flags)
    progress = Progress()
    result = analyze_image(
        src,
        sampler,
        record_out,
        store_opts,
        None if quiet else progress,
        prefetch_list_out,
        cache_dir=None if no_cache else cache_dir or cache.default_dir(),
    )
    progress.close()
    if as_json:
        click.echo(json.dumps({"record": str(record_out), **result.report()}))
    else:
        click.echo(f"recorded {len(result.entries)} files to {record_out}")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _print_report(report: check.ImageReport, *, files: bool, checked: bool) -> None:
    click.echo(f"{report.image} {report.digest}")
    head = (
        "platform",
        "layer",
        "format",
        "size",
        "uncompressed",
        "entries",
        "chunks",
        "prioritized",
        "prefetch",
        "result",
    )
    rows = [head]
    for c in report.layers:
        result = ("ok" if c.ok else "FAIL") if checked else ""
        rows.append(
            (
                c.platform or "-",
                str(c.index),
                c.format,
                _human(c.size),
                _human(c.uncompressed_size),
                str(c.entries),
                str(c.chunks),
                str(len(c.prioritized)),
                f"{_human(c.prefetch_bytes)} ({c.prefetch_share:.0%})",
                result,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    for c in report.layers:
        for err in c.errors:
            click.echo(f"FAIL {c.platform or '-'} layer {c.index} ({c.digest}): {err}")
        if files and c.prioritized:
            click.echo(f"prioritized files of {c.platform or '-'} layer {c.index}:")
            for name in c.prioritized:
                click.echo(f"  {name}")
    for w in report.warnings:
        click.echo(f"warning: {w}")


def _image_check(f: Callable[..., None]) -> Callable[..., None]:
    """The arguments verify and inspect share: the image, --platform and --json."""
    f = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")(f)
    f = _registry_options("")(f)
    f = click.option(
        "--platform",
        "platform_specs",
        multiple=True,
        help="Only this platform (repeatable); default: all.",
    )(f)
    return click.pass_obj(click.argument("image")(f))


def _check_and_show(
    containerd: ContainerdOptions,
    image: str,
    platform_specs: tuple[str, ...],
    as_json: bool,
    registry: dict[str, Any],
    *,
    deep: bool,
    files: bool = False,
) -> check.ImageReport:
    """Check (deep: verify) or describe (inspect) IMAGE and print the report."""
    matcher = platforms.matcher(platform_specs, not platform_specs)
    store_opts = StoreOptions(containerd, _registry(registry, "", registry.pop("authfile")))
    report = check.check_ref(image, store_opts, matcher, deep=deep)
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        _print_report(report, files=files, checked=deep)
    return report


@cli.command("verify")
@_image_check
def verify_cmd(
    containerd: ContainerdOptions,
    image: str,
    platform_specs: tuple[str, ...],
    as_json: bool,
    **registry: Any,
) -> None:
    """Lint IMAGE before pushing: exit non-zero unless every layer will lazy-pull.

    Checks each layer's footer, TOC digest against its annotation, every chunk digest,
    DiffID against the config, uncompressed size, landmark, zstd:chunked annotations and
    the external TOC image; warns about Docker media types, layers that are not eStargz,
    and min-chunk-size TOCs.

    \b
    Examples:
      estargz-opt verify oci:out:app-esgz
      estargz-opt -a /run/containerd/containerd.sock verify docker.io/library/app:esgz --json
    """
    report = _check_and_show(containerd, image, platform_specs, as_json, registry, deep=True)
    if not report.ok:
        failed = sum(1 for c in report.layers if not c.ok)
        raise EstargzOptError(f"{failed} of {len(report.layers)} layer(s) failed verification")


@cli.command("inspect")
@_image_check
@click.option("--files", is_flag=True, help="List the prioritized paths of each layer.")
def inspect_cmd(
    containerd: ContainerdOptions,
    image: str,
    platform_specs: tuple[str, ...],
    as_json: bool,
    files: bool,
    **registry: Any,
) -> None:
    """Show what a lazy pull of IMAGE prefetches: per layer, the bytes before the landmark.

    \b
    Example:
      estargz-opt inspect oci:out:app-esgz --files
    """
    _check_and_show(containerd, image, platform_specs, as_json, registry, deep=False, files=files)


external_toc_option = click.option(
    "--toc",
    "toc_file",
    type=_INPUT_FILE,
    help="The external TOC blob, for estargz-external-toc layers.",
)


@cli.group()
def layer() -> None:
    """Convert, verify and inspect single layer blobs (no image, no daemon)."""


@layer.command("convert")
@_ZSTD_FLAVOR
@click.argument("src", type=_INPUT_FILE)
@click.argument("out", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice([f.value for f in Format]),
    default=Format.ESTARGZ.value,
    show_default=True,
    help="Output layer format.",
)
@click.option(
    "--prioritized-files",
    type=_INPUT_FILE,
    help="File with one path per line, in access order; they go first, before the landmark.",
)
@click.option(
    "--compression-level",
    type=int,
    help=f"gzip 0-9 (default 9; {_GZIP_NEGATIVE_LEVELS}) or zstd 1-22 (default 3).",
)
@click.option(
    "--chunk-size",
    type=int,
    default=DEFAULT_CHUNK_SIZE,
    show_default=True,
    help="Bytes per chunk of a regular file.",
)
@click.option(
    "--min-chunk-size",
    type=int,
    default=0,
    show_default=True,
    help="Keep small chunks in one gzip member until it holds this many compressed bytes.",
)
@click.option(
    "--toc-out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Where the external TOC blob goes (estargz-external-toc; default OUT.toc).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Compression threads (default: all CPUs). Output bytes never depend on it.",
)
@_cache_dir_option(default_on=False)
def layer_convert(
    zstdchunked_flavor: str,
    src: Path,
    out: Path,
    fmt: str,
    prioritized_files: Path | None,
    compression_level: int | None,
    chunk_size: int,
    min_chunk_size: int,
    toc_out: Path | None,
    threads: int | None,
    cache_dir: Path | None,
) -> None:
    """Convert the layer SRC (tar, tar+gzip or tar+zstd) into OUT.

    Prints one JSON object: digest, size, diffID, uncompressedSize, tocDigest, annotations.

    \b
    Example:
      estargz-opt layer convert base.tar.gz base.esgz --prioritized-files files.txt
    """
    opts = LayerOptions(
        format=Format(fmt),
        prioritized=_read_lines(prioritized_files) if prioritized_files else (),
        compression_level=compression_level,
        chunk_size=chunk_size,
        min_chunk_size=min_chunk_size,
        workers=threads,
        zstd_flavor=ZstdFlavor(zstdchunked_flavor),
    )
    if opts.format is not Format.EXTERNAL_TOC and toc_out is not None:
        raise click.UsageError("--toc-out applies to --format estargz-external-toc only")
    if cache_dir is None:
        result = convert_layer(src, out, opts)
        summary = result.summary()
    else:
        result, state = cache.convert_file(cache.LayerCache(cache_dir), src, out, opts)
        summary = result.summary()
        summary["cache"] = state
    summary["prioritizedEntries"] = result.prioritized_entries
    summary["skippedPrioritized"] = len(result.missing_prioritized)
    if result.toc_blob is not None:
        toc_path = toc_out or out.with_name(out.name + ".toc")
        try:
            with atomic_output(toc_path) as f:
                f.write(result.toc_blob)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        summary["tocBlob"] = str(toc_path)
    if result.missing_prioritized:
        log.warning(
            "%d prioritized path(s) not in the layer were skipped: %s",
            len(result.missing_prioritized),
            ", ".join(result.missing_prioritized[:5])
            + (" ..." if len(result.missing_prioritized) > 5 else ""),
        )
    click.echo(json.dumps(summary))


@layer.command("verify")
@click.argument("blob", type=_INPUT_FILE)
@click.option("--toc-digest", help="Expected TOC digest (the toc.digest annotation).")
@click.option("--diff-id", help="Expected DiffID (the image config's rootfs.diff_ids entry).")
@external_toc_option
def layer_verify(
    blob: Path, toc_digest: str | None, diff_id: str | None, toc_file: Path | None
) -> None:
    """Check everything a lazy or a full pull of BLOB reads; exit 0 only if all pass.

    The footer, the TOC digest, every chunk from its TOC offset, then every member in
    order: each tar entry and chunk against the TOC, and the DiffID.
    """
    with open_layer(blob, toc_digest=toc_digest, external_toc=_read_optional(toc_file)) as lay:
        check = lay.verify(expected_diff_id=diff_id)
        chunks = len(lay.chunks())
        click.echo(
            f"ok: {lay.format} layer, {len(lay.toc.entries)} TOC entries, {chunks} chunks "
            f"verified, TOC digest {lay.toc_digest}, DiffID {check.diff_id}"
        )


@layer.command("toc")
@click.argument("blob", type=_INPUT_FILE)
@external_toc_option
def layer_toc(blob: Path, toc_file: Path | None) -> None:
    """Print BLOB's TOC JSON exactly as stored (its sha256 is the TOC digest)."""
    with open_layer(blob, external_toc=_read_optional(toc_file)) as lay:
        sys.stdout.buffer.write(lay.toc_json + b"\n")


@layer.command("tar")
@click.argument("blob", type=_INPUT_FILE)
@click.argument("out", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@external_toc_option
def layer_tar(blob: Path, out: Path, toc_file: Path | None) -> None:
    """Write BLOB's files to OUT (or - for stdout) as a plain tar, landmarks and TOC dropped.

    Every entry and chunk digest is checked against the TOC on the way.
    """
    with open_layer(blob, external_toc=_read_optional(toc_file)) as lay:
        if str(out) == "-":
            lay.write_tar(sys.stdout.buffer)
            return
        with atomic_output(out) as f:
            lay.write_tar(f)


@cli.group("cache")
def cache_group() -> None:
    """The converted-layer cache that optimize shares between runs."""


@cache_group.command("info")
@_cache_dir_option(default_on=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def cache_info(cache_dir: Path | None, as_json: bool) -> None:
    """Entries, bytes, hits and misses of the cache."""
    usage = cache.LayerCache(cache_dir or cache.default_dir()).usage()
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(usage), "directory": str(usage.directory)}))
        return
    click.echo(f"directory: {usage.directory}")
    click.echo(f"entries:   {usage.entries}")
    click.echo(f"bytes:     {usage.bytes} ({_human(usage.bytes)})")
    click.echo(f"hits:      {usage.hits}")
    click.echo(f"misses:    {usage.misses}")


@cache_group.command("prune")
@_cache_dir_option(default_on=True)
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
@click.option(
    "--cache-max-size",
    type=_Size(),
    default=cache.DEFAULT_MAX_SIZE,
    help="Without --all: evict least recently used entries beyond this size (default 10G).",
)
def cache_prune(cache_dir: Path | None, everything: bool, cache_max_size: int) -> None:
    """Evict entries beyond the size limit, or (--all) empty the cache."""
    removed = cache.LayerCache(cache_dir or cache.default_dir(), cache_max_size).prune(everything)
    click.echo(f"removed {removed} entr{'y' if removed == 1 else 'ies'}")


def _configure_logging(fmt: str, level: str) -> None:
    """One stderr handler; JSON lines carry extra fields such as the layer digest."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("estargz-opt: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request (with its URL) at INFO; our registry client says what matters.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signum)  # unwinds, so stores roll back what was written


def main() -> None:
    """Entry point: every expected failure becomes one line on stderr and a non-zero exit."""
    try:  # a signal right after its handler is in is an Interrupted like any other
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _interrupt)
        logging.basicConfig(format="estargz-opt: %(levelname)s: %(message)s", level=logging.INFO)
        cli.main(standalone_mode=False, prog_name="estargz-opt")
    except click.UsageError as exc:
        _fail(exc.format_message(), 2)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except UsageError as exc:
        _fail(str(exc), exc.exit_code)
    except EstargzOptError as exc:
        _fail(str(exc), 1)
    except Interrupted as exc:
        _fail("interrupted", 128 + exc.signum)
    except (KeyboardInterrupt, click.Abort):
        _fail("interrupted", 128 + signal.SIGINT)
    except BrokenPipeError:
        sys.exit(1)
    except OSError as exc:  # a disk, permission or path problem the layers above did not name
        where = f": {exc.filename}" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}", 1)


def _fail(message: str, code: int) -> None:
    """The one error line: JSON like every other log line under --log-format json."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # the run is over: a second signal
        signal.signal(signum, signal.SIG_IGN)  # must not turn its line into a traceback
    root = logging.getLogger()
    if any(type(h.formatter).__name__ == "JsonFormatter" for h in root.handlers):
        logging.getLogger("estargz_opt").error(message)
    else:
        click.echo(f"estargz-opt: error: {message}", err=True)
    sys.exit(code)
