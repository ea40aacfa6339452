"""tests/support/peakrss.py measures the command's memory, not the test process's."""

from __future__ import annotations

import sys

import pytest
from support.peakrss import run_measured

pytestmark = pytest.mark.unit

TOUCH = "b = bytearray({n} << 20)\nfor i in range(0, len(b), 4096): b[i] = 1"


def test_a_large_parent_does_not_count() -> None:
    ballast = bytearray(300 << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    small = run_measured([sys.executable, "-c", "pass"], timeout=60)
    big = run_measured([sys.executable, "-c", TOUCH.format(n=150)], timeout=60)
    del ballast
    assert small is not None and big is not None
    assert small.returncode == 0 and big.returncode == 0
    assert small.rss_mib < 60, small
    assert 150 <= big.rss_mib < 220, big


def test_exit_status_and_hang() -> None:
    failed = run_measured([sys.executable, "-c", "raise SystemExit(3)"], timeout=60)
    assert failed is not None and failed.returncode == 3
    assert run_measured(["sleep", "30"], timeout=1) is None
