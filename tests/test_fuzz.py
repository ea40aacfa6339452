"""The in-repo fuzz target (tests/support/fuzz_reader.py) for a bounded time, as part of the suite.

It runs in its own process so that its peak RSS is its own (tests/support/peakrss.py), under a
timeout that is the hang guard; each case inside has a 30 s alarm of its own.
ESTARGZ_OPT_FUZZ_SECONDS sets the budget (default 45 s, about a minute with start-up).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support.peakrss import run_measured

pytestmark = pytest.mark.slow

TARGET = Path(__file__).resolve().parent / "support" / "fuzz_reader.py"
MAX_RSS_MIB = 200


def test_fuzz_reader_and_tar_parser() -> None:
    seconds = float(os.environ.get("ESTARGZ_OPT_FUZZ_SECONDS", "45"))
    # Hypothesis builds its Unicode table on a machine's first text strategy (about
    # 230 MiB at peak), then caches it on disk: let a first run build it, so that the
    # measured run's peak RSS is the reader's, not that table's.
    subprocess.run([sys.executable, str(TARGET), "--warm-up"], check=True, timeout=300)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        run = run_measured(
            [sys.executable, str(TARGET), "--seconds", str(seconds)],
            timeout=seconds + 120,
            stdout=out,
            stderr=err,
        )
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    assert run is not None, f"the fuzz run hung past {seconds + 120:.0f} s"
    assert run.returncode == 0, stderr[-6000:]
    print(f"\n  {stdout.strip()} peak-rss-mib: {run.rss_mib:.0f}")
    assert run.rss_mib < MAX_RSS_MIB, f"the fuzz run peaked at {run.rss_mib:.0f} MiB"
    m = re.search(r"cases: (\d+) ok: (\d+) refused: (\d+)", stdout)
    assert m, stdout
    cases, ok, refused = map(int, m.groups())
    assert cases >= 100 and ok and refused, stdout  # it ran, and reached both outcomes
