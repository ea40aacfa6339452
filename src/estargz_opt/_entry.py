"""The console-script entry: a Ctrl-C handler goes in before any heavy import.

Importing the CLI pulls in click, grpc and the codecs (a tenth of a second or more); an
interrupt in that window must exit 130 with one line, like one during the run, not print
a KeyboardInterrupt traceback from the middle of an import.
"""

from __future__ import annotations

import os
import signal


def _interrupted_early(signum: int, _frame: object) -> None:
    os.write(2, b"estargz-opt: error: interrupted\n")
    os._exit(128 + signum)  # nothing is written yet, so there is nothing to roll back


def main() -> None:
    previous = {s: signal.signal(s, _interrupted_early) for s in (signal.SIGINT, signal.SIGTERM)}
    from estargz_opt import cli

    for s, handler in previous.items():  # cli.main installs the run's own handling
        signal.signal(s, handler)
    cli.main()
