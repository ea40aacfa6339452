"""A command's own peak RSS, measured apart from the test process that starts it.

Linux keeps a process's peak RSS across fork and exec (it is recorded in the process, not
in its memory map), so a command started straight from a pytest process of 300 MiB
reports at least 300 MiB, whatever it used itself. The command therefore runs as the
grandchild of a small wrapper: a fork starts with a fresh record, and the wrapper's
wait4() sees the command's own peak (plus the wrapper's ~10 MiB it starts from).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{status} {usage.ru_maxrss}")
"""


@dataclass
class Measured:
    returncode: int  # as subprocess reports it: negative for a signal
    seconds: float
    rss_mib: float


def run_measured(
    cmd: Sequence[str],
    *,
    timeout: float,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
) -> Measured | None:
    """Run cmd with stdin from /dev/null; None if it ran past timeout (then it is killed)."""
    with tempfile.NamedTemporaryFile("r", prefix="peakrss-", suffix=".txt") as report:
        t0 = time.monotonic()
        wrapper = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, report.name, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # so that a hang is killed with everything it started
        )
        try:
            wrapper.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(wrapper.pid, signal.SIGKILL)
            wrapper.wait()
            return None
        seconds = time.monotonic() - t0
        text = report.read().split()
    if wrapper.returncode != 0 or len(text) != 2:
        raise RuntimeError(f"the RSS wrapper failed (exit {wrapper.returncode}) for {cmd}")
    status, maxrss_kib = map(int, text)
    return Measured(os.waitstatus_to_exitcode(status), seconds, maxrss_kib / 1024)
