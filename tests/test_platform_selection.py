"""Which platform images `optimize` converts, for a single manifest as for an index.

A single manifest has the platform its config names (os, architecture, variant): an image
of another platform than the host's is refused in one line naming both, before any
workload runs; `--platform` / `--all-platforms` select it as they would an index entry,
and then its workload runs under qemu-user, or (no qemu, --allow-empty-profile) none runs.

The "foreign" images below hold the host's busybox under an arm64 config. That is on
purpose: a run that took the image for the host's would start its workload and succeed,
so only the platform check can make these tests pass.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import imagefactory as f
from support.cli import cli_argv
from support.multiarch import without_qemu

HOST = f.platform_str(f.HOST_PLATFORM)
FOREIGN_ARCH = "arm64" if f.HOST_PLATFORM[1] != "arm64" else "amd64"
FOREIGN = f"linux/{FOREIGN_ARCH}"
APP = {"app/": None, "app/conf": b"x=1\n"}
CMD = ["/bin/busybox", "cat", "/app/conf"]
ERROR = "estargz-opt: error:"


def cli(*args: str | Path, tmp: Path, qemu: bool = True) -> subprocess.CompletedProcess[str]:
    argv = cli_argv(*args)
    return subprocess.run(
        argv if qemu else without_qemu(argv),
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=180,
        env={k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD")}
        | {"TMPDIR": str(tmp)},
    )


def single_manifest(layout: Path, tag: str, busybox: Path, platform: str,
                    descriptor_platform: bool = False) -> str:
    """A one-manifest image whose config names `platform`; its index.json entry names no
    platform unless asked (containerd's and a registry's root descriptors name none)."""
    info = f.put_image_manifest(layout, [busybox.read_bytes(), f.simple_layer(APP)],
                                f.busybox_config(CMD), platform)
    desc = dict(info.descriptor)
    if not descriptor_platform:
        desc.pop("platform")
    f.tag_descriptor(layout, tag, desc)
    return info.digest


def config_of(layout: Path, tag: str) -> dict[str, Any]:
    manifest = f.read_json(layout, f.resolve_tag(layout, tag)["digest"])
    config: dict[str, Any] = f.read_json(layout, manifest["config"]["digest"])
    return config


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The run failed with exit 1 and said so in exactly one line, and nothing else."""
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), proc.stderr
    assert proc.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory, busybox_layer: Path) -> Path:
    layout = tmp_path_factory.mktemp("foreign")
    single_manifest(layout, "bare", busybox_layer, FOREIGN)
    single_manifest(layout, "described", busybox_layer, FOREIGN, descriptor_platform=True)
    single_manifest(layout, "host", busybox_layer, HOST)
    f.write_index(layout, "index", [(FOREIGN, [f.simple_layer(APP)])], f.busybox_config(CMD))
    return layout


@pytest.mark.parametrize("tag", ["bare", "described"])
def test_foreign_single_manifest_fails_naming_both(foreign: Path, tmp_path: Path, tag: str):
    dst, record = tmp_path / "dst", tmp_path / "record.jsonl"
    proc = cli("optimize", "--oci", "--runner", "runc", "--period", "3", "--record-out", record,
               f"oci:{foreign}:{tag}", f"oci:{dst}:x", tmp=tmp_path)
    msg = one_error(proc)
    assert FOREIGN in msg and HOST in msg and "--platform" in msg, msg
    assert not dst.exists() and not record.exists()
    assert list(tmp_path.iterdir()) == []


def test_foreign_single_manifest_fails_without_workload_too(foreign: Path, tmp_path: Path):
    """--no-optimize selects platforms the same way."""
    dst = tmp_path / "dst"
    msg = one_error(cli("optimize", "--oci", "--no-optimize", f"oci:{foreign}:bare",
                        f"oci:{dst}:x", tmp=tmp_path))
    assert FOREIGN in msg and HOST in msg, msg
    assert not dst.exists()


def test_foreign_index_fails_with_no_warning_first(foreign: Path, tmp_path: Path):
    dst = tmp_path / "dst"
    proc = cli("optimize", "--oci", "--runner", "runc", "--period", "3",
               f"oci:{foreign}:index", f"oci:{dst}:x", tmp=tmp_path)
    msg = one_error(proc)
    assert f"has no image for {HOST} (the host); it has: {FOREIGN}" in msg, msg
    assert not dst.exists()


@pytest.mark.parametrize("flag", [["--platform", FOREIGN], ["--all-platforms"]])
def test_platform_flag_converts_foreign_single_manifest(foreign: Path, tmp_path: Path,
                                                        flag: list[str]):
    dst = tmp_path / "dst"
    proc = cli("optimize", "--oci", "--runner", "runc", "--period", "3", "--json", "-q",
               "--allow-empty-profile", *flag, f"oci:{foreign}:bare", f"oci:{dst}:x",
               tmp=tmp_path, qemu=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    # No workload ran (no qemu-user for arm64 here); the image is converted whole,
    # without prioritized files, and says so.
    assert report["workload"] is None
    assert [lay["prioritizedFiles"] for lay in report["layers"]] == [0, 0]
    assert all(lay["target"]["mediaType"].endswith("+gzip") for lay in report["layers"])
    assert config_of(dst, "x")["architecture"] == FOREIGN_ARCH
    assert f"the {FOREIGN} workload cannot run on this {HOST} host" in proc.stderr
    assert "qemu-user-static" in proc.stderr and "without prioritized files" in proc.stderr


def test_host_single_manifest_still_runs_its_workload(foreign: Path, tmp_path: Path):
    dst = tmp_path / "dst"
    proc = cli("optimize", "--oci", "--runner", "runc", "--period", "3", "--json", "-q",
               f"oci:{foreign}:host", f"oci:{dst}:x", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["workload"] is not None
    assert sum(lay["prioritizedFiles"] for lay in report["layers"]) >= 2


def test_variant_is_matched_strictly(tmp_path: Path, busybox_layer: Path):
    """containerd's strict matcher: linux/arm/v7 is not linux/arm/v6, nor the reverse."""
    layout = tmp_path / "arm"
    single_manifest(layout, "v7", busybox_layer, "linux/arm/v7")
    out = tmp_path / "out"
    msg = one_error(cli("optimize", "--oci", "--no-optimize", "--platform", "linux/arm/v6",
                        f"oci:{layout}:v7", f"oci:{out}:x", tmp=tmp_path))
    assert "linux/arm/v7" in msg and "linux/arm/v6" in msg, msg
    proc = cli("optimize", "--oci", "--no-optimize", "--platform", "linux/arm/v7",
               f"oci:{layout}:v7", f"oci:{out}:x", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("tag", ["bare", "index"])
def test_analyze_of_foreign_image_names_both_platforms(foreign: Path, tmp_path: Path,
                                                       tag: str):
    record = tmp_path / "record.jsonl"
    msg = one_error(cli("analyze", "--runner", "runc", "--period", "3", "--record-out", record,
                        f"oci:{foreign}:{tag}", tmp=tmp_path))
    assert FOREIGN in msg and f"{HOST} (the host)" in msg, msg
    assert "the workload runs only on the host platform" in msg, msg
    assert not record.exists()


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_verify_platform_of_foreign_single_manifest(foreign: Path, tmp_path: Path,
                                                    command: str):
    msg = one_error(cli(command, "--platform", HOST, f"oci:{foreign}:bare", tmp=tmp_path))
    assert f"is an image for {FOREIGN}, not for {HOST}" in msg, msg
