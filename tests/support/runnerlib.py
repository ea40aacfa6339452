"""Shared by the tests of the runners that need no containerd (runc, rootless).

`DAEMONLESS` names each such runner with the flags that select it, so that a test
parametrized over it covers every one (the rootless runner has its row).
`RunLeftovers` is support.leftovers' `Leftovers` for them: no sample container in the
runtime's state, no sample cgroup, no monitor, no mount, no netns, nothing in $TMPDIR.
Helpers read the converted OCI layout (prioritized files per layer) and run an image of
a layout with runc on umoci's unpack of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from support.tocs import our_toc, prioritized_files

#: runner name -> the flags that select it for an oci: source
DAEMONLESS: dict[str, list[str]] = {"runc": ["--runner", "runc"]}
STATE_ROOT = "/run/estargz-opt/runc"
SAMPLE = "estargz-opt-sample-"
MONITOR = "estargz_opt.workload.monitor"


def sample_containers(root: str = STATE_ROOT) -> set[str]:
    """Sample containers in the runtime's private state (what the runc runner made)."""
    if not os.path.isdir(root) or shutil.which("runc") is None:
        return set()
    out = subprocess.run(["runc", "--root", root, "list", "-q"], capture_output=True,
                         text=True, check=True).stdout
    return {c for c in out.split() if c.startswith(SAMPLE)}


def sample_cgroups() -> set[str]:
    """The cgroups of sample containers (/<estargz-opt>/<run id>) in any hierarchy."""
    found = set()
    for base in Path("/sys/fs/cgroup").glob("*/estargz-opt"):
        found |= {p.name for p in base.iterdir() if p.is_dir() and p.name.startswith(SAMPLE)}
    direct = Path("/sys/fs/cgroup/estargz-opt")
    if direct.is_dir():
        found |= {p.name for p in direct.iterdir() if p.is_dir() and p.name.startswith(SAMPLE)}
    return found


def _processes(needle: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline:
            found.append(f"{pid} {cmdline}")
    return found


def _netns() -> set[str]:
    d = Path("/var/run/netns")
    return set(os.listdir(d)) if d.is_dir() else set()


class RunLeftovers:
    """The state before a run; `check()` after it: nothing of the run may remain."""

    def __init__(self, tmpdir: Path) -> None:
        self.tmpdir = tmpdir
        tmpdir.mkdir(parents=True, exist_ok=True)
        self.reset()

    def reset(self) -> None:
        self.containers = sample_containers()
        self.cgroups = sample_cgroups()
        self.netns = _netns()

    def check(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            sample_cgroups() - self.cgroups or _processes(str(self.tmpdir))
        ):
            time.sleep(0.3)
        assert sample_containers() - self.containers == set(), "sample containers left"
        assert sample_cgroups() - self.cgroups == set(), "sample cgroups left"
        assert _processes(str(self.tmpdir)) == [], "processes of the run left"
        mounts = [m for m in Path("/proc/self/mountinfo").read_text().splitlines()
                  if str(self.tmpdir) in m or SAMPLE in m]
        assert mounts == [], f"mounts left: {mounts}"
        assert list(self.tmpdir.iterdir()) == [], f"left in $TMPDIR: {list(self.tmpdir.iterdir())}"
        assert _netns() <= self.netns, f"network namespaces left: {_netns() - self.netns}"


def layout_manifest(layout: Path, tag: str) -> dict:
    index = json.loads((layout / "index.json").read_text())
    [desc] = [m for m in index["manifests"]
              if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    blob = layout / "blobs" / "sha256" / desc["digest"].removeprefix("sha256:")
    doc = json.loads(blob.read_text())
    if "manifests" in doc:  # an index: the first (host) manifest
        blob = layout / "blobs" / "sha256" / doc["manifests"][0]["digest"].removeprefix("sha256:")
        doc = json.loads(blob.read_text())
    return doc


def layout_prioritized(layout: Path, tag: str) -> list[list[str]]:
    """Per converted layer, the files before its landmark, read by our TOC reader."""
    out = []
    for layer in layout_manifest(layout, tag)["layers"]:
        blob = layout / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        out.append(prioritized_files(our_toc(blob)))
    return out


def run_layout_image(layout: Path, tag: str, work: Path, runtime: str = "runc") -> str:
    """What the image prints when run: umoci unpacks it into a bundle (checking every
    layer's DiffID), the runtime runs it; its stdout."""
    bundle = work / f"bundle-{tag}"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)],
                   check=True, capture_output=True)
    try:
        config = json.loads((bundle / "config.json").read_text())
        config["process"]["terminal"] = False
        (bundle / "config.json").write_text(json.dumps(config))
        res = subprocess.run([runtime, "--root", str(work / "runc-state"), "run", "--bundle",
                              str(bundle), f"estargz-opt-test-{os.getpid()}-{tag}"],
                             capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr
        return res.stdout
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
