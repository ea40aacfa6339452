"""What several commands parse the same way: sizes, files, the registry and sampler
flags, and how the library's option errors are spelled as flags."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import click

from estargz_opt import cache
from estargz_opt.cli.help import CACHE, FORMAT, OUTPUT, REGISTRY, WORKLOAD, option
from estargz_opt.errors import OPTION_TERMS, EstargzOptError, UsageError
from estargz_opt.format import Format, ZstdFlavor
from estargz_opt.format.zchunked import DEFAULT_LEVEL as ZCHUNKED_DEFAULT_LEVEL
from estargz_opt.stores.registry.options import (
    DEFAULT_MIN_RATE,
    DEFAULT_TIMEOUT,
    RegistryOptions,
)
from estargz_opt.workload.options import (
    DEFAULT_NAMESERVERS,
    DEFAULT_PERIOD,
    DEFAULT_RUNTIME,
    RUNNERS,
    SamplerOptions,
)

#: An existing file argument, and a file to be written.
INPUT_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
OUTPUT_FILE = click.Path(dir_okay=False, path_type=Path)

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

#: How the command line spells the library's option terms where a field name is not
#: enough (a value, or a flag named otherwise); other fields: their options' flags.
FLAGS: Mapping[str, str] = {
    "oci=True": "--oci",
    "reuse=True": "--reuse",
    "format=zstdchunked": "--zstdchunked",
    "format=estargz-external-toc": "--estargz-external-toc",
    "no_optimize=True": "--no-optimize",
    "profiles=record": "--record-in",
    "profiles=prefetch-list": "--prefetch-list",
    "allow_empty_profile=True": "--allow-empty-profile",
    "runner=containerd": "--runner containerd",
    "platforms": "--platform",
    "zstd_flavor": "--zstdchunked-flavor",
}

#: --zstdchunked-flavor, on optimize and layer convert
ZSTD_FLAVOR = option(
    FORMAT,
    "--zstdchunked-flavor",
    type=click.Choice([f.value for f in ZstdFlavor]),
    default=ZstdFlavor.STARGZ.value,
    show_default=True,
    help="Whose zstd:chunked: stargz (ctr-remote's; stargz-snapshotter lazily pulls it) or "
    "containers (containers/storage's, with tar-split; podman and CRI-O pull it partially "
    "with enable_partial_images).",
)
#: the zstd level's default depends on the flavour
ZSTD_LEVEL_DEFAULT = (
    f"{Format.ZSTDCHUNKED.default_level}; {ZCHUNKED_DEFAULT_LEVEL} with --zstdchunked-flavor "
    "containers"
)


def option_flags(command: click.Command) -> dict[str, str]:
    """Each option's field name -> its flags ("terminal" -> "-t/--terminal"), in the
    command and every subcommand (the first command that has the field wins)."""
    out: dict[str, str] = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name:
            out.setdefault(param.name, "/".join(param.opts))
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            out = option_flags(sub) | out
    return out


def spelling(fields: Mapping[str, str]) -> Callable[[str], str]:
    """How an error or log line names an option term on this command line: FLAGS, else
    the flags of the option of that field name (`option_flags`), else the term as is."""
    return lambda term: FLAGS.get(term) or fields.get(term, term)


@contextlib.contextmanager
def flag_errors(overrides: Mapping[str, str]) -> Iterator[None]:
    """In the block, errors spell the terms of `overrides` this command's way (the rest
    are spelled where main() prints the error)."""
    try:
        yield
    except EstargzOptError as exc:
        exc.terms = {k: overrides.get(v, v) for k, v in exc.terms.items()}
        raise


class SpellTerms(logging.Filter):
    """The option terms among a log record's arguments, spelled for the command line
    (records the library marks with OPTION_TERMS)."""

    def __init__(self, spell: Callable[[str], str]) -> None:
        super().__init__()
        self._spell = spell

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, OPTION_TERMS, False) and isinstance(record.args, tuple):
            record.args = tuple(self._spell(a) if isinstance(a, str) else a for a in record.args)
        return True


def format_size(n: int) -> str:
    """1073741824 -> 1G: the --help spelling of a byte count."""
    for unit in ("T", "G", "M", "K"):
        if n and n % _SIZE_UNITS[unit] == 0:
            return f"{n // _SIZE_UNITS[unit]}{unit}"
    return str(n)


def human_size(n: int) -> str:
    """1536 -> 1.5 KiB: a byte count for people."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


class Size(click.ParamType[int]):
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


def cache_dir_option(default_on: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return option(
        CACHE,
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=cache.ENV_DIR,
        help="The converted-layer cache (env ESTARGZ_OPT_CACHE_DIR; default "
        "$XDG_CACHE_HOME/estargz-opt, ~/.cache/estargz-opt, or /var/cache/estargz-opt "
        "for root)."
        if default_on
        else "Take converted layers from (and add them to) this cache directory.",
    )


def read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise EstargzOptError(f"cannot read {path}: {exc.strerror}") from None
    return [line for line in text.splitlines() if line.strip()]


def read_optional(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise EstargzOptError(f"cannot read {path}: {exc.strerror}") from None


prefetch_list_out_option = option(
    OUTPUT,
    "--prefetch-list-out",
    type=OUTPUT_FILE,
    help="Also write the files the workload opened as a prefetch list (one path per line, "
    "access order): stable across rebuilds, reviewable, for --prefetch-list.",
)


def workload_run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """What every command that runs the workload takes: the report, quiet, the sampler flags."""
    f = sampler_options(f)
    f = option(OUTPUT, "-q", "--quiet", is_flag=True, help="No progress output.")(f)
    report = "Print one JSON report on stdout at the end."
    f = option(OUTPUT, "--json", "as_json", is_flag=True, help=report)(f)
    return f


def sampler_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """ctr-remote's sampler flags, with its names and defaults (they shape the workload run)."""
    w = WORKLOAD
    options = [
        option(w, "-t", "--terminal", is_flag=True, help="Give the workload a TTY (needs -i)."),
        option(w, "-i", "stdin", is_flag=True, help="Attach our stdin to the workload."),
        option(
            w, "--period", type=int, default=DEFAULT_PERIOD, help="Seconds to watch the workload."
        ),
        option(w, "--user", default="", help="user[:group] to run as (names or ids)."),
        option(w, "--cwd", default="", help="Working directory of the workload."),
        option(w, "--args", default="", help='Replace the image Cmd: JSON array, e.g. ["-v"].'),
        option(w, "--entrypoint", default="", help="Replace the image Entrypoint: JSON array."),
        option(w, "--env", multiple=True, help="K=V for the workload (repeatable)."),
        option(w, "--env-file", default="", help="File of K=V lines for the workload."),
        option(
            w,
            "--mount",
            "mounts",
            multiple=True,
            help="type=bind,source=/src,destination=/dst,options=rbind:ro (repeatable).",
        ),
        option(
            w,
            "--dns-nameservers",
            default=DEFAULT_NAMESERVERS,
            help="CSV of name servers for the workload's /etc/resolv.conf.",
        ),
        option(w, "--dns-search-domains", default="", help="CSV of search domains."),
        option(w, "--dns-options", default="", help="CSV of resolv.conf options."),
        option(w, "--add-hosts", default="", help="CSV of host:IP for /etc/hosts."),
        option(w, "--cni", is_flag=True, help="Network the workload with the first CNI config."),
        option(w, "--cni-plugin-conf-dir", default="", help="CNI config dir (/etc/cni/net.d)."),
        option(w, "--cni-plugin-dir", default="", help="CNI plugin dir (/opt/cni/bin)."),
        option(w, "--gpus", default="", help="GPUs for the workload: all, or indices 0,1."),
        option(w, "--net-host", is_flag=True, help="Run the workload in the host network."),
        option(
            w, "--wait-on-line", default="", help="End the run when a stdout line contains this."
        ),
        option(w, "--wait-on-signal", is_flag=True, help="Run until the workload exits or Ctrl-C."),
        option(
            w,
            "--runner",
            type=click.Choice(RUNNERS),
            help="How the sample container runs: containerd (its task service), runc (the "
            "runtime's CLI, no daemon) or rootless (no privilege at all; the rootfs is held "
            "in memory, a tmpfs the size of the image; with only your own id mapped, no "
            "/etc/subuid range or no capabilities, every file is yours and the workload "
            "runs as root of its namespace, so an image whose User is not root is "
            "refused). Default: rootless when not root; as root, containerd for an image "
            "in containerd, runc for any other source.",
        ),
        option(w, "--rootless", is_flag=True, help="The same as --runner rootless."),
        option(
            w,
            "--runtime",
            default=DEFAULT_RUNTIME,
            help="The OCI runtime: runc, crun or a path (with any runner).",
        ),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def sampler(kw: dict[str, Any]) -> SamplerOptions:
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
    except EstargzOptError as exc:  # a usage error here: exit 2, the options named as flags
        if exc.template is None:
            raise UsageError(str(exc)) from None
        raise UsageError.with_terms(exc.template, **exc.terms) from None
    return opts


def registry_options(*prefixes: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """skopeo's flags for reaching registries, one set per side: prefixes ("src-", "dest-")
    for a command with a source and a destination, ("",) for one image."""

    def add(f: Callable[..., Any]) -> Callable[..., Any]:
        r = REGISTRY
        options = [
            option(
                r,
                "--authfile",
                type=click.Path(dir_okay=False, path_type=Path),
                help="Registry credentials file (else REGISTRY_AUTH_FILE, containers' "
                "auth.json, then Docker's config.json).",
            ),
            option(
                r,
                "--registry-timeout",
                type=click.FloatRange(min=0, min_open=True),
                default=DEFAULT_TIMEOUT,
                envvar="ESTARGZ_OPT_REGISTRY_TIMEOUT",
                metavar="SECONDS",
                help="Seconds any one registry request may take in all, beyond the time "
                "its bytes need at --registry-min-rate; a server that stalls or trickles "
                "fails then (env ESTARGZ_OPT_REGISTRY_TIMEOUT).",
            ),
            option(
                r,
                "--registry-min-rate",
                type=click.IntRange(min=1),
                default=DEFAULT_MIN_RATE >> 10,
                envvar="ESTARGZ_OPT_REGISTRY_MIN_RATE",
                metavar="KIB_PER_S",
                help="Slowest average rate, in KiB/s, a registry transfer may keep "
                "(env ESTARGZ_OPT_REGISTRY_MIN_RATE).",
            ),
        ]
        for p in prefixes:
            side = {"src-": "the source's ", "dest-": "the destination's "}.get(p, "the ")
            options += [
                option(
                    r,
                    f"--{p}creds",
                    metavar="USER[:PASS]",
                    help=f"Credentials for {side}registry (over any auth file).",
                ),
                option(
                    r, f"--{p}no-creds", is_flag=True, help=f"Access {side}registry anonymously."
                ),
                option(
                    r,
                    f"--{p}tls-verify",
                    type=click.BOOL,
                    default=True,
                    is_flag=False,
                    flag_value=True,
                    metavar="BOOL",
                    help=f"Verify {side}registry's TLS certificate (false also allows plain HTTP).",
                ),
                option(
                    r,
                    f"--{p}cert-dir",
                    type=click.Path(file_okay=False, path_type=Path),
                    help=f"CA certificates (*.crt) and client certificates (*.cert, *.key) "
                    f"for {side}registry, instead of the certs.d directories.",
                ),
            ]
        for opt in reversed(options):
            f = opt(f)
        return f

    return add


def registry(kw: dict[str, Any], prefix: str, authfile: Path | None) -> RegistryOptions:
    """Take one side's registry flags out of a command's keyword arguments."""
    p = prefix.replace("-", "_")
    return RegistryOptions(
        authfile=authfile,
        creds=kw.pop(f"{p}creds"),
        creds_source=f"the command line (--{prefix}creds)",
        no_creds=kw.pop(f"{p}no_creds"),
        tls_verify=kw.pop(f"{p}tls_verify"),
        cert_dir=kw.pop(f"{p}cert_dir"),
        env=os.environ,
        # one pair for both sides
        timeout=kw["registry_timeout"],
        min_rate=kw["registry_min_rate"] << 10,
    )
