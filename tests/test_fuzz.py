"""The in-repo fuzz target (tests/fuzz_reader.py) for a bounded time, as part of the suite.

It runs in its own process so that its peak RSS is its own (wait4), and under a timeout
that is the hang guard; each case inside has a 30 s alarm of its own. ESTARGZ_OPT_FUZZ_SECONDS
sets the budget (default 45 s, about a minute with start-up).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = Path(__file__).resolve().parent / "fuzz_reader.py"
MAX_RSS_MIB = 200


def test_fuzz_reader_and_tar_parser() -> None:
    seconds = float(os.environ.get("ESTARGZ_OPT_FUZZ_SECONDS", "45"))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, str(TARGET), "--seconds", str(seconds)],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + seconds + 120
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise AssertionError(f"the fuzz run hung past {seconds + 120:.0f} s")
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, stderr[-6000:]
    rss_mib = usage.ru_maxrss / 1024
    print(f"\n  {stdout.strip()} peak-rss-mib: {rss_mib:.0f}")
    assert rss_mib < MAX_RSS_MIB, f"the fuzz run peaked at {rss_mib:.0f} MiB"
    m = re.search(r"cases: (\d+) ok: (\d+) refused: (\d+)", stdout)
    assert m, stdout
    cases, ok, refused = map(int, m.groups())
    assert cases >= 100 and ok and refused, stdout  # it ran, and reached both outcomes
