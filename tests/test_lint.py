"""``verify``, ``inspect``, ``optimize --json``, progress and JSON logs, end to end.

Every image here is built by :mod:`imagefactory` and converted by our own ``optimize``
(one run per format, shared by the module), then:

* ``verify`` must pass on each of them (estargz, zstd:chunked, external TOC found as
  ``TAG-esgztoc`` next to ``TAG``, ``--record-in`` and ``--no-optimize``), and on an image
  optimized inside the private containerd (``-a SOCK verify NAME``);
* ``verify`` must fail, naming the layer (index and digest) and the problem, on copies that
  were damaged one way each. The damaged blob or config is stored under its *new* digest
  and the manifest and ``index.json`` are rewritten to point at it, so the layout stays
  self-consistent and only the check under test can fail;
* ``inspect --json`` must report as prefetch bytes exactly the offset of
  ``.prefetch.landmark`` in the layer's TOC (read with ``estargz-opt layer toc``), as must
  ``optimize --json``; ``inspect --files`` lists the recorded paths;
* progress: drawn live on a terminal (tmux) without touching stdout, plain
  ``converting layer sha256:`` log lines otherwise, nothing with ``-q``, one JSON object
  per stderr line with ``--log-format json``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import imagefactory as f
from support.cli import Invoked, cli_env, invoke

HOST = f.platform_str(f.HOST_PLATFORM)
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
ERROR = "estargz-opt: error: "
DIGEST_LINE = re.compile(r"sha256:[0-9a-f]{64}")

RANDOM = random.Random(6).randbytes(192 * 1024)

LAYER0 = {"bin/": None, "bin/tool": b"#!tool\n" * 4000, "etc/": None, "etc/a.conf": b"a=1\n",
          "etc/unused.conf": b"u=0\n"}
LAYER1 = {"srv/": None, "srv/data/": None, "srv/data/b.txt": b"bee\n",
          "srv/data/rand.bin": RANDOM, "srv/zeros": bytes(1 << 20)}
# Recorded accesses, in order: layer 1 first, then two files of layer 0.
RECORD = (("srv/data/b.txt", 1), ("bin/tool", 0), ("etc/a.conf", 0))
PRIORITIZED = {0: ["bin/tool", "etc/a.conf"], 1: ["srv/data/b.txt"]}

CONVERSIONS = {
    "estargz": ("--oci", "--record-in", "{record}"),
    "zstdchunked": ("--oci", "--zstdchunked", "--record-in", "{record}"),
    "external-toc": ("--oci", "--estargz-external-toc", "--record-in", "{record}"),
    "no-optimize": ("--oci", "--no-optimize"),
    "no-optimize-zstd": ("--oci", "--zstdchunked", "--no-optimize"),
}
WITH_RECORD = ["estargz", "zstdchunked", "external-toc"]
FORMAT = {"estargz": "estargz", "zstdchunked": "zstdchunked",
          "external-toc": "estargz-external-toc", "no-optimize": "estargz",
          "no-optimize-zstd": "zstdchunked"}


# --- running the CLI --------------------------------------------------------------------------

def cli(*args: str | Path, check: bool = True) -> Invoked:
    """The CLI in process (the tmux test below runs it on a terminal of its own)."""
    proc = invoke(*args)
    if check:
        assert proc.returncode == 0, _fmt(proc)
    return proc


def _fmt(proc: Invoked) -> str:
    return (f"{shlex.join(map(str, proc.args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")


def failed(proc: Invoked) -> str:
    """A failure: non-zero exit, no traceback, one error line, the last on stderr."""
    assert proc.returncode not in (0, None), f"expected a failure\n{_fmt(proc)}"
    assert "Traceback" not in proc.stderr, _fmt(proc)
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(ERROR), _fmt(proc)
    return lines[-1].removeprefix(ERROR)


# --- the images -------------------------------------------------------------------------------

@dataclass
class Conversion:
    name: str
    layout: Path
    tag: str
    report: dict  # optimize --json

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"

    def manifest(self) -> dict:
        ((_plat, _desc, manifest),) = f.platform_manifests(self.layout, self.tag)
        return manifest


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> tuple[Path, str, Path]:
    """(layout, manifest digest, record) of the source image, tagged ``t``."""
    base = tmp_path_factory.mktemp("lint-src")
    layout = base / "src"
    digest = f.write_layout(layout, "t", [f.simple_layer(LAYER0), f.simple_layer(LAYER1)])
    record = base / "record.jsonl"
    record.write_text("".join(
        json.dumps({"path": p, "manifestDigest": digest, "layerIndex": i}) + "\n"
        for p, i in RECORD))
    return layout, digest, record


@pytest.fixture(scope="module")
def convert(src, tmp_path_factory):
    """convert(name) -> Conversion: ``optimize --json -q`` once per name, into one layout."""
    layout, _digest, record = src
    out = tmp_path_factory.mktemp("lint-out") / "out"
    done: dict[str, Conversion] = {}

    def get(name: str) -> Conversion:
        if name not in done:
            args = [a.format(record=record) for a in CONVERSIONS[name]]
            proc = cli("optimize", "--json", "-q", *args, f"oci:{layout}:t", f"oci:{out}:{name}")
            done[name] = Conversion(name, out, name, json.loads(proc.stdout))
        return done[name]

    return get


def damaged_copy(conv: Conversion, tmp_path: Path) -> Conversion:
    """A copy of the conversion's layout, to damage."""
    copy = tmp_path / "damaged"
    shutil.copytree(conv.layout, copy)
    return Conversion(conv.name, copy, conv.tag, conv.report)


def repoint(conv: Conversion, i: int, *, blob: bytes | None = None,
            annotations: dict | None = None, diff_id: str | None = None) -> str:
    """Replace layer *i*'s blob, annotations or config DiffID; store every changed
    document under its new digest and re-tag. Returns the layer's (new) digest."""
    top = f.resolve_tag(conv.layout, conv.tag)
    manifest = f.read_json(conv.layout, top["digest"])
    layer = manifest["layers"][i]
    if blob is not None:
        layer["digest"], layer["size"] = f.put_blob(conv.layout, blob)
    if annotations is not None:
        layer["annotations"] = annotations
    if diff_id is not None:
        config = f.read_json(conv.layout, manifest["config"]["digest"])
        config["rootfs"]["diff_ids"][i] = diff_id
        manifest["config"]["digest"], manifest["config"]["size"] = f.put_json(
            conv.layout, config, sort_keys=True)
    desc = {k: v for k, v in top.items() if k != "annotations"}
    desc["digest"], desc["size"] = f.put_json(conv.layout, manifest)
    f.tag_descriptor(conv.layout, conv.tag, desc)
    return layer["digest"]


def drop_tag(layout: Path, tag: str) -> None:
    index = f.read_index_json(layout)
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get(f.REF_NAME) != tag]
    (layout / "index.json").write_text(json.dumps(index))


def layer_blob(conv: Conversion, i: int) -> bytes:
    return f.read_blob(conv.layout, conv.manifest()["layers"][i]["digest"])


def external_toc_blob(conv: Conversion, layer_digest: str) -> Path:
    """The TOC blob for *layer_digest* in the conversion's ``TAG-esgztoc`` image."""
    ((_p, _d, toc_manifest),) = f.platform_manifests(conv.layout, conv.tag + "-esgztoc")
    (toc,) = [x for x in toc_manifest["layers"]
              if x.get("annotations", {}).get(f.TOC_LAYER_DIGEST) == layer_digest]
    return f.blob_path(conv.layout, toc["digest"])


def read_toc(conv: Conversion, layer: dict) -> dict:
    extra: list[str | Path] = []
    if conv.name == "external-toc":
        extra = ["--toc", external_toc_blob(conv, layer["digest"])]
    proc = cli("layer", "toc", f.blob_path(conv.layout, layer["digest"]), *extra)
    return json.loads(proc.stdout)


def verify_json(ref: str, *pre: str) -> tuple[Invoked, dict]:
    proc = cli(*pre, "verify", "--json", ref, check=False)
    return proc, json.loads(proc.stdout)


# --- verify passes on what optimize makes --------------------------------------------------

@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_verify_passes_on_optimized_images(convert, name: str):
    conv = convert(name)
    proc = cli("verify", conv.ref)
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(HOST)]
    assert [(r[1], r[-1]) for r in rows] == [("0", "ok"), ("1", "ok")], proc.stdout
    assert "FAIL" not in proc.stdout, proc.stdout

    jproc, report = verify_json(conv.ref)
    assert jproc.returncode == 0, _fmt(jproc)
    assert report["ok"] is True and report["warnings"] == [], report
    manifest = conv.manifest()
    assert [x["digest"] for x in report["layers"]] == [x["digest"] for x in manifest["layers"]]
    for layer in report["layers"]:
        assert layer["ok"] and layer["errors"] == [], layer
        assert layer["format"] == FORMAT[name], layer
        assert layer["landmark"] == (PREFETCH_LANDMARK if name in WITH_RECORD
                                     else NO_PREFETCH_LANDMARK), layer


def test_verify_passes_on_containerd_image(containerd, src, tmp_path):
    """optimize oci: -> containerd, then ``-a SOCK verify NAME`` (and NAME's -esgztoc)."""
    layout, _digest, record = src
    # optimize refuses to create a namespace (3dd40c0); ctr import would have made it.
    if "default" not in containerd.ctr("namespaces", "ls", "-q").stdout.split():
        containerd.ctr("namespaces", "create", "default")
    for name, extra in (("example.com/lint/app:esgz", ()),
                        ("example.com/lint/app:ext", ("--estargz-external-toc",))):
        cli("-a", containerd.address, "optimize", "-q", "--oci", "--record-in", record, *extra,
            f"oci:{layout}:t", name)
        proc = cli("-a", containerd.address, "verify", name, check=False)
        assert proc.returncode == 0, _fmt(proc)
        jproc, report = verify_json(name, "-a", containerd.address)
        assert jproc.returncode == 0 and report["ok"], _fmt(jproc)
        assert [x["prioritized"] for x in report["layers"]] == [PRIORITIZED[0], PRIORITIZED[1]]


def test_verify_warns_about_min_chunk_size(src, tmp_path):
    """A min-chunk-size TOC (chunks sharing gzip members) lazy-pulls, so verify passes,
    but upstream's VerifyTOC rejects it: a warning per layer."""
    layout, _digest, _record = src
    ref = f"oci:{tmp_path}/mc:t"
    cli("optimize", "-q", "--oci", "--no-optimize", "--estargz-min-chunk-size", "65536",
        f"oci:{layout}:t", ref)
    proc = cli("verify", ref)
    assert re.search(r"^warning: .*layer 0: min-chunk-size TOC.*VerifyTOC", proc.stdout, re.M), \
        proc.stdout
    report = verify_json(ref)[1]
    assert report["ok"] and any("min-chunk-size" in w for w in report["warnings"]), report


def test_verify_fails_docker_media_types(tmp_path):
    """Kept Docker media types lose the annotations: every layer fails for the missing
    toc.digest, and the image gets the Docker warning (as optimize --json warned)."""
    layout = tmp_path / "dk"
    f.write_layout(layout, "t", [f.simple_layer(LAYER0)], docker_media_types=True)
    opt = json.loads(cli("optimize", "-q", "--json", "--no-optimize", f"oci:{layout}:t",
                         f"oci:{tmp_path}/dkout:t").stdout)
    assert any("Docker media types" in w for w in opt["warnings"]), opt
    conv = Conversion("docker", tmp_path / "dkout", "t", opt)
    digest = conv.manifest()["layers"][0]["digest"]
    proc = cli("verify", conv.ref, check=False)
    failed(proc)
    assert re.search(r"^warning: .*Docker media types.*--oci", proc.stdout, re.M), proc.stdout
    assert_names(conv, 0, digest, "missing annotation", f.TOC_DIGEST)


# --- verify fails, naming the layer and the problem -----------------------------------------

def assert_names(conv: Conversion, i: int, digest: str, *keywords: str,
                 pattern: str = "") -> None:
    """verify fails; the table has a FAIL line for layer *i* (*digest*) with every keyword
    (and a match for *pattern*), --json marks that layer, and only that layer, not ok with
    such an error."""

    def says(text: str) -> bool:
        return all(k.lower() in text.lower() for k in keywords) and bool(
            re.search(pattern, text, re.I))

    proc = cli("verify", conv.ref, check=False)
    failed(proc)
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL ")]
    mine = [line for line in fails if line.startswith(f"FAIL {HOST} layer {i} ({digest}): ")]
    assert mine, f"no FAIL line for layer {i} ({digest})\n{proc.stdout}"
    assert any(says(line) for line in mine), \
        f"no FAIL line for layer {i} says {keywords} {pattern}\n{proc.stdout}"
    assert len(mine) == len(fails), f"another layer failed too\n{proc.stdout}"

    jproc, report = verify_json(conv.ref)
    assert jproc.returncode != 0 and report["ok"] is False, _fmt(jproc)
    layer = report["layers"][i]
    assert (layer["index"], layer["digest"], layer["ok"]) == (i, digest, False), layer
    assert any(says(e) for e in layer["errors"]), layer
    assert all(x["ok"] for j, x in enumerate(report["layers"]) if j != i), report


@pytest.mark.parametrize("name", ["estargz", "zstdchunked"])
def test_flipped_byte_in_a_chunk(convert, tmp_path, name: str):
    """One byte in the middle of rand.bin's compressed chunk, found through the TOC."""
    conv = damaged_copy(convert(name), tmp_path)
    desc = conv.manifest()["layers"][1]
    entries = read_toc(conv, desc)["entries"]
    offsets = sorted({e["offset"] for e in entries if e.get("offset")})
    (start,) = [e["offset"] for e in entries if e["name"] == "srv/data/rand.bin"]
    end = offsets[offsets.index(start) + 1]
    blob = bytearray(layer_blob(conv, 1))
    blob[(start + end) // 2] ^= 0x01
    digest = repoint(conv, 1, blob=bytes(blob))
    # The chunk's sha256 differs, or the decompressor's own check (zstd's frame checksum,
    # a bad deflate code) trips first: either way the entry and its offset are named.
    assert_names(conv, 1, digest, "srv/data/rand.bin", f"offset {start}",
                 pattern=r"chunk digest|corrupt|checksum")


@pytest.mark.parametrize("name", ["estargz", "zstdchunked", "external-toc"])
def test_wrong_toc_digest_annotation(convert, tmp_path, name: str):
    conv = damaged_copy(convert(name), tmp_path)
    layer = conv.manifest()["layers"][0]
    wrong = "sha256:" + "0" * 64
    digest = repoint(conv, 0, annotations={**layer["annotations"], f.TOC_DIGEST: wrong})
    assert_names(conv, 0, digest, "TOC digest", wrong)


@pytest.mark.parametrize(("name", "annotation"), [
    ("estargz", f.TOC_DIGEST),
    ("estargz", f.UNCOMPRESSED_SIZE),
    ("zstdchunked", f.TOC_DIGEST),
    ("zstdchunked", f.ZSTD_MANIFEST_CHECKSUM),
    ("zstdchunked", f.ZSTD_MANIFEST_POSITION),
])
def test_missing_annotation(convert, tmp_path, name: str, annotation: str):
    conv = damaged_copy(convert(name), tmp_path)
    layer = conv.manifest()["layers"][1]
    assert annotation in layer["annotations"]
    kept = {k: v for k, v in layer["annotations"].items() if k != annotation}
    digest = repoint(conv, 1, annotations=kept)
    assert_names(conv, 1, digest, annotation)


def test_wrong_uncompressed_size(convert, tmp_path):
    conv = damaged_copy(convert("estargz"), tmp_path)
    layer = conv.manifest()["layers"][0]
    size = int(layer["annotations"][f.UNCOMPRESSED_SIZE])
    digest = repoint(conv, 0, annotations={**layer["annotations"],
                                           f.UNCOMPRESSED_SIZE: str(size + 512)})
    assert_names(conv, 0, digest, f.UNCOMPRESSED_SIZE, str(size + 512))


@pytest.mark.parametrize("name", ["estargz", "zstdchunked"])
def test_truncated_blob(convert, tmp_path, name: str):
    """The blob lost its tail (footer and TOC): the layer still says it is eStargz
    (toc.digest annotation), so verify must say the blob is damaged, not that the
    image was never converted."""
    conv = damaged_copy(convert(name), tmp_path)
    blob = layer_blob(conv, 1)
    digest = repoint(conv, 1, blob=blob[: len(blob) // 2])
    proc = cli("verify", conv.ref, check=False)
    failed(proc)
    line = next((x for x in proc.stdout.splitlines()
                 if x.startswith(f"FAIL {HOST} layer 1 ({digest}): ")), None)
    assert line is not None, proc.stdout
    assert re.search(r"footer|truncat", line, re.I), \
        f"the FAIL line does not say the blob is truncated (no footer):\n{proc.stdout}"
    assert "was the image converted" not in proc.stdout, proc.stdout


def test_never_converted_image(src):
    layout, _digest, _record = src
    ((_p, _d, manifest),) = f.platform_manifests(layout, "t")
    proc = cli("verify", f"oci:{layout}:t", check=False)
    failed(proc)
    for i, layer in enumerate(manifest["layers"]):
        assert f"FAIL {HOST} layer {i} ({layer['digest']}): not an eStargz" in proc.stdout, \
            proc.stdout
    assert "warning:" in proc.stdout and "not eStargz" in proc.stdout, proc.stdout
    jproc, report = verify_json(f"oci:{layout}:t")
    assert jproc.returncode != 0 and not report["ok"]
    assert [x["format"] for x in report["layers"]] == ["not eStargz"] * 2, report


def test_diff_id_mismatch(convert, tmp_path):
    conv = damaged_copy(convert("estargz"), tmp_path)
    wrong = "sha256:" + "1" * 64
    digest = repoint(conv, 1, diff_id=wrong)  # the layer itself is untouched
    assert digest == convert("estargz").manifest()["layers"][1]["digest"]
    assert_names(conv, 1, digest, "DiffID", "diff_ids[1]", wrong)


def test_external_toc_image_missing(convert, tmp_path):
    conv = damaged_copy(convert("external-toc"), tmp_path)
    drop_tag(conv.layout, conv.tag + "-esgztoc")
    proc = cli("verify", conv.ref, check=False)
    failed(proc)
    for i, layer in enumerate(conv.manifest()["layers"]):
        assert re.search(rf"^FAIL {HOST} layer {i} \({layer['digest']}\): .*external TOC.*"
                         r"-esgztoc\) is missing", proc.stdout, re.M), proc.stdout


def test_external_toc_image_of_another_image(convert, src, tmp_path):
    """TAG-esgztoc exists but holds the TOCs of another image: it does not match."""
    conv = damaged_copy(convert("external-toc"), tmp_path)
    layout, _digest, _record = src
    cli("optimize", "-q", "--oci", "--estargz-external-toc", "--no-optimize",
        f"oci:{layout}:t", f"oci:{conv.layout}:other")
    other = {k: v for k, v in f.resolve_tag(conv.layout, "other-esgztoc").items()
             if k != "annotations"}
    f.tag_descriptor(conv.layout, conv.tag + "-esgztoc", other)
    proc = cli("verify", conv.ref, check=False)
    failed(proc)
    for i, layer in enumerate(conv.manifest()["layers"]):
        assert re.search(rf"^FAIL {HOST} layer {i} \({layer['digest']}\): .*external TOC",
                         proc.stdout, re.M), proc.stdout
    assert "was the image converted" not in proc.stdout, proc.stdout


# --- inspect and optimize --json ----------------------------------------------------------------

@pytest.mark.parametrize("name", [*WITH_RECORD, "no-optimize"])
def test_prefetch_bytes_are_the_landmark_offset(convert, name: str):
    conv = convert(name)
    report = json.loads(cli("inspect", "--json", conv.ref).stdout)
    layers = conv.manifest()["layers"]
    assert [x["digest"] for x in report["layers"]] == [x["digest"] for x in layers]
    for i, (desc, got, opt) in enumerate(zip(layers, report["layers"], conv.report["layers"],
                                             strict=True)):
        entries = read_toc(conv, desc)["entries"]
        if name == "no-optimize":
            assert any(e["name"] == NO_PREFETCH_LANDMARK for e in entries)
            want = 0
        else:
            (landmark,) = [e for e in entries if e["name"] == PREFETCH_LANDMARK]
            want = landmark["offset"]
            assert want > 0
        assert got["prefetchBytes"] == want, (i, got)
        assert opt["prefetchBytes"] == want, (i, opt)
        assert got["prefetchShare"] == round(want / desc["size"], 4), got


@pytest.mark.parametrize("name", WITH_RECORD)
def test_inspect_lists_prioritized_files(convert, name: str):
    conv = convert(name)
    report = json.loads(cli("inspect", "--json", conv.ref).stdout)
    assert [x["prioritized"] for x in report["layers"]] == [PRIORITIZED[0], PRIORITIZED[1]]

    out = cli("inspect", "--files", conv.ref).stdout
    for i, paths in PRIORITIZED.items():
        head = f"prioritized files of {HOST} layer {i}:"
        assert head in out, out
        listed = out.split(head, 1)[1].splitlines()[1:]
        listed = [x.strip() for x in listed[: next((j for j, x in enumerate(listed)
                                                    if not x.startswith("  ")), len(listed))]]
        assert listed == paths, out
    assert "unused.conf" not in out and "rand.bin" not in out, out
    # Without --files the table shows counts, not paths.
    plain = cli("inspect", conv.ref).stdout
    assert "prioritized files of" not in plain and "bin/tool" not in plain, plain


def test_inspect_json_of_no_optimize_prioritizes_nothing(convert):
    report = json.loads(cli("inspect", "--json", convert("no-optimize").ref).stdout)
    assert all(x["prioritized"] == [] and x["prefetchBytes"] == 0 for x in report["layers"])


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_optimize_json_report(convert, src, name: str):
    conv = convert(name)
    layout, src_digest, _record = src
    rep = conv.report
    assert set(rep) == {"source", "target", "layers", "extraImage", "warnings", "workload",
                        "profile", "signatures"}, rep
    assert rep["workload"] is None  # --record-in: no workload ran
    assert rep["signatures"]["found"] is False  # an unsigned layout
    if name.startswith("no-optimize"):
        assert rep["profile"] is None
        assert all("profileFiles" not in x for x in rep["layers"]), rep["layers"]
    else:  # the record was made for this image: every file found, in its layer
        profile = rep["profile"]
        assert profile["matched"] == profile["files"] > 0 and profile["missing"] == 0, profile
        assert [x["profileFiles"] for x in rep["layers"]] == \
            [x["prioritizedFiles"] for x in rep["layers"]]
        assert {x["profileMissing"] for x in rep["layers"]} == {0}
    assert rep["source"] == src_digest
    assert rep["target"] == f.resolve_tag(conv.layout, conv.tag)["digest"]
    manifest = conv.manifest()
    config = f.read_json(conv.layout, manifest["config"]["digest"])
    ((_p, _d, src_manifest),) = f.platform_manifests(layout, "t")
    assert [x["target"] for x in rep["layers"]] == [
        {k: x[k] for k in ("digest", "size", "mediaType")} for x in manifest["layers"]]
    assert [x["source"] for x in rep["layers"]] == [
        {k: x[k] for k in ("digest", "size", "mediaType")} for x in src_manifest["layers"]]
    assert [x["diffID"] for x in rep["layers"]] == config["rootfs"]["diff_ids"]
    for x in rep["layers"]:
        assert x["platform"] == HOST and x["seconds"] >= 0, x
    assert {x["format"] for x in rep["layers"]} == {FORMAT[name]}
    if name == "external-toc":
        assert rep["extraImage"] == f"oci:{conv.layout}:{conv.tag}-esgztoc"
        f.resolve_tag(conv.layout, conv.tag + "-esgztoc")
    else:
        assert rep["extraImage"] is None
    assert rep["warnings"] == []


@pytest.mark.parametrize("name", [*WITH_RECORD, "no-optimize"])
def test_optimize_json_counts_prioritized_files_as_inspect(convert, name: str):
    """optimize's prioritizedFiles per layer is the number of files the record put first,
    the same number inspect lists (the parent directories moved along are not files)."""
    conv = convert(name)
    report = json.loads(cli("inspect", "--json", conv.ref).stdout)
    got = [x["prioritizedFiles"] for x in conv.report["layers"]]
    want = [len(x["prioritized"]) for x in report["layers"]]
    assert got == want, f"optimize --json prioritizedFiles {got}, inspect lists {want}"


# --- progress and logs ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A layout tagged ``t``: one uncompressed layer with 32 MiB of random bytes, so a
    conversion lasts long enough for the live line to be drawn."""
    layout = f.init_layout(tmp_path_factory.mktemp("lint-big") / "big")
    raw = f.simple_layer({"r/": None, "r/random.bin": os.urandom(32 << 20)})
    layer = f.descriptor(f.OCI_LAYER_TAR, *f.put_blob(layout, raw))
    plat = f.platform_dict(f.HOST_PLATFORM)
    config = {**plat, "config": {}, "rootfs": {"type": "layers",
                                                 "diff_ids": [f.sha256_digest(raw)]}}
    cdesc = f.descriptor(f.OCI_CONFIG, *f.put_json(layout, config, sort_keys=True))
    manifest = {"schemaVersion": 2, "mediaType": f.OCI_MANIFEST, "config": cdesc,
                "layers": [layer]}
    mdesc = f.descriptor(f.OCI_MANIFEST, *f.put_json(layout, manifest), platform=plat)
    f.tag_descriptor(layout, "t", mdesc)
    return layout


def test_progress_on_a_terminal_leaves_stdout_clean(big, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    out, done = tmp_path / "out.txt", tmp_path / "done"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in cli_env().items()
                   if k in ("PYTHONPATH", "PATH", "HOME"))
    cmd = (f"env {env} {shlex.quote(sys.executable)} -m estargz_opt optimize --oci "
           f"--no-optimize oci:{big}:t oci:{tmp_path / 'dst'}:t > {out}; "
           f"echo EXIT=$? >> {done}; sleep 120")
    # A private server on a short socket path of our own (unix sockets max 107 bytes).
    sock_dir = Path(tempfile.mkdtemp(prefix="estargz-opt-tmux-"))
    tmux = ["tmux", "-S", str(sock_dir / "s"), "-f", "/dev/null"]
    subprocess.run([*tmux, "new-session", "-d", "-s", "t", "-x", "200", "-y", "50", cmd],
                   check=True, env={**os.environ, "TERM": "xterm"})
    panes: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            panes.append(subprocess.run([*tmux, "capture-pane", "-p", "-t", "t"],
                                        capture_output=True, text=True).stdout)
            time.sleep(0.05)
        assert done.exists(), "optimize did not finish within 60 s:\n" + (panes or [""])[-1]
        time.sleep(0.1)
        final = subprocess.run([*tmux, "capture-pane", "-p", "-t", "t"],
                               capture_output=True, text=True, check=True).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert done.read_text().strip() == "EXIT=0", final
    digest = f.resolve_tag(tmp_path / "dst", "t")["digest"]
    assert out.read_text() == digest + "\n"
    # The live line: 12 hex digits of the layer digest, share, sizes in/out and a rate.
    size = r"[\d.]+ (?:B|KiB|MiB|GiB)"
    live = re.compile(rf"^[0-9a-f]{{12}} \d+% {size} in, {size} out, {size}/s")
    drawn = [line for pane in panes for line in pane.splitlines() if live.match(line)]
    assert drawn, "no live progress line was ever on the terminal:\n" + "\n---\n".join(
        panes[-3:])
    # Once done, the live line is gone: every line left is a whole log line.
    left = [line for line in final.splitlines() if line.strip()]
    assert left and all(line.startswith("estargz-opt: ") for line in left), final
    assert any("done:" in line and "of tar in" in line for line in left), final


def test_progress_without_a_terminal_is_log_lines(src, tmp_path):
    layout, _digest, _record = src
    ((_p, _d, manifest),) = f.platform_manifests(layout, "t")
    proc = cli("optimize", "--oci", "--no-optimize", f"oci:{layout}:t", f"oci:{tmp_path}/o:t")
    assert DIGEST_LINE.fullmatch(proc.stdout.strip()) and proc.stdout.count("\n") == 1, \
        proc.stdout
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr, repr(proc.stderr)
    for layer in manifest["layers"]:
        assert f"estargz-opt: INFO: converting layer {layer['digest']}" in proc.stderr, \
            proc.stderr
        assert re.search(rf"layer {layer['digest']} done: [\d.]+ (B|KiB|MiB) of tar in, ",
                         proc.stderr), proc.stderr

    quiet = cli("optimize", "-q", "--oci", "--no-optimize", f"oci:{layout}:t",
                f"oci:{tmp_path}/q:t")
    assert quiet.stdout == proc.stdout
    assert "converting layer" not in quiet.stderr and "sha256:" not in quiet.stderr, \
        quiet.stderr
    jq = cli("optimize", "--quiet", "--json", "--oci", "--no-optimize", f"oci:{layout}:t",
             f"oci:{tmp_path}/j:t")
    assert json.loads(jq.stdout)["target"] == proc.stdout.strip()
    assert "converting layer" not in jq.stderr, jq.stderr


def _json_lines(stderr: str) -> list[dict]:
    out = []
    for line in stderr.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            pytest.fail(f"stderr line is not JSON: {line!r}\nstderr:\n{stderr}")
        assert isinstance(doc, dict), line
        out.append(doc)
    return out


def test_json_logs(src, tmp_path):
    layout, _digest, _record = src
    ((_p, _d, manifest),) = f.platform_manifests(layout, "t")
    proc = cli("--log-format", "json", "optimize", "--oci", "--no-optimize",
               f"oci:{layout}:t", f"oci:{tmp_path}/o:t")
    assert DIGEST_LINE.fullmatch(proc.stdout.strip()), proc.stdout
    docs = _json_lines(proc.stderr)
    assert all(d.get("levelname") and d.get("message") for d in docs), docs
    layer_docs = [d for d in docs if "layer sha256:" in d["message"]]
    assert {d["layer"] for d in layer_docs} == {x["digest"] for x in manifest["layers"]}, docs
    for d in layer_docs:  # every line about a layer carries its digest
        assert d["layer"] in d["message"], d

    warn = cli("--log-format", "json", "--log-level", "warning", "optimize", "--oci",
               "--no-optimize", f"oci:{layout}:t", f"oci:{tmp_path}/w:t")
    assert warn.stderr == "", warn.stderr


def test_json_logs_on_failure(src):
    """A CI reading --log-format json stderr must be able to parse a failed run too."""
    layout, _digest, _record = src
    proc = cli("--log-format", "json", "verify", f"oci:{layout}:t", check=False)
    assert proc.returncode != 0
    docs = _json_lines(proc.stderr)
    assert any(d.get("levelname") == "ERROR" for d in docs), docs


def test_analysis_countdown_and_workload_output_share_the_terminal():
    """The countdown is one live line; workload output clears it first, and the end of
    the run clears it for good."""
    import io

    from estargz_opt.cli.progress import Progress

    class Tty(io.TextIOWrapper):
        def isatty(self) -> bool:
            return True

    raw = io.BytesIO()
    stream = Tty(raw, encoding="utf-8", write_through=True)
    p = Progress(stream)
    p.sampling(3.0, 2)
    p.workload_output().write(b"hello from the workload\n")
    p.sampling(2.0, 5)
    p.sampling(0.0, 5)
    text = raw.getvalue().decode()
    assert text == ("\r\x1b[Kanalyzing the workload: 3s left, 2 file accesses seen"
                    "\r\x1b[Khello from the workload\n"
                    "\r\x1b[Kanalyzing the workload: 2s left, 5 file accesses seen"
                    "\r\x1b[K")
    forever = Progress(stream)
    forever.sampling(None, 1)
    assert raw.getvalue().decode().endswith("until it exits or Ctrl-C, 1 file accesses seen")
