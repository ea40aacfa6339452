"""``estargz-opt optimize`` on OCI image layouts, with no containerd anywhere.

Every conversion runs through :class:`NoDaemon`: PATH holds no
containerd/ctr binaries, CONTAINERD_* variables are dropped, and (as root,
where ``unshare`` works) the run is in a private mount namespace with an empty
tmpfs over /run and /dev/null bound over every containerd binary, so no
daemon socket or client is reachable. The outputs are then checked by
independent tools outside that sandbox:

* ``skopeo copy`` (checks every blob digest and size),
* ``umoci unpack`` (checks every layer's DiffID against the config),
* ``ctr images import`` + ``ctr run --rm`` in the private containerd
  (containerd checks DiffIDs too; the container must print what the source
  image prints),
* ``estargz-opt layer verify --toc-digest <annotation> [--toc TOCBLOB]`` per layer,
* our own DiffID / uncompressed-size arithmetic on the layer bytes.

Bad input must give exactly one ``estargz-opt: error:`` line, a non-zero exit
and leave DST as it was (index.json byte-identical, existing files unchanged,
no ``*.tmp`` left).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from support import imagefactory as f
from support.cli import cli_argv
from support.nodaemon import NoDaemon

pytestmark = pytest.mark.root

# --- the images ------------------------------------------------------------------------------

HOST = f.platform_str(f.HOST_PLATFORM)
OTHER_ARCH = "arm64" if f.HOST_PLATFORM[1] != "arm64" else "amd64"
OTHER = f"linux/{OTHER_ARCH}"

APP_FILES = {
    "srv/": None,
    "srv/data/": None,
    "srv/data/a.txt": b"aaa\n",
    "srv/data/b.txt": b"bee\n",
    "etc/": None,
    "etc/app.conf": b"conf=1\n",
}
# Prints from both layers, so a run proves the whole rootfs is there.
CMD = ["/bin/busybox", "sh", "-c",
       f"echo {f.BUSYBOX_HELLO}; /bin/busybox cat /srv/data/b.txt /etc/app.conf"]
EXPECTED_RUN_OUTPUT = f"{f.BUSYBOX_HELLO}\nbee\nconf=1\n"
OTHER_FILES = {"other/": None, "other/arch.txt": OTHER_ARCH.encode()}

# Record (ctr-remote --record-out form): layer 1 gets two paths, in this
# order, layer 0 one. Expected TOC heads follow (parents moved along).
RECORD_PATHS = (("srv/data/b.txt", 1), ("bin/busybox", 0), ("etc/app.conf", 1))
EXPECTED_HEADS = {
    0: ["bin", "bin/busybox", ".prefetch.landmark"],
    1: ["srv", "srv/data", "srv/data/b.txt", "etc", "etc/app.conf", ".prefetch.landmark"],
}
PREFETCH_LIST = "# prefetch list for the app layer\n\nsrv/**/b.*\n  etc/app.conf  \n"
EXPECTED_PREFETCH_HEAD_L1 = EXPECTED_HEADS[1]

ERROR_PREFIX = "estargz-opt: error:"


# --- running the CLI without any containerd -----------------------------------------------


def _fmt(proc: subprocess.CompletedProcess) -> str:
    return (f"{' '.join(map(str, proc.args))}\nexit {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, _fmt(proc)
    assert "Traceback" not in proc.stderr, _fmt(proc)
    return proc


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stdout.strip().splitlines()
    assert lines, _fmt(proc)
    return lines[-1]


@pytest.fixture(scope="module")
def nodaemon(tmp_path_factory: pytest.TempPathFactory) -> NoDaemon:
    return NoDaemon(tmp_path_factory.mktemp("nodaemon"))


# --- source images and conversions ---------------------------------------------------------

@dataclass
class Source:
    layout: Path
    manifest: str  # tag t: host manifest digest
    docker_manifest: str  # tag dk
    multi: str  # tag multi: index digest (host + other)
    extras: str  # tag extras: host + other + attestation + artifact


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory, busybox_layer: Path) -> Source:
    layout = tmp_path_factory.mktemp("src") / "layout"
    bb = busybox_layer.read_bytes()
    app = f.simple_layer(APP_FILES)
    other = f.simple_layer(OTHER_FILES)
    cfg = f.busybox_config(CMD)
    manifest = f.write_layout(layout, "t", [bb, app], cfg)
    docker = f.write_layout(layout, "dk", [bb, app], cfg, docker_media_types=True)
    multi = f.write_index(layout, "multi", [(f.HOST_PLATFORM, [bb, app]),
                                            (OTHER, [other, app])], cfg)
    extras = f.write_index(layout, "extras", [(f.HOST_PLATFORM, [bb, app]),
                                              (OTHER, [other])], cfg,
                           attestation=True, artifact=True)
    return Source(layout, manifest, docker, multi, extras)


def write_record(path: Path, manifest: str, entries=RECORD_PATHS) -> Path:
    path.write_text("".join(
        json.dumps({"path": p, "manifestDigest": manifest, "layerIndex": i},
                   separators=(",", ":")) + "\n" for p, i in entries))
    return path


@dataclass
class Conversion:
    name: str
    layout: Path
    tag: str
    proc: subprocess.CompletedProcess
    args: tuple[str, ...]

    @property
    def digest(self) -> str:
        return last_line(self.proc)

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


CONVERSIONS = {
    "no-optimize": ("t", ("--oci", "--no-optimize")),
    "record-in": ("t", ("--oci", "--record-in", "{record}")),
    "prefetch-list": ("t", ("--oci", "--prefetch-list", "{prefetch}")),
    "zstdchunked": ("t", ("--oci", "--zstdchunked", "--record-in", "{record}")),
    "external-toc": ("t", ("--oci", "--estargz-external-toc", "--record-in", "{record}")),
    "chunk-4k": ("t", ("--oci", "--no-optimize", "--estargz-chunk-size", "4096",
                       "--estargz-compression-level", "1")),
    "all-platforms": ("multi", ("--oci", "--no-optimize", "--all-platforms")),
    "other-platform": ("multi", ("--oci", "--no-optimize", "--platform", OTHER)),
    "default-platform": ("multi", ("--oci", "--no-optimize")),
    "extras-all": ("extras", ("--oci", "--no-optimize", "--all-platforms")),
    "docker-keep": ("dk", ("--no-optimize",)),
    "docker-oci": ("dk", ("--oci", "--no-optimize")),
}


@pytest.fixture(scope="module")
def convert(src: Source, nodaemon: NoDaemon, tmp_path_factory: pytest.TempPathFactory):
    """convert(name) -> Conversion; each named conversion runs once per module."""
    base = tmp_path_factory.mktemp("conv")
    record = write_record(base / "record.jsonl", src.manifest)
    prefetch = base / "prefetch.txt"
    prefetch.write_text(PREFETCH_LIST)
    done: dict[str, Conversion] = {}

    def get(name: str) -> Conversion:
        if name not in done:
            src_tag, args = CONVERSIONS[name]
            args = tuple(a.format(record=record, prefetch=prefetch) for a in args)
            out = base / name
            tag = f"{name}-out"
            proc = nodaemon.optimize(*args, f"oci:{src.layout}:{src_tag}", f"oci:{out}:{tag}")
            ok(proc)
            done[name] = Conversion(name, out, tag, proc, args)
        return done[name]

    return get


# --- checks ---------------------------------------------------------------------------------------

def cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli_argv(*args),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    if check:
        assert proc.returncode == 0, _fmt(proc)
    return proc


def decompress(blob: bytes) -> bytes:
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        reader = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)
        return reader.read()
    return gzip.decompress(blob)


def toc_names(blob: Path, toc: Path | None = None) -> list[str]:
    args = ["layer", "toc", blob] + (["--toc", toc] if toc else [])
    doc = json.loads(cli(*args).stdout)
    names = []
    for e in doc["entries"]:
        if e.get("type") == "chunk":
            continue
        name = e["name"].removeprefix("./").rstrip("/")
        names.append(name)
    return names


def external_tocs(conv: Conversion) -> dict[str, Path]:
    """layer digest -> TOC blob path, from DST's ``<TAG>-esgztoc`` image."""
    entries = f.platform_manifests(conv.layout, f"{conv.tag}-esgztoc")
    assert len(entries) == 1, entries
    out = {}
    for layer in entries[0][2]["layers"]:
        assert layer["mediaType"] == f.OCI_LAYER_GZIP, layer
        ann = layer.get("annotations", {})
        assert f.TOC_LAYER_DIGEST in ann, layer
        out[ann[f.TOC_LAYER_DIGEST]] = f.blob_path(conv.layout, layer["digest"])
    return out


def check_converted_image(conv: Conversion, platforms: list[str], zstd: bool = False,
                          unconverted: tuple[str, ...] = ()) -> None:
    """Tag resolves to the printed digest; the image manifests behind it are
    for *platforms*, in order; every layer of those not in *unconverted* is
    converted, annotated and verified, and config DiffIDs match the layer
    bytes; every referenced blob is present and sound; no temp files."""
    top = f.resolve_tag(conv.layout, conv.tag)
    assert top["digest"] == conv.digest, f"printed {conv.digest}, tag points at {top}"
    assert f.tmp_files(conv.layout) == []
    for digest in f.referenced_digests(conv.layout, conv.tag):
        path = f.blob_path(conv.layout, digest)
        assert path.exists(), f"{digest} referenced but missing from {conv.layout}"
        assert f.sha256_digest(path.read_bytes()) == digest, f"{path} bytes != its digest"
    found = f.platform_manifests(conv.layout, conv.tag)
    assert [f.platform_str(p) for p, _d, _m in found] == platforms, found
    tocs = external_tocs(conv) if "--estargz-external-toc" in conv.args else {}
    for plat, mdesc, manifest in found:
        if f.platform_str(plat) in unconverted:
            continue
        assert mdesc["mediaType"] == f.OCI_MANIFEST and manifest["mediaType"] == f.OCI_MANIFEST
        config = f.read_json(conv.layout, manifest["config"]["digest"])
        assert manifest["config"]["mediaType"] == f.OCI_CONFIG
        diff_ids = config["rootfs"]["diff_ids"]
        assert len(diff_ids) == len(manifest["layers"])
        for i, layer in enumerate(manifest["layers"]):
            want_type = f.OCI_LAYER_ZSTD if zstd else f.OCI_LAYER_GZIP
            assert layer["mediaType"] == want_type, layer
            ann = layer.get("annotations", {})
            assert f.TOC_DIGEST in ann and f.UNCOMPRESSED_SIZE in ann, layer
            if zstd:
                assert f.ZSTD_MANIFEST_CHECKSUM in ann and f.ZSTD_MANIFEST_POSITION in ann, layer
            blob = f.blob_path(conv.layout, layer["digest"])
            raw = decompress(blob.read_bytes())
            assert f.sha256_digest(raw) == diff_ids[i], (
                f"layer {i} {layer['digest']}: config diff_id {diff_ids[i]}, "
                f"decompressed bytes hash to {f.sha256_digest(raw)}")
            assert int(ann[f.UNCOMPRESSED_SIZE]) == len(raw), layer
            verify = ["layer", "verify", blob, "--toc-digest", ann[f.TOC_DIGEST]]
            if tocs:
                assert layer["digest"] in tocs, f"no TOC blob for {layer['digest']}: {tocs}"
                verify += ["--toc", tocs[layer["digest"]]]
            cli(*verify)


def run_tool(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    if shutil.which(str(argv[0])) is None:
        pytest.skip(f"{argv[0]} is not installed (scripts/install-deps.sh installs it)")
    proc = subprocess.run(list(map(str, argv)), capture_output=True, text=True, cwd=cwd,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, _fmt(proc)
    return proc


# --- sandbox sanity ------------------------------------------------------------------------

def test_sandbox_reaches_no_containerd(nodaemon: NoDaemon):
    probe = nodaemon.run(["/bin/sh", "-c",
                          "command -v ctr containerd ctr-remote; "
                          "echo run=$(find /run /var/run/ -type s; ls -d /run/containerd)"])
    lines = probe.stdout.strip().splitlines()
    assert lines[:-1] == [], f"containerd binaries still on PATH: {lines[:-1]}"
    if nodaemon.namespaced:
        # util-linux's mount keeps /run/mount/utab in the fresh tmpfs: only that.
        assert lines[-1] == "run=", f"sockets or containerd state in /run: {lines[-1]}"
        for binary in nodaemon.hidden:
            res = nodaemon.run([binary, "--version"])
            assert res.returncode != 0, f"{binary} still runs in the sandbox"
    else:
        print("NOTE: not root or no unshare(1): only PATH is stripped", file=sys.stderr)


# --- single-platform conversions -----------------------------------------------------------

BASIC = ["no-optimize", "record-in", "prefetch-list", "zstdchunked", "external-toc"]


@pytest.mark.parametrize("name", [*BASIC, "chunk-4k"])
def test_converted_image_is_valid(convert, name: str):
    conv = convert(name)
    check_converted_image(conv, [HOST], zstd=name == "zstdchunked")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", conv.digest), conv.proc.stdout
    assert HOST in conv.proc.stderr, f"platform selection not stated:\n{conv.proc.stderr}"


@pytest.mark.parametrize("name", BASIC)
def test_skopeo_copies_output(convert, name: str, tmp_path: Path):
    conv = convert(name)
    run_tool("skopeo", "copy", conv.ref, f"oci:{tmp_path / 'copy'}:{conv.tag}")
    copied = f.platform_manifests(tmp_path / "copy", conv.tag)
    assert [m["digest"] for _p, m, _d in copied] == [
        m["digest"] for _p, m, _d in f.platform_manifests(conv.layout, conv.tag)]


def test_skopeo_copies_all_platforms(convert, tmp_path: Path):
    conv = convert("all-platforms")
    run_tool("skopeo", "copy", "--all", conv.ref, f"oci:{tmp_path / 'copy'}:{conv.tag}")
    assert f.resolve_tag(tmp_path / "copy", conv.tag)["digest"] == conv.digest


@pytest.mark.parametrize("name", [n for n in BASIC if n != "zstdchunked"])
def test_umoci_unpacks_output(convert, name: str, tmp_path: Path):
    # umoci 0.4.7 (bookworm) refuses tar+zstd layers, so zstd:chunked is left
    # to skopeo, containerd and our own DiffID check.
    conv = convert(name)
    run_tool("umoci", "unpack", "--image", f"{conv.layout}:{conv.tag}", tmp_path / "bundle")
    rootfs = tmp_path / "bundle" / "rootfs"
    assert (rootfs / "srv/data/b.txt").read_bytes() == b"bee\n"
    assert (rootfs / "bin/busybox").is_file()


def _ctr_run(containerd, layout: Path, tag: str, name: str, tmp: Path) -> str:
    image = f"docker.io/estargz-opt-test/optimize-{name}:latest"
    archive = f.archive_for_ctr(layout, tag, image, tmp / f"{name}.tar")
    containerd.ctr("images", "import", str(archive))
    cid = f"esgzopt-{name}-{os.getpid()}"
    try:
        return containerd.ctr("run", "--rm", image, cid).stdout
    finally:
        subprocess.run(["ctr", "-a", containerd.address, "-n", "default", "images", "rm",
                        image], capture_output=True)


@pytest.fixture(scope="module")
def source_run_output(containerd, src: Source, tmp_path_factory) -> str:
    out = _ctr_run(containerd, src.layout, "t", "source", tmp_path_factory.mktemp("run"))
    assert out == EXPECTED_RUN_OUTPUT
    return out


@pytest.mark.parametrize("name", [*BASIC, "docker-keep", "docker-oci"])
def test_ctr_runs_output(containerd, convert, name: str, source_run_output: str,
                         tmp_path: Path):
    conv = convert(name)
    assert _ctr_run(containerd, conv.layout, conv.tag, name, tmp_path) == source_run_output


# --- prioritization -------------------------------------------------------------------------

def _layer_blobs(conv: Conversion) -> list[Path]:
    (_p, _d, manifest), = f.platform_manifests(conv.layout, conv.tag)
    return [f.blob_path(conv.layout, layer["digest"]) for layer in manifest["layers"]]


@pytest.mark.parametrize("name", ["record-in", "zstdchunked", "external-toc"])
def test_record_in_orders_toc(convert, name: str):
    conv = convert(name)
    tocs = external_tocs(conv) if name == "external-toc" else {}
    for i, blob in enumerate(_layer_blobs(conv)):
        names = toc_names(blob, tocs.get("sha256:" + blob.name))
        want = EXPECTED_HEADS[i]
        assert names[:len(want)] == want, f"layer {i}: TOC starts {names[:len(want) + 2]}"
        assert ".no.prefetch.landmark" not in names


def test_prefetch_list_orders_toc(convert):
    blobs = _layer_blobs(convert("prefetch-list"))
    names1 = toc_names(blobs[1])
    assert names1[:len(EXPECTED_PREFETCH_HEAD_L1)] == EXPECTED_PREFETCH_HEAD_L1, names1
    # Nothing listed for the busybox layer: it is not prioritized.
    names0 = toc_names(blobs[0])
    assert ".prefetch.landmark" not in names0, names0[:5]
    assert ".no.prefetch.landmark" in names0


def test_no_optimize_prioritizes_nothing(convert):
    for blob in _layer_blobs(convert("no-optimize")):
        names = toc_names(blob)
        assert names[0] == ".no.prefetch.landmark", names[:5]


def test_chunk_size_option_applies(convert):
    blob = _layer_blobs(convert("chunk-4k"))[0]
    doc = json.loads(cli("layer", "toc", blob).stdout)
    busybox = [e for e in doc["entries"] if e["name"].removeprefix("./") == "bin/busybox"]
    chunks = [e for e in doc["entries"] if e.get("type") == "chunk"]
    assert busybox and busybox[0]["size"] > 8192
    assert busybox[0].get("chunkSize") == 4096, busybox[0]
    assert len(chunks) >= busybox[0]["size"] // 4096 - 1


# --- external TOC -----------------------------------------------------------------------------

def test_external_toc_prints_extra_image(convert):
    conv = convert("external-toc")
    lines = conv.proc.stdout.strip().splitlines()
    extra = [ln for ln in lines if ln.startswith("extra image:")]
    assert len(extra) == 1, conv.proc.stdout
    m = re.fullmatch(r"extra image: oci:(.+):([^:]+)", extra[0])
    assert m, extra
    assert Path(m[1]).resolve() == conv.layout.resolve() and m[2] == f"{conv.tag}-esgztoc"
    assert lines[-1] == conv.digest and lines[-1] != extra[0]
    tocs = external_tocs(conv)
    layers = _layer_blobs(conv)
    assert sorted(tocs) == sorted("sha256:" + b.name for b in layers)
    # Each TOC blob is the TOC of exactly its layer: verify passes with it
    # (done in test_converted_image_is_valid); with another layer's TOC it fails.
    a, b = layers
    wrong = cli("layer", "verify", a, "--toc", tocs["sha256:" + b.name], check=False)
    assert wrong.returncode != 0, _fmt(wrong)


# --- platforms ------------------------------------------------------------------------------

def test_all_platforms_converts_both(convert, src: Source):
    conv = convert("all-platforms")
    check_converted_image(conv, [HOST, OTHER])
    err = conv.proc.stderr
    assert "all" in err.lower() or (HOST in err and OTHER in err), err
    top = f.read_json(conv.layout, conv.digest)
    assert top["mediaType"] == f.OCI_INDEX and len(top["manifests"]) == 2


def test_json_report_lists_layers_in_manifest_order(src: Source, tmp_path: Path):
    """Per platform, in index order, each manifest's layers in order: the big busybox
    layer first, although the small app layer beside it finishes converting sooner."""
    out = tmp_path / "out"
    proc = cli("optimize", "--oci", "--no-optimize", "--all-platforms", "--json", "-q",
               f"oci:{src.layout}:multi", f"oci:{out}:j")
    report = json.loads(proc.stdout)
    want = [layer["digest"] for _, _, m in f.platform_manifests(src.layout, "multi")
            for layer in m["layers"]]
    assert [x["source"]["digest"] for x in report["layers"]] == want
    assert [x["platform"] for x in report["layers"]] == [HOST, HOST, OTHER, OTHER]


def test_platform_flag_selects_one(convert):
    conv = convert("other-platform")
    check_converted_image(conv, [OTHER])
    top = f.read_json(conv.layout, conv.digest)
    assert f.is_index(top), top
    assert [f.platform_str(m["platform"]) for m in top["manifests"]] == [OTHER], top
    assert OTHER in conv.proc.stderr, conv.proc.stderr


def test_default_is_host_platform_only(convert):
    conv = convert("default-platform")
    check_converted_image(conv, [HOST])
    assert HOST in conv.proc.stderr, conv.proc.stderr


def test_unknown_media_types_pass_through(convert, src: Source):
    conv = convert("extras-all")
    check_converted_image(conv, [HOST, OTHER, "unknown/unknown"],
                          unconverted=("unknown/unknown",))
    src_index = f.read_json(src.layout, src.extras)
    out_index = f.read_json(conv.layout, conv.digest)
    assert len(out_index["manifests"]) == len(src_index["manifests"]) == 4

    def pick(index: dict, attestation: bool) -> dict:
        if attestation:
            found = [m for m in index["manifests"]
                     if m.get("annotations", {}).get(f.REFERENCE_TYPE) == "attestation-manifest"]
        else:
            found = [m for m in index["manifests"]
                     if m["mediaType"] == f.UNKNOWN_ARTIFACT_MANIFEST]
        assert len(found) == 1, index
        return found[0]

    src_att, out_att = pick(src_index, True), pick(out_index, True)
    src_art, out_art = pick(src_index, False), pick(out_index, False)
    # Attestation manifest (in-toto layer, not a layer type): same bytes.
    assert out_att == src_att, (src_att, out_att)
    att = f.read_json(conv.layout, out_att["digest"])
    assert att["layers"][0]["mediaType"] == f.IN_TOTO_LAYER
    in_toto = f.blob_path(conv.layout, att["layers"][0]["digest"])
    assert in_toto.exists() and in_toto.read_bytes() == f.read_blob(
        src.layout, att["layers"][0]["digest"])
    # Manifest of an unknown media type: kept as it was, blob present in DST.
    assert out_art == src_art, (src_art, out_art)
    assert f.blob_path(conv.layout, out_art["digest"]).read_bytes() == f.read_blob(
        src.layout, src_art["digest"])


def test_index_keeps_manifest_order(convert, src: Source):
    """Upstream keeps the index's manifest order (spec §5.1); so must we."""
    conv = convert("extras-all")
    src_index = f.read_json(src.layout, src.extras)
    out_index = f.read_json(conv.layout, conv.digest)

    def kinds(index: dict) -> list[str]:
        return [f.platform_str(m["platform"]) if "platform" in m else m["mediaType"]
                for m in index["manifests"]]

    assert kinds(out_index) == kinds(src_index), (kinds(src_index), kinds(out_index))
    # The two entries the converter does not touch stay at their positions.
    assert out_index["manifests"][2:] == src_index["manifests"][2:]


# --- Docker media types ---------------------------------------------------------------------

def test_docker_without_oci_warns(convert):
    conv = convert("docker-keep")
    warnings = [ln for ln in conv.proc.stderr.splitlines() if "--oci" in ln]
    assert warnings, f"no warning mentioning --oci:\n{conv.proc.stderr}"
    assert any("annotation" in ln.lower() for ln in warnings), warnings
    assert not any(ln.startswith(ERROR_PREFIX) for ln in conv.proc.stderr.splitlines())
    (_p, _mdesc, manifest), = f.platform_manifests(conv.layout, conv.tag)
    assert manifest["mediaType"] == f.DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == f.DOCKER_CONFIG
    config = f.read_json(conv.layout, manifest["config"]["digest"])
    for i, layer in enumerate(manifest["layers"]):
        assert layer["mediaType"] == f.DOCKER_LAYER_GZIP, layer
        assert f.TOC_DIGEST not in layer.get("annotations", {}), layer
        raw = decompress(f.blob_path(conv.layout, layer["digest"]).read_bytes())
        assert f.sha256_digest(raw) == config["rootfs"]["diff_ids"][i]


def test_docker_with_oci_maps_types(convert):
    conv = convert("docker-oci")
    check_converted_image(conv, [HOST])
    assert not [ln for ln in conv.proc.stderr.splitlines() if "strip" in ln.lower()], \
        conv.proc.stderr


# --- same layout as source and destination ------------------------------------------------

def test_same_layout_keeps_source_tag(src: Source, nodaemon: NoDaemon, tmp_path: Path):
    layout = tmp_path / "L"
    shutil.copytree(src.layout, layout)
    before = {t: f.resolve_tag(layout, t) for t in f.tags(layout)}
    for _ in range(2):  # the second run replaces tag b
        proc = ok(nodaemon.optimize("--oci", "--no-optimize", f"oci:{layout}:t", f"oci:{layout}:b"))
        conv = Conversion("same", layout, "b", proc, ("--oci", "--no-optimize"))
        check_converted_image(conv, [HOST])
    assert f.tags(layout) == [*before, "b"]
    for t, entry in before.items():
        assert f.resolve_tag(layout, t) == entry
    for t in before:
        for digest in f.referenced_digests(layout, t):
            assert f.blob_path(layout, digest).exists(), (t, digest)
    assert f.resolve_tag(layout, "b")["digest"] != before["t"]["digest"]


def test_dst_created_and_tag_added(src: Source, nodaemon: NoDaemon, tmp_path: Path):
    dst = tmp_path / "new" / "layout"
    ok(nodaemon.optimize("--oci", "--no-optimize", f"oci:{src.layout}:t", f"oci:{dst}:one"))
    ok(nodaemon.optimize("--oci", "--no-optimize", f"oci:{src.layout}:dk", f"oci:{dst}:two"))
    assert json.loads((dst / "oci-layout").read_text())["imageLayoutVersion"] == "1.0.0"
    assert f.tags(dst) == ["one", "two"]


# --- bad input: one error line, non-zero exit, DST untouched --------------------------------

@pytest.fixture
def dst(src: Source, tmp_path: Path) -> Path:
    """An existing destination layout holding tag "keep"."""
    layout = tmp_path / "dst"
    f.write_layout(layout, "keep", [f.simple_layer({"keep.txt": b"keep\n"})])
    return layout


def assert_failed_cleanly(proc: subprocess.CompletedProcess, dst: Path,
                          before: dict[str, str] | None, *needles: str) -> str:
    assert proc.returncode != 0, _fmt(proc)
    lines = proc.stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith(ERROR_PREFIX)]
    assert len(errors) == 1 and lines[-1] == errors[0], \
        f"want one '{ERROR_PREFIX}' line, last on stderr:\n{_fmt(proc)}"
    # Besides the error, stderr may only hold the CLI's own notes (e.g. the
    # platform selection stated before the failure was found).
    assert all(ln.startswith("estargz-opt: ") for ln in lines), _fmt(proc)
    assert "Traceback" not in proc.stderr, _fmt(proc)
    msg = errors[0]
    for needle in needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in {msg!r}"
    assert f.tmp_files(dst) == [], f.tmp_files(dst)
    if before is None:
        assert not (dst / "index.json").exists(), "DST was created"
    else:
        after = f.layout_state(dst)
        assert after["index.json"] == before["index.json"], "index.json changed"
        changed = [p for p in before if after.get(p) != before[p]]
        assert not changed, f"changed or removed in DST: {changed}"
        new = [p for p in after if p not in before and not p.startswith("blobs/")]
        assert not new, f"new files in DST: {new}"
    return msg


def broken_copy(src: Source, tmp_path: Path) -> Path:
    layout = tmp_path / "src"
    shutil.copytree(src.layout, layout)
    return layout


def _manifest(layout: Path, tag: str) -> tuple[dict, dict]:
    (_p, desc, doc), = [x for x in f.platform_manifests(layout, tag)
                        if f.platform_str(x[0]) == HOST]
    return desc, doc


def test_missing_layer_blob_names_digest_and_platform(src, nodaemon, dst, tmp_path):
    layout = broken_copy(src, tmp_path)
    (_plat, _d, manifest), = [x for x in f.platform_manifests(layout, "multi")
                              if f.platform_str(x[0]) == OTHER]
    gone = manifest["layers"][0]["digest"]
    f.blob_path(layout, gone).unlink()
    before = f.layout_state(dst)
    proc = nodaemon.optimize("--oci", "--no-optimize", "--all-platforms",
                             f"oci:{layout}:multi", f"oci:{dst}:x")
    assert_failed_cleanly(proc, dst, before, gone.split(":")[1][:12], OTHER)


def test_missing_config_blob(src, nodaemon, dst, tmp_path):
    layout = broken_copy(src, tmp_path)
    gone = _manifest(layout, "t")[1]["config"]["digest"]
    f.blob_path(layout, gone).unlink()
    before = f.layout_state(dst)
    proc = nodaemon.optimize("--oci", "--no-optimize", f"oci:{layout}:t", f"oci:{dst}:x")
    assert_failed_cleanly(proc, dst, before, gone.split(":")[1][:12], HOST)


def test_blob_not_matching_digest(src, nodaemon, dst, tmp_path):
    layout = broken_copy(src, tmp_path)
    layer = _manifest(layout, "t")[1]["layers"][1]["digest"]
    path = f.blob_path(layout, layer)
    # Valid gzip of a valid tar, but not the bytes the digest names.
    path.write_bytes(f.gzip_layer(f.simple_layer({"srv/": None, "srv/x": b"tampered"})))
    before = f.layout_state(dst)
    proc = nodaemon.optimize("--oci", "--no-optimize", f"oci:{layout}:t", f"oci:{dst}:x")
    assert_failed_cleanly(proc, dst, before, layer.split(":")[1][:12])


def _retag_with_blob(layout: Path, tag: str, data: bytes, media_type: str,
                     platform: str | None = HOST) -> str:
    digest, size = f.put_blob(layout, data)
    desc = f.descriptor(media_type, digest, size,
                        platform=f.platform_dict(platform) if platform else None)
    f.tag_descriptor(layout, tag, desc)
    return digest


@pytest.mark.parametrize("what", ["index.json", "index", "manifest", "config"])
def test_malformed_json(src, nodaemon, dst, tmp_path, what: str):
    layout = broken_copy(src, tmp_path)
    tag, needle = "t", None
    if what == "index.json":
        (layout / "index.json").write_text('{"schemaVersion": 2, "manifests": [')
        needle = "index.json"
    elif what == "index":
        tag = "multi"
        needle = _retag_with_blob(layout, tag, b'{"schemaVersion":2,"manifests":[}',
                                  f.OCI_INDEX, platform=None)
    elif what == "manifest":
        needle = _retag_with_blob(layout, tag, b'{"schemaVersion":2,"config":', f.OCI_MANIFEST)
    else:
        _desc, manifest = _manifest(layout, tag)
        bad, size = f.put_blob(layout, b'{"architecture":"amd64","rootfs":')
        manifest["config"] = f.descriptor(f.OCI_CONFIG, bad, size)
        _retag_with_blob(layout, tag, json.dumps(manifest).encode(), f.OCI_MANIFEST)
        needle = bad
    before = f.layout_state(dst)
    proc = nodaemon.optimize("--oci", "--no-optimize", f"oci:{layout}:{tag}", f"oci:{dst}:x")
    msg = assert_failed_cleanly(proc, dst, before)
    # The message must say which document is broken: its digest, or its role
    # and platform (e.g. "config of linux/amd64").
    named = needle.split(":")[-1][:12] in msg or (what in msg and
                                                  (what == "index.json" or HOST in msg))
    assert named, f"{msg!r} names neither {needle} nor the {what} of {HOST}"


def _line_no(msg: str, n: int) -> None:
    assert re.search(rf"(\bline\s*{n}\b|:{n}\b)", msg, re.I), f"line {n} not named in {msg!r}"


@pytest.mark.parametrize("bad,line", [
    ("not json at all", 2),
    ('{"manifestDigest":"{m}","layerIndex":0}', 3),  # no path
    ('{"path":"bin/busybox","manifestDigest":"{m}","layerIndex":"zero"}', 2),
])
def test_bad_record_line(src, nodaemon, dst, tmp_path, bad: str, line: int):
    good = json.dumps({"path": "srv/data/b.txt", "manifestDigest": src.manifest,
                       "layerIndex": 1}, separators=(",", ":"))
    lines = [good] * (line - 1) + [bad.replace("{m}", src.manifest), good]
    record = tmp_path / "record.jsonl"
    record.write_text("\n".join(lines) + "\n")
    before = f.layout_state(dst)
    proc = nodaemon.optimize("--oci", "--record-in", record, f"oci:{src.layout}:t",
                             f"oci:{dst}:x")
    _line_no(assert_failed_cleanly(proc, dst, before), line)


def test_bad_prefetch_list_line(src, nodaemon, dst, tmp_path):
    plist = tmp_path / "prefetch.txt"
    plist.write_text("# comment\netc/app.conf\nsrv/data/[ab.txt\n")  # unclosed '['
    before = f.layout_state(dst)
    proc = nodaemon.optimize("--oci", "--prefetch-list", plist, f"oci:{src.layout}:t",
                             f"oci:{dst}:x")
    _line_no(assert_failed_cleanly(proc, dst, before), 3)


def test_unknown_platform(src, nodaemon, dst):
    before = f.layout_state(dst)
    proc = nodaemon.optimize("--oci", "--no-optimize", "--platform", "bogus///x",
                             f"oci:{src.layout}:multi", f"oci:{dst}:x")
    assert_failed_cleanly(proc, dst, before, "bogus///x")


def test_missing_src_tag(src, nodaemon, dst):
    before = f.layout_state(dst)
    proc = nodaemon.optimize("--oci", "--no-optimize", f"oci:{src.layout}:no-such-tag",
                             f"oci:{dst}:x")
    assert_failed_cleanly(proc, dst, before, "no-such-tag")


def test_zstdchunked_needs_oci(src, nodaemon, tmp_path):
    dst = tmp_path / "never"
    proc = nodaemon.optimize("--zstdchunked", "--no-optimize", f"oci:{src.layout}:t",
                             f"oci:{dst}:x")
    assert_failed_cleanly(proc, dst, None, "--oci")
    assert proc.returncode == 2, "a usage error exits 2 (click convention)"


def test_the_containerd_runner_needs_containerd(src, nodaemon, dst):
    # (without --runner, an oci: image's workload runs with runc: tests/test_analyze_runc.py)
    before = f.layout_state(dst)
    proc = nodaemon.optimize("--oci", "--runner", "containerd", f"oci:{src.layout}:t",
                             f"oci:{dst}:x")
    assert_failed_cleanly(proc, dst, before, "--runner containerd")
    assert proc.returncode == 2, "a usage error exits 2, wherever it is detected"


def test_record_out_without_a_workload_run_is_a_usage_error(src, nodaemon, dst, tmp_path):
    before = f.layout_state(dst)
    proc = nodaemon.optimize("--oci", "--no-optimize", "--record-out", str(tmp_path / "r.jsonl"),
                             f"oci:{src.layout}:t", f"oci:{dst}:x")
    assert_failed_cleanly(proc, dst, before, "--record-out")
    assert proc.returncode == 2, "a usage error exits 2, wherever it is detected"
    assert not (tmp_path / "r.jsonl").exists()


def test_read_only_destination(src, nodaemon, dst):
    before = f.layout_state(dst)
    proc = nodaemon.optimize("--oci", "--no-optimize", f"oci:{src.layout}:t",
                             f"oci:{dst}:x", ro=(dst,))
    assert_failed_cleanly(proc, dst, before)


def test_destination_is_a_file(src, nodaemon, tmp_path):
    target = tmp_path / "not-a-dir"
    target.write_bytes(b"precious\n")
    proc = nodaemon.optimize("--oci", "--no-optimize", f"oci:{src.layout}:t",
                             f"oci:{target}:x")
    assert_failed_cleanly(proc, tmp_path / "nowhere", None)
    assert target.read_bytes() == b"precious\n"
    assert f.tmp_files(tmp_path) == []


def test_failed_run_into_same_layout_keeps_it(src, nodaemon, tmp_path):
    layout = broken_copy(src, tmp_path)
    gone = _manifest(layout, "t")[1]["layers"][1]["digest"]
    f.blob_path(layout, gone).unlink()
    before = f.layout_state(layout)
    proc = nodaemon.optimize("--oci", "--no-optimize", f"oci:{layout}:t", f"oci:{layout}:b")
    assert_failed_cleanly(proc, layout, before, gone.split(":")[1][:12])

