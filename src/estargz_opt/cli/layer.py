"""`layer`: convert, verify and inspect single layer blobs (no image, no daemon)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from estargz_opt.atomic import atomic_output
from estargz_opt.cli.optimize import GZIP_NEGATIVE_LEVELS
from estargz_opt.cli.params import (
    INPUT_FILE,
    ZSTD_FLAVOR,
    ZSTD_LEVEL_DEFAULT,
    cache_dir_option,
    flag_errors,
    read_lines,
    read_optional,
)
from estargz_opt.constants import DEFAULT_CHUNK_SIZE
from estargz_opt.format import Format, LayerOptions, ZstdFlavor, open_layer
from estargz_opt.layer import convert_layer, default_toc_file

log = logging.getLogger("estargz_opt")


_external_toc_option = click.option(
    "--toc",
    "toc_file",
    type=INPUT_FILE,
    help="The external TOC blob, for estargz-external-toc layers.",
)


@click.group("layer")
def layer() -> None:
    """Convert, verify and inspect single layer blobs (no image, no daemon)."""


@layer.command("convert")
@click.argument("src", type=INPUT_FILE)
@click.argument("out", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice([f.value for f in Format]),
    default=Format.ESTARGZ.value,
    show_default=True,
    help="Output layer format.",
)
@ZSTD_FLAVOR
@click.option(
    "--prioritized-files",
    type=INPUT_FILE,
    help="File with one path per line, in access order; they go first, before the landmark.",
)
@click.option(
    "--compression-level",
    type=int,
    help=f"gzip 0-9 (default {Format.ESTARGZ.default_level}; {GZIP_NEGATIVE_LEVELS}) or zstd "
    f"1-22 (default {ZSTD_LEVEL_DEFAULT}).",
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
    help="Where the external TOC blob goes (estargz-external-toc; default "
    f"{default_toc_file('OUT')}).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Compression threads (default: all CPUs). Output bytes never depend on it.",
)
@cache_dir_option(default_on=False)
def layer_convert(
    src: Path,
    out: Path,
    fmt: str,
    zstdchunked_flavor: str,
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
        prioritized=read_lines(prioritized_files) if prioritized_files else (),
        compression_level=compression_level,
        chunk_size=chunk_size,
        min_chunk_size=min_chunk_size,
        workers=threads,
        zstd_flavor=ZstdFlavor(zstdchunked_flavor),
    )
    with flag_errors({"format=estargz-external-toc": "--format estargz-external-toc"}):
        done = convert_layer(src, out, opts, toc_out=toc_out, cache_dir=cache_dir)
    missing = done.layer.missing_prioritized
    if missing:
        log.warning(
            "%d prioritized path(s) not in the layer were skipped: %s",
            len(missing),
            ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
        )
    click.echo(json.dumps(done.summary()))


@layer.command("verify")
@click.argument("blob", type=INPUT_FILE)
@click.option("--toc-digest", help="Expected TOC digest (the toc.digest annotation).")
@click.option("--diff-id", help="Expected DiffID (the image config's rootfs.diff_ids entry).")
@_external_toc_option
def layer_verify(
    blob: Path, toc_digest: str | None, diff_id: str | None, toc_file: Path | None
) -> None:
    """Check everything a lazy or a full pull of BLOB reads; exit 0 only if all pass.

    The footer, the TOC digest, every chunk from its TOC offset, then every member in
    order: each tar entry and chunk against the TOC, and the DiffID.
    """
    with open_layer(blob, toc_digest=toc_digest, external_toc=read_optional(toc_file)) as lay:
        check = lay.verify(expected_diff_id=diff_id)
        chunks = len(lay.chunks())
        click.echo(
            f"ok: {lay.format} layer, {len(lay.toc.entries)} TOC entries, {chunks} chunks "
            f"verified, TOC digest {lay.toc_digest}, DiffID {check.diff_id}"
        )


@layer.command("toc")
@click.argument("blob", type=INPUT_FILE)
@_external_toc_option
def layer_toc(blob: Path, toc_file: Path | None) -> None:
    """Print BLOB's TOC JSON exactly as stored (its sha256 is the TOC digest)."""
    with open_layer(blob, external_toc=read_optional(toc_file)) as lay:
        sys.stdout.buffer.write(lay.toc_json + b"\n")


@layer.command("tar")
@click.argument("blob", type=INPUT_FILE)
@click.argument("out", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@_external_toc_option
def layer_tar(blob: Path, out: Path, toc_file: Path | None) -> None:
    """Write BLOB's files to OUT (or - for stdout) as a plain tar, landmarks and TOC dropped.

    Every entry and chunk digest is checked against the TOC on the way.
    """
    with open_layer(blob, external_toc=read_optional(toc_file)) as lay:
        if str(out) == "-":
            lay.write_tar(sys.stdout.buffer)
            return
        with atomic_output(out) as f:
            lay.write_tar(f)
