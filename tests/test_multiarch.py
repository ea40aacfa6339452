"""Every selected platform is profiled: foreign ones under qemu-user (binfmt_misc F entries).

One shared two-platform busybox image (Debian's busybox-static for amd64 and arm64); its
script reads /data/<uname -m>/*, so each platform's record and first-in-layer files must
be that platform's set, and never the other's.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
from support import imagefactory as f
from support.cli import cli_argv, cli_env, invoke, run_cli
from support.containerd import NAMESPACE, Containerd
from support.multiarch import DATA, without_qemu, write_two_platform_image
from support.tocs import our_toc, prioritized_files
from support.unprivileged import make_unprivileged

from estargz_opt import platforms
from estargz_opt.errors import EmulationUnavailableError
from estargz_opt.workload import emulation

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64",
                                reason="the image pairs amd64 (native) with arm64 (emulated)")

SCRIPT = {"bin/busybox", "app/run.sh"}  # bin/sh is a symlink: its target is read
WANT = {"linux/amd64": SCRIPT | set(DATA["x86_64"]),
        "linux/arm64": SCRIPT | set(DATA["aarch64"])}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("multiarch")
    layout = base / "layout"
    return layout, write_two_platform_image(layout, "v1", base / "debs")


def _manifests(layout: Path, tag: str) -> dict[str, dict]:
    """platform -> manifest of the index under `tag`."""
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    blob = layout / "blobs" / "sha256"
    doc = json.loads((blob / desc["digest"].removeprefix("sha256:")).read_text())
    return {f'{m["platform"]["os"]}/{m["platform"]["architecture"]}':
            json.loads((blob / m["digest"].removeprefix("sha256:")).read_text())
            for m in doc["manifests"]}


def _first_files(layout: Path, manifest: dict) -> set[str]:
    blob = layout / "blobs" / "sha256" / manifest["layers"][0]["digest"].removeprefix("sha256:")
    return set(prioritized_files(our_toc(blob)))


def test_all_platforms_each_gets_its_own_profile(
    image: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    layout, digests = image
    record = tmp_path / "record.jsonl"
    lists = tmp_path / "prefetch.txt"
    res = run_cli("optimize", "--oci", "--runner", "runc", "--all-platforms", "--period", "20",
                  "--record-out", record, "--prefetch-list-out", lists, "--json",
                  f"oci:{layout}:v1", f"oci:{layout}:esgz", env=cli_env(tmp_path))
    assert res.returncode == 0, res.stderr
    runs = json.loads(res.stdout)["workload"]["platforms"]
    assert [(r["platform"], r["exitStatus"], r["recordedFiles"]) for r in runs] == [
        ("linux/amd64", 0, 4), ("linux/arm64", 0, 4)], runs
    assert "running the workload for linux/arm64 (emulated by" in res.stderr, res.stderr
    entries = [json.loads(x) for x in record.read_text().splitlines()]
    for plat, digest in digests.items():
        got = {e["path"] for e in entries if e["manifestDigest"] == digest}
        assert got == WANT[plat], (plat, got)
        listed = (tmp_path / f"prefetch.txt.{plat.replace('/', '-')}").read_text()
        assert {x for x in listed.splitlines() if x and not x.startswith("#")} == WANT[plat]
    converted = _manifests(layout, "esgz")
    for plat, want in WANT.items():
        assert _first_files(layout, converted[plat]) == want, plat


def test_platform_arm64_alone_profiles_arm64_only(
    image: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    layout, digests = image
    record = tmp_path / "record.jsonl"
    res = run_cli("optimize", "--oci", "--runner", "runc", "--platform", "linux/arm64",
                  "--period", "20", "--record-out", record,
                  f"oci:{layout}:v1", f"oci:{layout}:arm", env=cli_env(tmp_path))
    assert res.returncode == 0, res.stderr
    entries = [json.loads(x) for x in record.read_text().splitlines()]
    assert {e["manifestDigest"] for e in entries} == {digests["linux/arm64"]}
    assert {e["path"] for e in entries} == WANT["linux/arm64"]


def test_containerd_runner_profiles_each_platform_and_arm64_runs_under_qemu(
    image: tuple[Path, dict[str, str]], containerd: Containerd, ctr_remote: Path,
    tmp_path: Path,
) -> None:
    """The containerd runner, checked with ctr-remote's get-toc-digest; the converted arm64
    image prints under `ctr run` (qemu) what the original prints."""
    layout, digests = image
    f.archive_for_ctr(layout, "v1", "example.com/multiarch:v1", tmp_path / "image.tar")
    containerd.ctr("images", "import", "--no-unpack", "--all-platforms",
                   str(tmp_path / "image.tar"))
    record = tmp_path / "record.jsonl"
    res = run_cli("-a", containerd.address, "optimize", "--oci", "--all-platforms",
                  "--period", "20", "--record-out", record, "example.com/multiarch:v1",
                  "example.com/multiarch:esgz", env=cli_env(tmp_path))
    assert res.returncode == 0, res.stderr
    entries = [json.loads(x) for x in record.read_text().splitlines()]
    for plat, digest in digests.items():
        assert {e["path"] for e in entries if e["manifestDigest"] == digest} == WANT[plat]
    target = containerd.ctr("images", "ls", "name==example.com/multiarch:esgz").stdout
    index = json.loads(containerd.ctr("content", "get", target.splitlines()[1].split()[2]).stdout)
    for m in index["manifests"]:
        plat = f'{m["platform"]["os"]}/{m["platform"]["architecture"]}'
        manifest = json.loads(containerd.ctr("content", "get", m["digest"]).stdout)
        layer = manifest["layers"][0]
        got = subprocess.run([str(ctr_remote), "-a", containerd.address, "-n", NAMESPACE,
                              "images", "get-toc-digest", layer["digest"]],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        assert got.strip() == layer["annotations"][f.TOC_DIGEST], plat
        blob = tmp_path / f"{plat.replace('/', '-')}.blob"
        blob.write_bytes(containerd.ctr("content", "get", layer["digest"], input=b"").stdout)
        assert set(prioritized_files(our_toc(blob))) == WANT[plat], plat
    printed = {}
    for ref in ("example.com/multiarch:v1", "example.com/multiarch:esgz"):
        printed[ref] = containerd.ctr("run", "--rm", "--platform", "linux/arm64", ref,
                                      f"multiarch-{ref.rsplit(':', 1)[1]}").stdout
    assert printed["example.com/multiarch:esgz"] == printed["example.com/multiarch:v1"]
    assert printed["example.com/multiarch:v1"].startswith("arch=aarch64\none-aarch64\n")


def test_rootless_runner_profiles_each_platform(
    image: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """Unprivileged, in a user namespace: the host's F entries still apply there (the
    kernel opened qemu at registration), so nothing of qemu is needed in the rootfs."""
    layout, digests = image
    user = make_unprivileged()
    try:
        mine = user.give(Path(shutil.copytree(layout, user.home / "layout")))
        record = user.home / "record.jsonl"
        res = user.run("optimize", "--oci", "--runner", "rootless", "--all-platforms",
                       "--period", "20", "--record-out", record,
                       f"oci:{mine}:v1", f"oci:{mine}:esgz")
        assert res.returncode == 0, res.stderr
        assert "emulated by" in res.stderr, res.stderr
        entries = [json.loads(x) for x in record.read_text().splitlines()]
        for plat, digest in digests.items():
            assert {e["path"] for e in entries if e["manifestDigest"] == digest} == WANT[plat]
        converted = _manifests(mine, "esgz")
        for plat, want in WANT.items():
            assert _first_files(mine, converted[plat]) == want, plat
    finally:
        user.remove()


def _masked(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(without_qemu(cli_argv(*args)),
                          capture_output=True, text=True, timeout=180, env=cli_env(tmp_path))


def test_without_qemu_refuses_in_one_line_or_converts_without_profile(
    image: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    layout, _ = image
    args = ["optimize", "--oci", "--runner", "runc", "--all-platforms", "--period", "20",
            f"oci:{layout}:v1", f"oci:{layout}:noqemu"]
    res = _masked(args, tmp_path)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) >= 1 and "Traceback" not in res.stderr, res.stderr
    assert "apt-get install qemu-user-static" in lines[-1], res.stderr
    assert "--allow-empty-profile" in lines[-1], res.stderr
    assert "noqemu" not in (layout / "index.json").read_text()

    res = _masked([*args[:-1], "--allow-empty-profile", f"oci:{layout}:noqemu"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "linux/arm64" in res.stderr and "without prioritized files" in res.stderr
    converted = _manifests(layout, "noqemu")
    assert _first_files(layout, converted["linux/arm64"]) == set()
    assert _first_files(layout, converted["linux/amd64"]) == WANT["linux/amd64"]


def test_entry_without_fix_binary_flag_is_refused(tmp_path: Path) -> None:
    """Without F the interpreter would be looked up inside the container, and not found."""
    (tmp_path / "qemu-aarch64").write_text(
        "enabled\ninterpreter /usr/bin/qemu-aarch64\nflags: OC\noffset 0\n")
    with pytest.raises(EmulationUnavailableError, match="F \\(fix-binary\\) flag"):
        emulation.find(platforms.parse("linux/arm64"), tmp_path, tmp_path / "none")
    assert emulation.find(platforms.host()).entry is None


def _record(path: Path, lines: dict[str, set[str]]) -> Path:
    path.write_text("".join(json.dumps({"path": p, "manifestDigest": digest, "layerIndex": 0})
                            + "\n" for digest, paths in lines.items() for p in sorted(paths)))
    return path


def test_record_in_applies_each_platforms_lines_and_profile_platform_by_path(
    image: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    layout, digests = image
    both = _record(tmp_path / "both.jsonl", {digests[p]: WANT[p] for p in WANT})
    res = run_cli("optimize", "--oci", "--all-platforms", "--record-in", both,
                  "--prefetch-list-out", tmp_path / "list.txt",
                  f"oci:{layout}:v1", f"oci:{layout}:from-both", env=cli_env(tmp_path))
    assert res.returncode == 0, res.stderr
    converted = _manifests(layout, "from-both")
    for plat, want in WANT.items():
        assert _first_files(layout, converted[plat]) == want, plat
        listed = (tmp_path / f"list.txt.{plat.replace('/', '-')}").read_text().splitlines()
        assert {x for x in listed if x and not x.startswith("#")} == want, plat

    amd = _record(tmp_path / "amd64.jsonl", {digests["linux/amd64"]: WANT["linux/amd64"]})
    res = run_cli("optimize", "--oci", "--all-platforms", "--record-in", amd,
                  f"oci:{layout}:v1", f"oci:{layout}:from-amd", env=cli_env(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "no lines for linux/arm64" in res.stderr and "--profile-platform" in res.stderr
    converted = _manifests(layout, "from-amd")
    assert _first_files(layout, converted["linux/arm64"]) == set()
    assert _first_files(layout, converted["linux/amd64"]) == WANT["linux/amd64"]

    res = run_cli("optimize", "--oci", "--platform", "linux/arm64", "--record-in", amd,
                  f"oci:{layout}:v1", f"oci:{layout}:arm-only", env=cli_env(tmp_path))
    assert res.returncode == 1, res.stderr
    assert "lines for none of the selected platforms" in res.stderr.strip().splitlines()[-1]
    assert '"arm-only"' not in (layout / "index.json").read_text()

    res = run_cli("optimize", "--oci", "--all-platforms", "--record-in", amd,
                  "--profile-platform", "linux/amd64",
                  f"oci:{layout}:v1", f"oci:{layout}:by-path", env=cli_env(tmp_path))
    assert res.returncode == 0, res.stderr
    converted = _manifests(layout, "by-path")
    for plat in WANT:
        assert _first_files(layout, converted[plat]) == WANT["linux/amd64"], plat

    res = run_cli("optimize", "--oci", "--all-platforms", "--record-in", amd,
                  "--profile-platform", "linux/s390x",
                  f"oci:{layout}:v1", f"oci:{layout}:bad", env=cli_env(tmp_path))
    assert res.returncode != 0 and res.stderr.strip().splitlines()[-1].startswith(
        "estargz-opt: error: --profile-platform linux/s390x"), res.stderr
    assert '"bad"' not in (layout / "index.json").read_text()


def test_profile_options_are_checked_before_any_work() -> None:
    """In process: the combinations the request refuses, each naming its flags."""
    for args, words in (
        (["--profile-platform", "linux/amd64"], "--profile-platform applies to --record-in"),
        (["--record-in", __file__, "--profile-platform", "linux/nope"], "unknown platform"),
        (["--allow-empty-profile"], "--allow-empty-profile applies to"),
    ):
        res = invoke("optimize", "--oci", *args, "oci:/nonexistent/a:v1",
                     "oci:/nonexistent/b:x")
        assert res.returncode != 0 and words in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
