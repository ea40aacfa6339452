"""Fail CI when pytest skipped a test that .ci/allowed-skips does not list.

Reads pytest's JUnit XML (written with junit_family=xunit1, whose testcases keep their
file), prints every skip with its reason, and exits 1 if any is not allowed.
usage: python3 .ci/check-skips.py JUNIT_XML ALLOW_LIST
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Skip:
    nodeid: str
    reason: str


def nodeid(case: ET.Element) -> str:
    """The pytest node id of a JUnit testcase: file, then classes, then the test name."""
    file, classname, name = case.get("file", ""), case.get("classname", ""), case.get("name", "")
    if not classname:  # a module skipped while collecting
        return file or name
    module = file.removesuffix(".py").replace("/", ".")
    classes = classname.removeprefix(module).lstrip(".")
    return "::".join(filter(None, [file or classname, *classes.split("."), name]))


def skips(junit: Path) -> list[Skip]:
    found = []
    for case in ET.parse(junit).iter("testcase"):
        skipped = case.find("skipped")
        if skipped is None:
            continue
        reason = skipped.get("message", "")
        if reason == "collection skipped" or not reason:
            reason = (skipped.text or reason).strip()
        found.append(Skip(nodeid(case), reason))
    return found


def allowed(allow_list: Path) -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in allow_list.read_text().splitlines())
    return {line for line in lines if line}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    found, allow = skips(Path(argv[1])), allowed(Path(argv[2]))
    bad = [s for s in found if s.nodeid not in allow]
    print(f"ci: {len(found)} skipped, {len(found) - len(bad)} of them on {argv[2]}")
    for s in found:
        verdict = "allowed" if s.nodeid in allow else "NOT ALLOWED"
        print(f"ci: skipped ({verdict}) {s.nodeid}: {s.reason}")
    if bad:
        print(f"ci: {len(bad)} test(s) skipped that are not on {argv[2]}: that is a failure",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
