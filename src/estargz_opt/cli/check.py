"""`verify` and `inspect`: check or describe an image, print the report."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from estargz_opt.check import ImageReport, inspect, verify
from estargz_opt.cli.help import IMAGE, OUTPUT, SectionedCommand, option
from estargz_opt.cli.params import human_size, registry, registry_options
from estargz_opt.errors import EstargzOptError
from estargz_opt.stores import StoreOptions
from estargz_opt.stores.containerd.model import ContainerdOptions


def _print_report(report: ImageReport, *, files: bool, checked: bool) -> None:
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
                human_size(c.size),
                human_size(c.uncompressed_size),
                str(c.entries),
                str(c.chunks),
                str(len(c.prioritized)),
                f"{human_size(c.prefetch_bytes)} ({c.prefetch_share:.0%})",
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
    f = option(OUTPUT, "--json", "as_json", is_flag=True, help="Print the report as JSON.")(f)
    f = registry_options("")(f)
    f = option(
        IMAGE,
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
    flags: dict[str, Any],
    *,
    deep: bool,
    files: bool = False,
) -> ImageReport:
    """Check (deep: verify) or describe (inspect) IMAGE and print the report."""
    store_opts = StoreOptions(containerd, registry(flags, "", flags.pop("authfile")))
    run = verify if deep else inspect
    report = run(image, platforms=platform_specs, store=store_opts)
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        _print_report(report, files=files, checked=deep)
    return report


@click.command("verify", cls=SectionedCommand)
@_image_check
def verify_cmd(
    containerd: ContainerdOptions,
    image: str,
    platform_specs: tuple[str, ...],
    as_json: bool,
    **flags: Any,
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
    report = _check_and_show(containerd, image, platform_specs, as_json, flags, deep=True)
    if not report.ok:
        failed = sum(1 for c in report.layers if not c.ok)
        raise EstargzOptError(f"{failed} of {len(report.layers)} layer(s) failed verification")


@click.command("inspect", cls=SectionedCommand)
@_image_check
@option(OUTPUT, "--files", is_flag=True, help="List the prioritized paths of each layer.")
def inspect_cmd(
    containerd: ContainerdOptions,
    image: str,
    platform_specs: tuple[str, ...],
    as_json: bool,
    files: bool,
    **flags: Any,
) -> None:
    """Show what a lazy pull of IMAGE prefetches: per layer, the bytes before the landmark.

    \b
    Example:
      estargz-opt inspect oci:out:app-esgz --files
    """
    _check_and_show(containerd, image, platform_specs, as_json, flags, deep=False, files=files)
