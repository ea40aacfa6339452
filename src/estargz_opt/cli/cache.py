"""`cache`: the converted-layer cache's figures, and its pruning."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from estargz_opt import cache
from estargz_opt.cli.params import Size, cache_dir_option, format_size, human_size
from estargz_opt.constants import DEFAULT_CACHE_MAX_SIZE


@click.group("cache")
def cache_group() -> None:
    """The converted-layer cache that optimize shares between runs."""


@cache_group.command("info")
@cache_dir_option(default_on=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def cache_info(cache_dir: Path | None, as_json: bool) -> None:
    """Entries, bytes, hits and misses of the cache."""
    usage = cache.LayerCache(cache_dir or cache.default_dir()).usage()
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(usage), "directory": str(usage.directory)}))
        return
    click.echo(f"directory: {usage.directory}")
    click.echo(f"entries:   {usage.entries}")
    click.echo(f"bytes:     {usage.bytes} ({human_size(usage.bytes)})")
    click.echo(f"hits:      {usage.hits}")
    click.echo(f"misses:    {usage.misses}")


@cache_group.command("prune")
@cache_dir_option(default_on=True)
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
@click.option(
    "--cache-max-size",
    type=Size(),
    default=format_size(DEFAULT_CACHE_MAX_SIZE),
    show_default=True,
    help="Without --all: evict least recently used entries beyond this size.",
)
def cache_prune(cache_dir: Path | None, everything: bool, cache_max_size: int) -> None:
    """Evict entries beyond the size limit, or (--all) empty the cache."""
    removed = cache.LayerCache(cache_dir or cache.default_dir(), cache_max_size).prune(everything)
    click.echo(f"removed {removed} entr{'y' if removed == 1 else 'ies'}")
