"""The reference converter, ctr-remote 0.14.3, on a private containerd; and the parity image
(busybox, then two docker-style layers) its analyzer records a workload on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.containerd import NAMESPACE, Containerd
from support.imagefactory import TOC_DIGEST, archive_for_ctr, platform_manifests, write_layout
from support.ociimage import image_target, read_manifest
from support.tarfactory import build_tar, dir_, reg


def ctr_remote_run(ctr_remote: Path, containerd: Containerd, *args: str,
                   check: bool = True) -> subprocess.CompletedProcess:
    """Run ctr-remote on *containerd*'s test namespace; with *check*, a non-zero exit
    fails the test with its output."""
    cmd = [str(ctr_remote), "-a", containerd.address, "-n", NAMESPACE, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\n"
                             f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


TAG = "v1"


WORKLOAD = ["/bin/busybox", "sh", "-c", "cat /data/a.txt /data/b.txt /etc/app.conf; sleep 1"]


# What the workload opens, and the layer (bottom = 0) each file comes from.
EXPECTED_ACCESSES = [("bin/busybox", 0), ("data/a.txt", 1), ("data/b.txt", 2),
                     ("etc/app.conf", 2)]


# Words of a sample container that could not be started (no runtime, no
# cgroups, no overlay...): then there is nothing to compare against.
RUNTIME_TROUBLE = ("runc", "OCI runtime", "shim", "cgroup", "failed to mount", "overlay")


def parity_upper_layers() -> list[bytes]:
    """Two docker-style layers: each file's parent directory has its own entry."""
    one = [dir_("data/"), reg("data/a.txt", b"alpha\n" * 40),
           dir_("etc/"), reg("etc/hostname", b"parity\n")]
    two = [dir_("data/"), reg("data/b.txt", b"bravo\n" * 3000),
           reg("data/unread.txt", b"never opened\n"),
           dir_("etc/"), reg("etc/app.conf", b"mode = fast\n", mode=0o600)]
    return [build_tar(one), build_tar(two)]


@dataclass(frozen=True)
class Image:
    layout: Path
    tag: str
    ref: str  # its name in the private containerd
    manifest_digest: str
    layer_count: int


def ctr_import(containerd, layout: Path, tag: str, ref: str, archive: Path) -> Image:
    [(_plat, desc, manifest)] = platform_manifests(layout, tag)
    archive_for_ctr(layout, tag, ref, archive)
    containerd.ctr("images", "import", "--no-unpack", "--all-platforms", str(archive))
    assert image_target(containerd, ref) == desc["digest"]
    return Image(layout, tag, ref, desc["digest"], len(manifest["layers"]))


def reference_optimize(ctr_remote: Path, containerd, image: Image, target: str, fmt: str,
                       workload: list[str], record: Path) -> subprocess.CompletedProcess:
    if shutil.which("runc") is None:
        pytest.skip("ctr-remote optimize runs the image: runc is not installed")
    args = ["image", "optimize", "--oci"]
    if fmt == "zstdchunked":
        args.append("--zstdchunked")
    args += ["--period", "3", "--record-out", str(record), "--entrypoint", json.dumps(workload),
             image.ref, target]
    return ctr_remote_run(ctr_remote, containerd, *args, check=False)


def read_record(record: Path, res: subprocess.CompletedProcess) -> list[dict]:
    if not record.is_file():
        if any(w in res.stderr for w in RUNTIME_TROUBLE):
            pytest.skip(f"the sample container could not run:\n{res.stderr[-2000:]}")
        pytest.fail(f"ctr-remote wrote no record (exit {res.returncode})\n"
                    f"stderr:\n{res.stderr}", pytrace=False)
    return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]


def require_accesses(recorded: list[dict], image: Image, expected: list[tuple[str, int]],
                     stderr: str) -> None:
    got = [(r["path"], r["layerIndex"]) for r in recorded
           if r["manifestDigest"] == image.manifest_digest]
    missing = [e for e in expected if e not in got]
    if missing:
        pytest.skip(f"the sample container did not open {missing} (record: {got}); "
                    f"it probably did not run\nctr-remote stderr:\n{stderr[-2000:]}")


def recorded_per_layer(recorded: list[dict], image: Image) -> list[list[str]]:
    """The record as ``--record-in`` must apply it: host manifest lines only,
    layer index in range, first occurrence of (layer, path) kept, file order."""
    out: list[list[str]] = [[] for _ in range(image.layer_count)]
    for r in recorded:
        index = r["layerIndex"]
        if r["manifestDigest"] == image.manifest_digest and 0 <= index < image.layer_count \
                and r["path"] not in out[index]:
            out[index].append(r["path"])
    return out


def reference_tocs(ctr_remote: Path, containerd, target: str, fmt: str) -> list[dict]:
    manifest = read_manifest(containerd, image_target(containerd, target))
    tocs = []
    for layer in manifest["layers"]:
        assert TOC_DIGEST in layer.get("annotations", {}), layer
        dump = ["images", "get-toc-digest", "--dump-toc"]
        if fmt == "zstdchunked":
            dump.append("--zstdchunked")
        tocs.append(json.loads(ctr_remote_run(ctr_remote, containerd, *dump,
                                              layer["digest"]).stdout))
    return tocs


@dataclass(frozen=True)
class ReferenceRun:
    """ctr-remote's `image optimize` of the parity image in one format: the record its
    analyzer wrote (path and lines) and the TOC of each layer it converted."""

    record: Path
    recorded: list[dict]
    tocs: list[dict]


class ParityReference:
    """The parity image in the session's containerd and ctr-remote's optimize of it, run
    once per format for every test that compares against it (each run samples the
    workload for seconds)."""

    def __init__(self, ctr_remote: Path, containerd: Containerd, busybox_layer: Path,
                 base: Path) -> None:
        self.ctr_remote, self.containerd, self.base = ctr_remote, containerd, base
        config = {"config": {"Entrypoint": WORKLOAD, "Env": ["PATH=/bin"], "WorkingDir": "/"}}
        write_layout(base / "layout", TAG, [busybox_layer.read_bytes(), *parity_upper_layers()],
                     config)
        self.image = ctr_import(containerd, base / "layout", TAG, "localhost/optparity:1",
                                base / "image.tar")
        self._runs: dict[str, ReferenceRun] = {}

    def run(self, fmt: str) -> ReferenceRun:
        """ctr-remote's run in `fmt` (skipped where its sample container cannot run)."""
        if fmt not in self._runs:
            record = self.base / f"record-{fmt}.jsonl"
            target = f"localhost/optparity:1-ctr-remote-{fmt}"
            res = reference_optimize(self.ctr_remote, self.containerd, self.image, target, fmt,
                                     WORKLOAD, record)
            recorded = read_record(record, res)
            require_accesses(recorded, self.image, EXPECTED_ACCESSES, res.stderr)
            if res.returncode != 0:
                pytest.fail(f"ctr-remote optimize failed on a docker-style image\n"
                            f"stderr:\n{res.stderr}", pytrace=False)
            tocs = reference_tocs(self.ctr_remote, self.containerd, target, fmt)
            assert len(tocs) == self.image.layer_count
            self._runs[fmt] = ReferenceRun(record, recorded, tocs)
        return self._runs[fmt]
