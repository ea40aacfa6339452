"""``estargz-opt optimize`` against ``ctr-remote image optimize`` 0.14.3.

1. Same image, same record: ctr-remote optimizes a runnable three-layer image
   (busybox, then two docker-style layers whose parent directories all have
   entries), its analyzer runs the sample container and ``--record-out``
   saves what it opened. We feed that very record to ``--record-in``. The
   TOC of each of our layers must equal ctr-remote's after the normalization
   of test_toc_parity (offsets dropped, elided userName/groupName filled),
   and each layer's recorded files must come first, in record order, before
   ``.prefetch.landmark``. For gzip eStargz and for zstd:chunked.

   Record lines for another manifest or an out-of-range layer are ignored.

2. An image built with the real ``umoci`` tool, whose upper layer adds
   ``usr/bin/tool`` and, umoci writing only what changed, has no ``usr/``
   entry, and a ``usr/bin/`` entry only if that directory's times changed
   (both variants are built): ctr-remote's optimize aborts with ``not
   found``; ours converts it with the record ctr-remote wrote, every layer
   verifies, and the top layer's TOC starts with ``usr/bin/tool`` (after
   ``usr/bin/`` when the layer has it) then ``.prefetch.landmark``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.cli import invoke
from support.imagefactory import (
    TOC_DIGEST,
    blob_path,
    platform_manifests,
    resolve_tag,
)
from support.reference import (
    Image,
    ParityReference,
    ctr_import,
    read_record,
    recorded_per_layer,
    reference_optimize,
    require_accesses,
)
from support.tocs import (
    LANDMARK,
    describe_mismatch,
    normalize,
    our_toc,
    prioritized_files,
)

pytestmark = pytest.mark.interop

FORMATS = ("estargz", "zstdchunked")
UMOCI_TOOL = "usr/bin/tool"
UMOCI_WORKLOAD = ["/bin/busybox", "cat", "/" + UMOCI_TOOL]



def _run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                   stdin=subprocess.DEVNULL, timeout=120)


# How umoci's top layer comes out. umoci lists a directory only when its
# metadata changed since the layer below. Adding usr/bin/tool bumps
# usr/bin's mtime, so by default the layer holds usr/bin/ and usr/bin/tool but
# no usr/ ("dir-entry"); with usr/bin's times put back, only usr/bin/tool
# ("no-parents"). Both miss a parent; each variant pins its times so the
# output does not depend on the clock.
UMOCI_VARIANTS = {
    "no-parents": ((), [UMOCI_TOOL, LANDMARK]),
    "dir-entry": (("usr/bin",), ["usr/bin", UMOCI_TOOL, LANDMARK]),
}


@dataclass(frozen=True)
class UmociCase:
    variant: str
    image: Image


@pytest.fixture(scope="module", params=list(UMOCI_VARIANTS))
def umoci_case(request, containerd, busybox_layer: Path, tmp_path_factory) -> UmociCase:
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed (apt-get install umoci)")
    if os.geteuid() != 0:
        pytest.skip("umoci unpack/repack of a rootfs with root-owned files needs root")
    variant = request.param
    parents, _ = UMOCI_VARIANTS[variant]
    base = tmp_path_factory.mktemp(f"optumoci-{variant}")
    layout, tag = base / "layout", "t"
    image = f"{layout}:{tag}"
    _run("umoci", "init", "--layout", layout)
    _run("umoci", "new", "--image", image)
    # Layer 0: the busybox files, plus an empty usr/bin for the next layer.
    bundle = base / "bundle0"
    _run("umoci", "unpack", "--image", image, bundle)
    _run("tar", "-xf", busybox_layer, "-C", bundle / "rootfs")
    (bundle / "rootfs" / "usr" / "bin").mkdir(parents=True, exist_ok=True)
    _run("umoci", "repack", "--image", image, bundle)
    # Layer 1: usr/bin/tool, added under directories of the layer below.
    bundle = base / "bundle1"
    _run("umoci", "unpack", "--image", image, bundle)
    usr_bin = bundle / "rootfs" / "usr" / "bin"
    before = usr_bin.stat()
    tool = usr_bin / "tool"
    tool.write_bytes(b"tool: not really a program\n")
    tool.chmod(0o755)
    if parents:
        os.utime(usr_bin, (before.st_atime - 3600, before.st_mtime - 3600))
    else:
        os.utime(usr_bin, ns=(before.st_atime_ns, before.st_mtime_ns))
    _run("umoci", "repack", "--image", image, bundle)

    [(_plat, _desc, manifest)] = platform_manifests(layout, tag)
    assert len(manifest["layers"]) == 2, manifest
    with tarfile.open(blob_path(layout, manifest["layers"][1]["digest"])) as tar:
        names = [m.name.removeprefix("./").rstrip("/") for m in tar.getmembers()]
    if sorted(names) != sorted([*parents, UMOCI_TOOL]):
        # The point of this case is the missing parent entries (the hand-made
        # layer of test_toc_parity.py covers that if this umoci differs).
        pytest.skip(f"umoci wrote {names}, expected {[*parents, UMOCI_TOOL]}")
    return UmociCase(variant, ctr_import(containerd, layout, tag,
                                      f"localhost/optparity-umoci-{variant}:t",
                                      base / "image.tar"))


# --- helpers ----------------------------------------------------------------


def our_optimize(image: Image, out: Path, fmt: str, record: Path) -> list[tuple[dict, Path]]:
    """Optimize *image* with our record; return (layer descriptor, blob) per layer."""
    args = ["optimize", "--oci"]
    if fmt == "zstdchunked":
        args.append("--zstdchunked")
    args += ["--record-in", str(record), f"oci:{image.layout}:{image.tag}",
             f"oci:{out}:{image.tag}"]
    res = invoke(*args, check=True)
    printed = res.stdout.strip().splitlines()[-1]
    assert resolve_tag(out, image.tag)["digest"] == printed, \
        f"printed {printed!r}; {out}:{image.tag} is {resolve_tag(out, image.tag)}"
    [(_plat, _desc, manifest)] = platform_manifests(out, image.tag)
    assert len(manifest["layers"]) == image.layer_count, manifest
    return [(layer, blob_path(out, layer["digest"])) for layer in manifest["layers"]]


# --- tests ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_optimize_toc_matches_ctr_remote(fmt: str, parity_reference: ParityReference,
                                         tmp_path: Path) -> None:
    parity_image = parity_reference.image
    reference = parity_reference.run(fmt)
    record, recorded, ref_tocs = reference.record, reference.recorded, reference.tocs

    ours = our_optimize(parity_image, tmp_path / "out", fmt, record)
    expected = recorded_per_layer(recorded, parity_image)
    reports = []
    for index, ((_desc, blob), ref_toc) in enumerate(zip(ours, ref_tocs, strict=True)):
        toc = our_toc(blob)
        report = describe_mismatch(f"layer {index}, {fmt}, with ctr-remote's record",
                                   normalize(toc), normalize(ref_toc))
        if report:
            reports.append(report)
        got = prioritized_files(toc)
        if got != expected[index]:
            reports.append(f"layer {index}, {fmt}: prioritized files {got}, record says "
                           f"{expected[index]}")
    if reports:
        pytest.fail("\n\n".join(reports), pytrace=False)

    # Lines for another manifest or a layer index out of range are ignored,
    # as upstream does: the same record with such lines gives the same image.
    noisy = tmp_path / "noisy.jsonl"
    other = "sha256:" + "0" * 64
    noise = [{"path": "data/unread.txt", "manifestDigest": other, "layerIndex": 2},
             {"path": "etc/hostname", "manifestDigest": parity_image.manifest_digest,
              "layerIndex": parity_image.layer_count},
             {"path": "data/unread.txt", "manifestDigest": parity_image.manifest_digest,
              "layerIndex": 99}]
    noisy.write_text("".join(json.dumps(n, separators=(",", ":")) + "\n" for n in noise)
                     + record.read_text())
    again = our_optimize(parity_image, tmp_path / "out-noisy", fmt, noisy)
    assert [d["digest"] for d, _ in again] == [d["digest"] for d, _ in ours], \
        "foreign or out-of-range record lines changed the layers"


def test_umoci_image_converts_where_ctr_remote_fails(umoci_case: UmociCase, containerd,
                                                     ctr_remote: Path, tmp_path: Path) -> None:
    image = umoci_case.image
    parents, head = UMOCI_VARIANTS[umoci_case.variant]
    missing = "usr" if parents else "usr/bin"
    record = tmp_path / "record.jsonl"
    res = reference_optimize(ctr_remote, containerd, image, f"{image.ref}-opt", "estargz",
                             UMOCI_WORKLOAD, record)
    recorded = read_record(record, res)
    require_accesses(recorded, image, [("bin/busybox", 0), (UMOCI_TOOL, 1)], res.stderr)
    assert res.returncode != 0, (
        "ctr-remote optimize was expected to fail: a parent of usr/bin/tool has no entry\n"
        f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    assert f'file: "{missing}": not found' in res.stderr, res.stderr

    [(_plat, _desc, manifest)] = platform_manifests(image.layout, image.tag)
    with tarfile.open(blob_path(image.layout, manifest["layers"][1]["digest"])) as tar:
        inputs = [m.name.rstrip("/") for m in tar.getmembers()]
    for fmt in FORMATS:
        ours = our_optimize(image, tmp_path / f"out-{fmt}", fmt, record)
        for desc, blob in ours:
            assert TOC_DIGEST in desc.get("annotations", {}), desc
            invoke("layer", "verify", str(blob), "--toc-digest",
                        desc["annotations"][TOC_DIGEST], check=True)
        assert prioritized_files(our_toc(ours[0][1])) == ["bin/busybox"], fmt
        names = [e["name"].rstrip("/") for e in our_toc(ours[1][1])["entries"]
                 if e.get("type") != "chunk"]
        assert names[:len(head)] == head, (fmt, names)
        # No parent directory invented (usr/ never appears), nothing lost.
        rest = [n for n in inputs if n not in head]
        assert names[len(head):] == rest, (fmt, names, inputs)
