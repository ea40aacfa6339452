"""The console-script entry: a Ctrl-C handler goes in before any heavy import.

Importing the CLI pulls in click, grpc and the codecs (a tenth of a second or more); an
interrupt in that window must exit 128 + the signal (130 for Ctrl-C, 143 for SIGTERM)
with one line, like one during the run, not print a KeyboardInterrupt traceback from the
middle of an import.
"""

from __future__ import annotations

# _signal, the C module: `signal` builds its enums at import, a few milliseconds during
# which a Ctrl-C would still print a traceback. (`os` is loaded already, by the interpreter.)
import _signal  # type: ignore[import-not-found]  # (typeshed has no stub for it)
import os


def _interrupted_early(signum: int, _frame: object) -> None:
    os.write(2, b"estargz-opt: error: interrupted\n")
    os._exit(128 + signum)  # nothing is written yet, so there is nothing to roll back


def main() -> None:
    for signum in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(signum, _interrupted_early)
    from estargz_opt import cli

    cli.main()  # its first step replaces these handlers with the run's (no window between)
