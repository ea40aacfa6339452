"""Profiles that survive a rebuild, merge, and fail loudly when they match nothing.

No daemon: OCI layouts built by imagefactory, records written here in ctr-remote's
--record-out form (JSON lines path/manifestDigest/layerIndex). What a layer prioritizes is
read back from its TOC (test_prefetch_list.prioritized_files).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support.cli import Invoked, invoke, run_cli
from support.imagefactory import (
    HOST_PLATFORM,
    layout_state,
    resolve_tag,
    write_layout,
)
from support.tarfactory import build_tar, dir_, reg
from support.tocs import per_layer

pytestmark = pytest.mark.unit

BASE0 = [dir_("bin/"), reg("bin/sh", b"sh\n"), dir_("lib/"), reg("lib/libc.so", b"libc\n"),
         reg("lib/unused.so", b"never read\n")]
BASE1 = [dir_("usr/"), dir_("usr/py/"), reg("usr/py/os.py", b"os\n"),
         reg("usr/py/re.py", b"re\n"), reg("usr/py/json.py", b"json\n")]


def app(version: int) -> bytes:
    """The app layer of release `version`: main.py changes, old.py goes away in 2+."""
    files = [dir_("app/"), reg("app/main.py", f"main v{version}\n".encode()),
             reg("app/util.py", b"util\n")]
    if version == 1:
        files.append(reg("app/old.py", b"old\n"))
    else:
        files.append(reg(f"app/new{version}.py", b"new\n"))
    return build_tar(files)


TAG = "v1"
#: The workload's accesses on release 1: (path, layer index), in access order.
ACCESSES = [("app/main.py", 2), ("lib/libc.so", 0), ("usr/py/re.py", 1), ("bin/sh", 0),
            ("app/old.py", 2), ("usr/py/os.py", 1), ("app/util.py", 2)]


def release(root: Path, version: int) -> tuple[Path, str]:
    layout = root / f"app-{version}"
    digest = write_layout(layout, TAG, [build_tar(BASE0), build_tar(BASE1), app(version)])
    return layout, digest


def write_record(path: Path, manifest: str, accesses: list[tuple[str, int]]) -> Path:
    path.write_text("".join(
        json.dumps({"path": p, "manifestDigest": manifest, "layerIndex": i},
                   separators=(",", ":")) + "\n" for p, i in accesses))
    return path


def optimize(src: Path, dst: Path, *args: str, check: bool = True) -> Invoked:
    return invoke("optimize", "--oci", *args, f"oci:{src}:{TAG}", f"oci:{dst}:{TAG}",
                  check=check)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("estargz-opt: error:")]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("releases")
    return {v: release(root, v) for v in (1, 2, 3)}


def test_record_of_release_1_prioritizes_release_2(images, tmp_path: Path) -> None:
    (src1, digest1), (src2, digest2) = images[1], images[2]
    assert digest1 != digest2
    record = write_record(tmp_path / "rec.jsonl", digest1, ACCESSES)
    res1 = optimize(src1, tmp_path / "out1", "--record-in", str(record))
    original = per_layer(tmp_path / "out1", TAG, res1.stdout)
    assert original == [["lib/libc.so", "bin/sh"], ["usr/py/re.py", "usr/py/os.py"],
                        ["app/main.py", "app/old.py", "app/util.py"]]
    assert "WARNING" not in res1.stderr, res1.stderr  # the record's own image: exact match

    res2 = optimize(src2, tmp_path / "out2", "--record-in", str(record), "--json")
    report = json.loads(res2.stdout)
    rebuilt = per_layer(tmp_path / "out2", TAG, report["target"])
    # Base layers: the same files in the same order; the new top layer matched by path.
    assert rebuilt[:2] == original[:2]
    assert rebuilt[2] == ["app/main.py", "app/util.py"]
    warning = [line for line in res2.stderr.splitlines() if "matched by path" in line]
    assert len(warning) == 1 and "WARNING" in warning[0], res2.stderr
    assert "6 of 7 found (layer 0: 2, layer 1: 2, layer 2: 2)" in warning[0], warning
    assert "1 not found, e.g. app/old.py" in warning[0], warning
    counts = [(lay["profileFiles"], lay["profileMissing"]) for lay in report["layers"]]
    assert counts == [(2, 0), (2, 0), (2, 1)], report["layers"]
    assert report["profile"] == {"files": 7, "matched": 6, "missing": 1,
                                 "missingExamples": ["app/old.py"]}


def test_record_of_another_image_is_an_error(images, tmp_path: Path) -> None:
    src, _ = images[2]
    other = "sha256:" + "ab" * 32
    record = write_record(tmp_path / "other.jsonl", other,
                          [("opt/other/app", 1), ("srv/www/index.html", 0)])
    res = optimize(src, tmp_path / "out", "--record-in", str(record), check=False)
    assert res.returncode == 1, res
    [line] = errors(res.stderr)
    assert f"the record was made for {other}" in line and "nothing written" in line, line
    assert not (tmp_path / "out").exists(), layout_state(tmp_path / "out")

    res = optimize(src, tmp_path / "out", "--record-in", str(record), "--allow-empty-profile")
    assert not errors(res.stderr)
    assert re.search(r"WARNING: .*the record was made for .*--allow-empty-profile", res.stderr)
    assert per_layer(tmp_path / "out", TAG, res.stdout) == [[], [], []]


def test_under_half_matched_warns(images, tmp_path: Path) -> None:
    src, _ = images[2]
    lst = tmp_path / "list.txt"
    lst.write_text("bin/sh\ngone/a\ngone/b\ngone/c\n")
    res = optimize(src, tmp_path / "out", "--prefetch-list", str(lst))
    assert "WARNING: the profile matches only 1 of its 4 files" in res.stderr, res.stderr
    assert per_layer(tmp_path / "out", TAG, res.stdout) == [["bin/sh"], [], []]


def test_merged_in_command_line_order(images, tmp_path: Path) -> None:
    src, digest = images[1]
    startup = write_record(tmp_path / "startup.jsonl", digest,
                           [("app/main.py", 2), ("lib/libc.so", 0), ("usr/py/re.py", 1)])
    requests = write_record(tmp_path / "requests.jsonl", digest,
                            [("usr/py/json.py", 1), ("app/main.py", 2), ("app/util.py", 2),
                             ("lib/libc.so", 0)])
    lst = tmp_path / "extra.txt"
    lst.write_text("usr/py/*.py\nbin/sh\n")
    res = optimize(src, tmp_path / "a", "--record-in", str(startup),
                   "--record-in", str(requests))
    assert per_layer(tmp_path / "a", TAG, res.stdout) == [
        ["lib/libc.so"], ["usr/py/re.py", "usr/py/json.py"], ["app/main.py", "app/util.py"]]
    # Reversed order, and a prefetch list in between: first occurrence wins, no repeats.
    res = optimize(src, tmp_path / "b", "--record-in", str(requests),
                   "--prefetch-list", str(lst), "--record-in", str(startup))
    assert per_layer(tmp_path / "b", TAG, res.stdout) == [
        ["lib/libc.so", "bin/sh"], ["usr/py/json.py", "usr/py/os.py", "usr/py/re.py"],
        ["app/main.py", "app/util.py"]]


@pytest.mark.parametrize("odd", ["app/we*rd[1]?.py", "#app.py", " lead.py", "back\\slash"])
def test_prefetch_list_out_round_trip(tmp_path: Path, odd: str) -> None:
    layers = [build_tar(BASE0), build_tar([dir_("app/"), reg("app/main.py", b"m\n"),
                                           reg("app/x.py", b"x\n"), reg(odd, b"odd\n")])]
    src = tmp_path / "src"
    digest = write_layout(src, TAG, layers)
    record = write_record(tmp_path / "rec.jsonl", digest,
                          [("app/x.py", 1), (odd, 1), ("bin/sh", 0), ("app/main.py", 1)])
    lst = tmp_path / "list.txt"
    via_record = optimize(src, tmp_path / "r", "--record-in", str(record),
                          "--prefetch-list-out", str(lst))
    text = lst.read_text()
    assert text.startswith("# estargz-opt prefetch list") and f"oci:{src}:{TAG}" in text
    assert digest in text.splitlines()[0]
    via_list = optimize(src, tmp_path / "l", "--prefetch-list", str(lst))
    assert via_list.stdout.splitlines()[-1] == via_record.stdout.splitlines()[-1]
    assert resolve_tag(tmp_path / "l", TAG)["digest"] == resolve_tag(tmp_path / "r", TAG)["digest"]
    assert per_layer(tmp_path / "l", TAG, via_list.stdout)[1] == ["app/x.py", odd, "app/main.py"]


README = Path(__file__).resolve().parent.parent / "README.md"


def recipe_commands() -> list[list[str]]:
    """The commands of the README's first sh block under "In CI: record once, ...", split."""
    text = README.read_text()
    section = text[text.index("### In CI: record once, convert many times"):]
    block = section[section.index("```sh\n") + 6:]
    block = block[:block.index("```")].replace("\\\n", " ")
    return [line.split() for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_readme_ci_recipe_converts_later_releases(tmp_path: Path) -> None:
    commands = recipe_commands()
    analyze, *converts = commands
    # The recording step needs containerd (test_analyze runs it); its output is a record of
    # release 1.0 in ctr-remote's form, which we write for the image built here.
    assert analyze[:2] == ["estargz-opt", "analyze"], analyze
    record = analyze[analyze.index("--record-out") + 1]
    build = tmp_path / "build" / "app"
    layers = {"1.0": app(1), "1.1": app(2), "1.2": app(3)}
    digests = {tag: write_layout(build, tag, [build_tar(BASE0), build_tar(BASE1), top])
               for tag, top in layers.items()}
    write_record(tmp_path / record, digests[analyze[-1].split(":")[1]], ACCESSES)
    assert len(converts) >= 2, "the recipe should convert at least two later releases"
    base = None
    for cmd in converts:
        assert cmd[:2] == ["estargz-opt", "optimize"], cmd
        res = run_cli(*cmd[1:], cwd=tmp_path, timeout=600)
        assert res.returncode == 0, res.stderr
        assert "matched by path" in res.stderr, res.stderr
        layout, tag = cmd[-1].removeprefix("oci:").rsplit(":", 1)
        got = per_layer(tmp_path / layout, tag, res.stdout)
        assert got[2] == ["app/main.py", "app/util.py"], got
        assert base is None or got[:2] == base, (got, base)
        base = got[:2]
    assert base == [["lib/libc.so", "bin/sh"], ["usr/py/re.py", "usr/py/os.py"]]


@pytest.mark.parametrize("old_image_in_layout", [True, False], ids=["same-layout", "alone"])
def test_recorded_layer_is_preferred_where_it_moved(tmp_path: Path,
                                                    old_image_in_layout: bool) -> None:
    """Release 2 adds a layer below the base and a hotfix above it that also holds re.py.

    When the store holds the recorded image, its layer 1 is known to be base1 (same digest,
    now at index 2), so re.py stays there and base1's TOC is unchanged; without it, re.py
    goes to the top-most layer that holds it, the hotfix.
    """
    extra = build_tar([dir_("opt/"), reg("opt/tool", b"tool\n")])
    hotfix = build_tar([dir_("usr/"), dir_("usr/py/"), reg("usr/py/re.py", b"re fixed\n")])
    old_layout = tmp_path / "build"
    digest1 = write_layout(old_layout, "1.0", [build_tar(BASE0), build_tar(BASE1), app(1)])
    new_layout = old_layout if old_image_in_layout else tmp_path / "alone"
    write_layout(new_layout, TAG, [extra, build_tar(BASE0), build_tar(BASE1), hotfix, app(2)])
    record = write_record(tmp_path / "rec.jsonl", digest1, ACCESSES)
    res = optimize(new_layout, tmp_path / "out", "--record-in", str(record))
    got = per_layer(tmp_path / "out", TAG, res.stdout)
    if old_image_in_layout:
        assert got == [[], ["lib/libc.so", "bin/sh"], ["usr/py/re.py", "usr/py/os.py"], [],
                       ["app/main.py", "app/util.py"]]
    else:
        assert got == [[], ["lib/libc.so", "bin/sh"], ["usr/py/os.py"], ["usr/py/re.py"],
                       ["app/main.py", "app/util.py"]]


def test_profile_for_a_platform_not_converted_is_an_error(images, tmp_path: Path) -> None:
    src, digest = images[1]
    record = write_record(tmp_path / "rec.jsonl", digest, ACCESSES)
    other = "linux/arm64" if "amd64" in f"{HOST_PLATFORM}" else "linux/amd64"
    res = optimize(src, tmp_path / "out", "--record-in", str(record), "--platform", other,
                   check=False)
    assert res.returncode == 1, res
    [line] = errors(res.stderr)
    # A single manifest of the host's platform is not the --platform asked for: the
    # platform check refuses it, naming both, before the profile is matched.
    assert f"is an image for {'/'.join(HOST_PLATFORM)}, not for {other}" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--no-optimize", "--allow-empty-profile"], "--allow-empty-profile applies to"),
    (["--no-optimize", "--prefetch-list-out", "x.txt"], "--no-optimize has neither"),
])
def test_profile_usage_errors(images, tmp_path: Path, args: list[str], message: str) -> None:
    src, _ = images[1]
    res = optimize(src, tmp_path / "out", *args, check=False)
    assert res.returncode == 2, res
    [line] = errors(res.stderr)
    assert message in line, line
