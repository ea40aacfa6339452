"""The estargz-opt command line: it parses flags into the library's requests, calls the
library (estargz_opt), and prints. Defaults and the rules of how options combine live in
the library; this package holds the flags, --help, progress on the terminal, and the
exit statuses.

One module per command group: optimize (optimize, analyze), check (verify, inspect),
layer, cache; `main` holds the group and the error handling.
"""

from estargz_opt.cli.main import cli, main

__all__ = ["cli", "main"]
