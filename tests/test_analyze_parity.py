"""Our workload analyzer against ctr-remote 0.14.3's, on the same image and workload.

A four-layer image (busybox, then three docker-style layers) whose workload reads files
from every layer, including a file that an upper layer replaces and one that an upper
layer deletes with a whiteout. Both tools run the workload in the same private
containerd (`optimize --period 3 --record-out`). Then:

- the recorded (layer, path) sets are equal;
- our record is byte for byte ctr-remote's with its repeats dropped (0.14.3 writes a
  line per access; first access wins in ours, as in upstream since v0.18);
- each converted layer puts the same prioritized files first, in the same order, before
  `.prefetch.landmark`, and layers without accessed files get the no-prefetch landmark;
- the runners without containerd (runnerlib.DAEMONLESS: runc; and the rootless runner,
  run by an unprivileged uid with no capabilities), on the same image given as `oci:`,
  record the same lines and put the same files first.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support.cli import cli_env, run_cli
from support.containerd import ctr_run, optimize as our_containerd_optimize
from support.imagefactory import write_layout
from support.reference import (
    Image,
    ctr_import,
    ctr_remote_run,
    read_record,
    reference_optimize,
    reference_tocs,
    require_accesses,
)
from support.runnerlib import DAEMONLESS, layout_prioritized
from support.tarfactory import build_tar, dir_, reg
from support.tocs import NO_LANDMARK, our_toc, prioritized_files
from support.unprivileged import make_unprivileged

pytestmark = pytest.mark.interop

WORKLOAD = [
    "/bin/busybox", "sh", "-c",
    "cat /data/a.txt /data/b.txt /etc/app.conf /etc/hostname /opt/tool/run.sh /data/gone.txt;"
    " cat /data/a.txt; /bin/busybox true; sleep 1",
]
# (path, layer) of each file the workload opens; data/gone.txt is deleted in layer 3,
# etc/hostname is replaced in layer 2.
EXPECTED = {
    ("bin/busybox", 0),
    ("data/a.txt", 1),
    ("data/b.txt", 2),
    ("etc/app.conf", 2),
    ("etc/hostname", 2),
    ("opt/tool/run.sh", 3),
}


def _layers() -> list[bytes]:
    one = [dir_("data/"), reg("data/a.txt", b"alpha\n" * 50), reg("data/gone.txt", b"x\n"),
           dir_("etc/"), reg("etc/hostname", b"lower\n"), reg("etc/unread", b"u\n")]
    two = [dir_("data/"), reg("data/b.txt", b"bravo\n" * 4000),
           dir_("etc/"), reg("etc/app.conf", b"mode = fast\n"), reg("etc/hostname", b"upper\n")]
    three = [dir_("data/"), reg("data/.wh.gone.txt", b""),
             dir_("opt/"), dir_("opt/tool/"), reg("opt/tool/run.sh", b"#!/bin/sh\n", mode=0o755),
             reg("opt/tool/unused", b"not read\n")]
    return [build_tar(one), build_tar(two), build_tar(three)]


@pytest.fixture(scope="module")
def image(containerd, busybox_layer: Path, tmp_path_factory) -> Image:
    base = tmp_path_factory.mktemp("anaparity")
    config = {"config": {"Entrypoint": WORKLOAD, "Env": ["PATH=/bin"], "WorkingDir": "/"}}
    write_layout(base / "layout", "v1", [busybox_layer.read_bytes(), *_layers()], config)
    return ctr_import(containerd, base / "layout", "v1", "localhost/anaparity:1", base / "img.tar")


def _our_tocs(containerd, target: str) -> list[dict]:
    """Our converted layers' TOCs, read back from containerd by our own reader."""
    from support.ociimage import image_target, read_manifest

    manifest = read_manifest(containerd, image_target(containerd, target))
    tocs = []
    for layer in manifest["layers"]:
        blob = containerd.root / "io.containerd.content.v1.content" / "blobs" / "sha256" / \
            layer["digest"].removeprefix("sha256:")
        tocs.append(our_toc(blob))
    return tocs


def _dedup(lines: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for line in lines:
        if line not in seen:
            seen.add(line)
            out.append(line)
    return out


def test_recorded_files_and_order_match_ctr_remote(
    image: Image, containerd, ctr_remote: Path, tmp_path: Path
) -> None:
    theirs = tmp_path / "theirs.jsonl"
    res = reference_optimize(ctr_remote, containerd, image, "localhost/anaparity:ref",
                             "estargz", WORKLOAD, theirs)
    recorded = read_record(theirs, res)
    require_accesses(recorded, image, sorted(EXPECTED), res.stderr)
    assert res.returncode == 0, res.stderr

    ours = tmp_path / "ours.jsonl"
    run = our_containerd_optimize(
        containerd, "--oci", "--period", "3", "--record-out", str(ours),
        "--entrypoint", json.dumps(WORKLOAD), image.ref, "localhost/anaparity:ours",
    )
    assert run.returncode == 0, run.stderr

    ref_set = {(r["path"], r["layerIndex"]) for r in recorded
               if r["manifestDigest"] == image.manifest_digest}
    our_lines = ours.read_text().splitlines()
    our_set = {(r["path"], r["layerIndex"]) for r in map(json.loads, our_lines)}
    assert our_set == ref_set == EXPECTED
    # Byte-compatible: ctr-remote's lines, each once, in first-access order.
    assert our_lines == _dedup(theirs.read_text().splitlines())

    # The runners without containerd, on the same image as an OCI layout.
    daemonless: dict[str, list[list[str]]] = {}
    for runner, flags in DAEMONLESS.items():
        layout = tmp_path / f"layout-{runner}"
        subprocess.run(["cp", "-a", str(image.layout), str(layout)], check=True)
        record = tmp_path / f"{runner}.jsonl"
        (tmp_path / f"tmp-{runner}").mkdir()
        res = run_cli("optimize", "--oci", *flags, "--period", "3", "--record-out", record,
                      "--entrypoint", json.dumps(WORKLOAD), f"oci:{layout}:{image.tag}",
                      f"oci:{layout}:esgz", env=cli_env(tmp_path / f"tmp-{runner}"))
        assert res.returncode == 0, res.stderr
        lines = record.read_text().splitlines()
        assert {(r["path"], r["layerIndex"]) for r in map(json.loads, lines)} == our_set, runner
        assert lines == our_lines, f"{runner}: not the containerd runner's record"
        daemonless[runner] = layout_prioritized(layout, "esgz")
    # The rootless runner, run by an unprivileged uid with no capabilities (setpriv).
    user = make_unprivileged()
    try:
        layout = user.home / "layout"
        subprocess.run(["cp", "-a", str(image.layout), str(layout)], check=True)
        user.give(layout)
        record = user.home / "rootless.jsonl"
        res = user.run("optimize", "--oci", "--period", "3", "--record-out", record,
                       "--entrypoint", json.dumps(WORKLOAD), f"oci:{layout}:{image.tag}",
                       f"oci:{layout}:esgz")
        assert res.returncode == 0, res.stderr
        assert "rootless run" in res.stderr, res.stderr
        lines = record.read_text().splitlines()
        assert {(r["path"], r["layerIndex"]) for r in map(json.loads, lines)} == our_set
        assert lines == our_lines, "rootless: not the containerd runner's record"
        daemonless["rootless"] = layout_prioritized(layout, "esgz")
    finally:
        user.remove()

    ref_tocs = reference_tocs(ctr_remote, containerd, "localhost/anaparity:ref", "estargz")
    our_tocs = _our_tocs(containerd, "localhost/anaparity:ours")
    assert len(our_tocs) == len(ref_tocs) == image.layer_count
    for index, (mine, ref) in enumerate(zip(our_tocs, ref_tocs, strict=True)):
        assert prioritized_files(mine) == prioritized_files(ref), f"layer {index}"
        for runner, per_layer in daemonless.items():
            assert per_layer[index] == prioritized_files(ref), f"{runner}, layer {index}"
        first = mine["entries"][0]["name"]
        assert (first == NO_LANDMARK) == (prioritized_files(ref) == []), f"layer {index}"
    # Every layer of this image has an accessed file, so none is left unprioritized.
    assert all(prioritized_files(t) for t in our_tocs)

    # ctr-remote's reader accepts our layers.
    from support.ociimage import image_target, read_manifest

    manifest = read_manifest(containerd, image_target(containerd, "localhost/anaparity:ours"))
    for layer in manifest["layers"]:
        out = ctr_remote_run(ctr_remote, containerd, "images", "get-toc-digest",
                             layer["digest"]).stdout.strip()
        assert out == layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"]


def test_optimized_image_runs(image: Image, containerd) -> None:
    run = our_containerd_optimize(
        containerd, "--oci", "--period", "3", image.ref, "localhost/anaparity:run",
    )
    assert run.returncode == 0, run.stderr
    out = ctr_run(containerd, "localhost/anaparity:run")
    assert "upper" in out and "mode = fast" in out and "lower" not in out
    assert "\nx\n" not in out  # data/gone.txt stays deleted
