"""Our CLI, run the one way each test needs it, and what its output must look like.

`run_cli` starts it as a child process (``python -m estargz_opt``): what a user runs, with
its own signals, exit status and file descriptors. `invoke` runs the same entry point in
this process under click's CliRunner isolation: the exit status and the stdout/stderr a
user sees, in milliseconds, for the tests of parsing, validation and messages.
`printed_digest` and `error_message` check the two endings of a run.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

import estargz_opt

#: the prefix of the one line a failed run ends with
ERROR = "estargz-opt: error: "
#: the project's source directory, for children that do not share our sys.path
SRC = Path(estargz_opt.__file__).resolve().parent.parent


def cli_argv(*args: str | Path) -> list[str]:
    """The command line that runs our CLI with this interpreter."""
    return [sys.executable, "-m", "estargz_opt", *map(str, args)]


def cli_env(tmpdir: Path | None = None, **extra: str) -> dict[str, str]:
    """This process's environment for a child CLI: the estargz_opt under test on its path,
    no CONTAINERD_* (a test names its daemon with -a), TMPDIR if given, then *extra*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return {**env, **extra}


def run_cli(*args: str | Path, env: Mapping[str, str] | None = None, timeout: float = 300,
            stdin: int | None = subprocess.DEVNULL, cwd: Path | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run our CLI as a child process with text output; with *check*, a non-zero exit
    fails the test with the command's output."""
    cmd = cli_argv(*args)
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=stdin, cwd=cwd,
                         env=dict(env) if env is not None else cli_env(), timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\nstdout:\n{res.stdout}\n"
                             f"stderr:\n{res.stderr}")
    return res


def estargz_opt(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`run_cli` that fails the test on a non-zero exit unless told otherwise."""
    return run_cli(*args, timeout=600, check=check)


@dataclass(frozen=True)
class Invoked:
    """An in-process run, shaped like subprocess's result so the same checks apply."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def invoke(*args: str | Path, env: Mapping[str, str] | None = None,
           input: str | bytes | None = None, check: bool = False) -> Invoked:
    """Run the CLI's entry point (`estargz_opt.cli.main`, which maps every expected error
    to one line and an exit status) in this process, with stdin, stdout, stderr and the
    environment swapped for the call as CliRunner does. What main() sets for the whole
    process (loggers' levels and handlers, SIGINT and SIGTERM, sys.argv) is put back
    afterwards. With *check*, a non-zero exit fails the test with the output."""
    from estargz_opt import cli

    argv = [str(a) for a in args]
    loggers = _logger_state()
    # main() handles SIGINT and SIGTERM, and ignores both once it fails: left so, this
    # process and every child it starts later would ignore Ctrl-C.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    saved_argv = sys.argv
    code = 0
    # As for a child (cli_env): no CONTAINERD_* from the developer's shell; a test names
    # its daemon with -a.
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CONTAINERD")}
    with CliRunner().isolation(input=input, env={**unset, **(env or {})}) as (out, err, _):
        sys.argv = ["estargz-opt", *argv]
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.argv = saved_argv
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            _restore_loggers(loggers)
        stdout, stderr = out.getvalue(), err.getvalue()
    res = Invoked(["estargz-opt", *argv], code, stdout.decode(), stderr.decode())
    if check and code != 0:
        raise AssertionError(f"{' '.join(res.args)} exited {code}\nstdout:\n{res.stdout}\n"
                             f"stderr:\n{res.stderr}")
    return res


_LoggerState = dict[str, tuple[int, list[logging.Handler], bool]]


def _logger_state() -> _LoggerState:
    """Level, handlers and propagation of the root logger and every named one: the CLI
    sets them for its process (its handler on stderr, httpx quietened), and a test
    process must keep its own (caplog, a test that logs httpx at DEBUG)."""
    named = [(n, lg) for n, lg in logging.Logger.manager.loggerDict.items()
             if isinstance(lg, logging.Logger)]
    return {n: (lg.level, lg.handlers[:], lg.propagate)
            for n, lg in [("", logging.getLogger()), *named]}


def _restore_loggers(state: _LoggerState) -> None:
    for name, (level, handlers, propagate) in state.items():
        lg = logging.getLogger(name or None)
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate
    for name, lg in logging.Logger.manager.loggerDict.items():  # made during the run
        if isinstance(lg, logging.Logger) and name not in state:
            lg.setLevel(logging.NOTSET)
            lg.handlers.clear()


def printed_digest(res: subprocess.CompletedProcess[str] | Invoked) -> str:
    """Success: exit 0 and the new digest on the last stdout line."""
    assert res.returncode == 0, (f"{res.args} exited {res.returncode}\nstdout:\n{res.stdout}\n"
                                 f"stderr:\n{res.stderr}")
    last = res.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", last), res.stdout
    return last


def error_message(res: subprocess.CompletedProcess[str] | Invoked) -> str:
    """Failure: non-zero exit, no digest, one error line and it is stderr's last line."""
    assert res.returncode != 0, f"expected a failure\nstdout:\n{res.stdout}\nstderr:{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    assert not re.search(r"sha256:[0-9a-f]{64}\s*$", res.stdout), res.stdout
    lines = res.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith(ERROR)]
    assert len(errors) == 1 and lines[-1] == errors[0], \
        f"want one {ERROR!r} line, last on stderr:\n{res.stderr}"
    return errors[0].removeprefix(ERROR)
