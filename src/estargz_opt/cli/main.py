"""The `estargz-opt` command group, its global flags, and the one place where failures
become one line on stderr and an exit status."""

from __future__ import annotations

import logging
import signal
import sys

import click

from estargz_opt.cli.cache import cache_group
from estargz_opt.cli.check import inspect_cmd, verify_cmd
from estargz_opt.cli.layer import layer
from estargz_opt.cli.optimize import analyze_cmd, optimize_cmd
from estargz_opt.cli.params import SpellTerms, option_flags, spelling
from estargz_opt.errors import EstargzOptError, Interrupted, UsageError
from estargz_opt.stores.containerd.model import (
    DEFAULT_ADDRESS,
    DEFAULT_NAMESPACE,
    ContainerdOptions,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="estargz-opt", prog_name="estargz-opt")
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
    help="The least severe log lines shown on stderr.",
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


for command in (optimize_cmd, analyze_cmd, verify_cmd, inspect_cmd, layer, cache_group):
    cli.add_command(command)


#: how errors and log lines name the library's option terms: as this command line's flags
_spell = spelling(option_flags(cli))


def _configure_logging(fmt: str, level: str) -> None:
    """One stderr handler; JSON lines carry extra fields such as the layer digest."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("estargz-opt: %(levelname)s: %(message)s"))
    handler.addFilter(SpellTerms(_spell))
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
        _fail(exc.spelled(_spell), exc.exit_code)
    except EstargzOptError as exc:
        _fail(exc.spelled(_spell), 1)
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
