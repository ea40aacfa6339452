"""`make demo` (scripts/demo.sh) shows what it says it shows, where it says so."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.containerd import SCRIPTS, containerd_unavailable_reason

pytestmark = [pytest.mark.root, pytest.mark.containerd, pytest.mark.slow]

DEMO = SCRIPTS / "demo.sh"


def _section(stderr: str, heading: str) -> str:
    """The text between the `== heading…` line and the next `== ` heading."""
    m = re.search(rf"^== {re.escape(heading)}.*?\n(.*?)(?=^== )", stderr, re.S | re.M)
    assert m, f"no section {heading!r} in:\n{stderr}"
    return m.group(1)


def test_demo_shows_its_layer_table_and_true_totals(ctr_remote: Path) -> None:
    reason = containerd_unavailable_reason()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(["bash", str(DEMO)], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL,
                          env=os.environ | {"PYTHON": sys.executable,
                                            "ESTARGZ_OPT_CTR_REMOTE": str(ctr_remote)})
    assert proc.returncode == 0, proc.stderr
    table = _section(proc.stderr, "layers:")
    assert re.search(r"^layer 0: [\d,]+ -> [\d,]+ bytes", table, re.M), table
    assert re.search(r"^layer 1: [\d,]+ -> [\d,]+ bytes", table, re.M), table
    assert "prioritized      app/run.sh, etc/demo-app/app.conf" in table, table
    assert "RESULT: the reference reader agrees on every layer" in table, table
    assert re.search(r"^layers     : 2 converted \(table above\); RESULT: the reference "
                     r"reader agrees", proc.stdout, re.M), proc.stdout
    # Each layer's done line: its whole tar in, in a unit that shows it.
    done = re.findall(r"layer sha256:[0-9a-f]{64} done: (.*)", proc.stderr)
    assert len(done) == 2, proc.stderr
    assert all(re.match(r"[1-9][\d.]* (KiB|MiB) of tar in, [1-9]", d) for d in done), done
    assert "0.0 MiB" not in proc.stderr
