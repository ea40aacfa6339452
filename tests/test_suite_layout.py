"""How the suite itself is laid out, checked so that it stays so: test modules share code
only through tests/support (no test module imports another), bench/ reaches the tests'
code only through that package, and no test cites an issue number or a document the
repository does not hold."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parent
BENCH = TESTS.parent / "bench"
ISSUE = re.compile(r"\bissues? ?#?\d+|\bissue's\b", re.IGNORECASE)
DOCUMENT = re.compile(r"[\w./-]+\.md\b")


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def python_files(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs for p in d.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_test_module_imports_another() -> None:
    tests = {p.stem for p in TESTS.glob("test_*.py")} | {"conftest"}
    wrong = {str(p.relative_to(TESTS)): sorted(imported_modules(p) & tests)
             for p in python_files(TESTS)}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_bench_uses_the_tests_code_only_through_support() -> None:
    ours = {p.stem for p in TESTS.glob("*.py")} - {"conftest"}
    wrong = {p.name: sorted(imported_modules(p) & ours) for p in python_files(BENCH)}
    assert {k: v for k, v in wrong.items() if v} == {}
    for p in python_files(TESTS):
        assert "bench" not in imported_modules(p), p


def test_no_issue_numbers() -> None:
    cited = [f"{p.relative_to(TESTS.parent)}:{n}: {line.strip()}"
             for p in python_files(TESTS, BENCH)
             for n, line in enumerate(p.read_text().splitlines(), 1) if ISSUE.search(line)]
    assert cited == []


def test_documents_cited_are_in_the_repository() -> None:
    """A `.md` a test or benchmark names is the repository's own (at its top or in
    bench/, docs/), not a file of someone's machine."""
    repo = TESTS.parent
    missing = [f"{p.relative_to(repo)}: {name}" for p in python_files(TESTS, BENCH)
               for name in DOCUMENT.findall(p.read_text())
               if not any((base / name).is_file() for base in (repo, BENCH, repo / "docs"))]
    assert missing == []
