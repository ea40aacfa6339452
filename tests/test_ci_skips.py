""".ci/check-skips.py, the CI gate against skipped tests, on real pytest JUnit output.

A throw-away suite is run by this Python's pytest with the JUnit options .ci/run uses;
the checker must name every skip by its node id (module, class and parametrized ones,
and a module skipped while collecting), accept only those on the allow-list, and fail
on any other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.containerd import REPO

pytestmark = pytest.mark.unit

CHECK = REPO / ".ci" / "check-skips.py"

SUITE = {
    "test_a.py": """
import pytest

def test_plain():
    pytest.skip("reason one")

class TestGroup:
    @pytest.mark.parametrize("p", ["x.y", "z"])
    def test_param(self, p):
        pytest.skip(f"reason {p}")

def test_runs():
    pass
""",
    "sub/test_b.py": """
import pytest
pytest.importorskip("no_such_module_anywhere")
""",
}
SKIPPED = [
    "sub/test_b.py",
    "test_a.py::test_plain",
    "test_a.py::TestGroup::test_param[x.y]",
    "test_a.py::TestGroup::test_param[z]",
]


def _junit(tmp_path: Path) -> Path:
    suite = tmp_path / "suite"
    for name, text in SUITE.items():
        (suite / name).parent.mkdir(parents=True, exist_ok=True)
        (suite / name).write_text(text)
    junit = tmp_path / "junit.xml"
    # Not the outer run's PYTEST_ADDOPTS: its --basetemp would be wiped by this run.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={suite}",
         f"--junitxml={junit}", "-o", "junit_family=xunit1", str(suite)],
        cwd=suite, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return junit


def _check(junit: Path, allow: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHECK), str(junit), str(allow)],
                          capture_output=True, text=True)


def test_every_skip_named_and_unlisted_ones_fail(tmp_path: Path) -> None:
    junit, allow = _junit(tmp_path), tmp_path / "allowed"
    allow.write_text("# comment\ntest_a.py::test_plain  # may skip\n\n")
    res = _check(junit, allow)
    assert res.returncode == 1
    for nodeid in SKIPPED:
        verdict = "allowed" if nodeid == "test_a.py::test_plain" else "NOT ALLOWED"
        assert f"ci: skipped ({verdict}) {nodeid}: " in res.stdout, res.stdout
    assert "reason x.y" in res.stdout
    assert "no_such_module_anywhere" in res.stdout
    assert "3 test(s) skipped that are not on" in res.stderr


def test_all_listed_passes(tmp_path: Path) -> None:
    junit, allow = _junit(tmp_path), tmp_path / "allowed"
    allow.write_text("\n".join(SKIPPED) + "\n")
    res = _check(junit, allow)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ci: 4 skipped, 4 of them on" in res.stdout


def test_the_repository_list_names_existing_tests() -> None:
    """Each allow-list entry is a test that exists (a stale entry would allow nothing)."""
    entries = [line.split("#", 1)[0].strip()
               for line in (REPO / ".ci" / "allowed-skips").read_text().splitlines()]
    for nodeid in filter(None, entries):
        path, _, rest = nodeid.partition("::")
        func = rest.split("[", 1)[0].split("::")[-1]
        assert f"def {func}(" in (REPO / path).read_text(), nodeid
