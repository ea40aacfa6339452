"""``oci-archive:`` and ``docker-archive:`` images, made and checked by real tools.

Archives come from ``skopeo copy oci:… oci-archive:…`` / ``docker-archive:…:NAME:TAG``
(skopeo writes docker archives with plain tar layers, links and all) or from GNU ``tar``
(a docker archive with gzip and zstd layers, the ``blobs/sha256`` names newer docker
versions use, ``./`` member names and a symlinked layer, as ``docker save`` writes
them). What we write is checked by ``skopeo inspect`` / ``skopeo copy`` (every blob's
digest and size), ``umoci unpack`` (every layer's DiffID against the config) and
``estargz-opt verify``. Bad input must give one error line, a non-zero exit and no
output file or temporary leftovers.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from support import imagefactory as f
from support.cli import cli_argv, invoke

pytestmark = pytest.mark.root

LAYERS = [
    {"etc/": None, "etc/app.conf": b"conf=1\n"},
    {"srv/": None, "srv/data.txt": b"data\n" * 1000},
    {"usr/": None, "usr/lib/": None, "usr/lib/lib.so": os.urandom(300_000)},
]
SRC_TAG = "v1"
DOCKER_NAME = "example.com/team/app:v1"


# --- helpers ----------------------------------------------------------------------------------

def tool(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a real tool; a missing one fails the test (scripts/install-deps.sh installs it)."""
    assert shutil.which(str(argv[0])), f"{argv[0]} is not installed (scripts/install-deps.sh)"
    proc = subprocess.run(list(map(str, argv)), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    if check:
        assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stderr}"
    return proc


cli = invoke  # in process: what these tests check is the CLI's output and files


def optimize(*args: str | Path) -> str:
    """Run optimize; the new image's digest (its last stdout line)."""
    res = cli("optimize", *args)
    assert res.returncode == 0, f"optimize {args} exited {res.returncode}:\n{res.stderr}"
    last = res.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", last), res.stdout
    return last


def one_error(res: subprocess.CompletedProcess[str], *words: str) -> str:
    assert res.returncode != 0, res.stdout
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("estargz-opt: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def skopeo_digest(ref: str) -> str:
    return json.loads(tool("skopeo", "inspect", ref).stdout)["Digest"]


def check_output(ref: str, digest: str, tmp: Path, files: list[dict[str, bytes | None]]) -> None:
    """What every archive or layout we write must pass: skopeo reads it (and copies it,
    checking every blob), umoci unpacks it (DiffIDs) into the files of `files`, and
    verify finds every layer lazily pullable."""
    assert skopeo_digest(ref) == digest
    copy = tmp / "copy"
    tool("skopeo", "copy", ref, f"oci:{copy}:out")
    assert f.resolve_tag(copy, "out")["digest"] == digest
    tool("umoci", "unpack", "--image", f"{copy}:out", tmp / "bundle")
    rootfs = tmp / "bundle" / "rootfs"
    for layer in files:
        for name, data in layer.items():
            if data is not None:
                assert (rootfs / name).read_bytes() == data, name
    res = cli("verify", ref)
    assert res.returncode == 0, res.stdout + res.stderr
    for _, mdesc, manifest in f.platform_manifests(copy, "out"):
        assert mdesc["mediaType"] == f.OCI_MANIFEST
        for layer in manifest["layers"]:
            assert f.TOC_DIGEST in layer["annotations"], layer


def leftovers(directory: Path) -> list[str]:
    """Temporary files or directories of ours in `directory` (owner-named dot entries)."""
    return sorted(p.name for p in directory.iterdir()
                  if p.name.startswith(".") and ".tmp" in p.name)


# --- the images -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def src_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout = tmp_path_factory.mktemp("archives") / "src"
    f.write_layout(layout, SRC_TAG, [f.simple_layer(x) for x in LAYERS])
    return layout


@pytest.fixture(scope="module")
def oci_archive(src_layout: Path) -> Path:
    out = src_layout.parent / "src-oci.tar"
    tool("skopeo", "copy", f"oci:{src_layout}:{SRC_TAG}", f"oci-archive:{out}:{SRC_TAG}")
    return out


@pytest.fixture(scope="module")
def docker_archive(src_layout: Path) -> Path:
    out = src_layout.parent / "src-docker.tar"
    tool("skopeo", "copy", f"oci:{src_layout}:{SRC_TAG}", f"docker-archive:{out}:{DOCKER_NAME}")
    return out


@pytest.fixture(scope="module")
def compressed_docker_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two images, as `docker save` of newer docker writes them, made with GNU tar: layer
    0 gzip under blobs/sha256/, layer 1 zstd, layer 2 a plain tar reached by a symlink."""
    root = tmp_path_factory.mktemp("dockersave")
    tree = root / "tree"
    tars = [f.simple_layer(x) for x in LAYERS]
    gz = gzip.compress(tars[0], mtime=0)
    (tree / "blobs" / "sha256").mkdir(parents=True)
    gz_name = f"blobs/sha256/{f.sha256_digest(gz)[7:]}"
    (tree / gz_name).write_bytes(gz)
    (tree / "l1").mkdir()
    (tree / "l1" / "layer.tar").write_bytes(zstandard.ZstdCompressor().compress(tars[1]))
    (tree / "plain.tar").write_bytes(tars[2])
    (tree / "l2").mkdir()
    (tree / "l2" / "layer.tar").symlink_to("../plain.tar")
    config = {"architecture": f.HOST_PLATFORM[1], "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [f.sha256_digest(t) for t in tars]}}
    (tree / "cfg.json").write_text(json.dumps(config))
    small = {**config, "rootfs": {"type": "layers", "diff_ids": [f.sha256_digest(tars[0])]}}
    (tree / "small.json").write_text(json.dumps(small))
    manifest = [
        {"Config": "cfg.json", "RepoTags": ["app:zstd"],
         "Layers": [gz_name, "l1/layer.tar", "l2/layer.tar"]},
        {"Config": "small.json", "RepoTags": ["example.com/small:1"], "Layers": [gz_name]},
    ]
    (tree / "manifest.json").write_text(json.dumps(manifest))
    out = root / "saved.tar"
    tool("tar", "-C", tree, "-cf", out, ".")
    return out


# --- conversions ------------------------------------------------------------------------------

def test_oci_archive_to_oci_archive(oci_archive: Path, tmp_path: Path):
    out = tmp_path / "out.tar"
    digest = optimize("--oci", "--no-optimize", f"oci-archive:{oci_archive}:{SRC_TAG}",
                      f"oci-archive:{out}:v1-esgz")
    check_output(f"oci-archive:{out}:v1-esgz", digest, tmp_path, LAYERS)
    assert leftovers(tmp_path) == []


def test_oci_archive_converted_in_place_keeps_its_images(oci_archive: Path, tmp_path: Path):
    archive = tmp_path / "both.tar"
    shutil.copy(oci_archive, archive)
    source = skopeo_digest(f"oci-archive:{archive}:{SRC_TAG}")
    digest = optimize("--oci", "--no-optimize", f"oci-archive:{archive}:{SRC_TAG}",
                      f"oci-archive:{archive}:v1-esgz")
    assert skopeo_digest(f"oci-archive:{archive}:{SRC_TAG}") == source
    check_output(f"oci-archive:{archive}:v1-esgz", digest, tmp_path, LAYERS)
    assert leftovers(tmp_path) == []


def test_concurrent_runs_into_one_archive_keep_every_image(oci_archive: Path, tmp_path: Path):
    out = tmp_path / "shared.tar"
    src = f"oci-archive:{oci_archive}:{SRC_TAG}"
    flags = {"a": [], "b": ["--zstdchunked"], "c": ["--estargz-chunk-size", "65536"]}
    runs = [subprocess.Popen([*cli_argv(), "optimize", "--oci",
                              "--no-optimize", *fmt, src, f"oci-archive:{out}:{tag}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for tag, fmt in flags.items()]
    digests = {}
    for tag, run in zip("abc", runs, strict=True):
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
        digests[tag] = stdout.strip().splitlines()[-1]
    for tag, digest in digests.items():
        assert skopeo_digest(f"oci-archive:{out}:{tag}") == digest
    tool("skopeo", "copy", f"oci-archive:{out}:b", f"oci:{tmp_path / 'copy'}:b")
    assert leftovers(tmp_path) == []


def test_docker_archive_to_oci(docker_archive: Path, tmp_path: Path):
    out = tmp_path / "out"
    digest = optimize("--oci", "--no-optimize", f"docker-archive:{docker_archive}:{DOCKER_NAME}",
                      f"oci:{out}:v1")
    check_output(f"oci:{out}:v1", digest, tmp_path, LAYERS)
    # The only image of the archive needs no name; docker's short form of a name matches.
    assert optimize("--oci", "--no-optimize", f"docker-archive:{docker_archive}",
                    f"oci:{out}:v2") == digest


def test_docker_archive_keeps_docker_media_types_without_oci(docker_archive: Path,
                                                             tmp_path: Path):
    out = tmp_path / "out"
    optimize("--no-optimize", f"docker-archive:{docker_archive}", f"oci:{out}:v1")
    [(_, mdesc, manifest)] = f.platform_manifests(out, "v1")
    assert mdesc["mediaType"] == f.DOCKER_MANIFEST
    assert {x["mediaType"] for x in manifest["layers"]} == {f.DOCKER_LAYER_GZIP}
    # (skopeo's oci: reads OCI-typed manifests only, so the blobs are checked here)
    for layer in manifest["layers"]:
        assert f.sha256_digest(f.read_blob(out, layer["digest"])) == layer["digest"]


def test_compressed_docker_archive_layers(compressed_docker_archive: Path, tmp_path: Path):
    out = tmp_path / "out.tar"
    ref = f"docker-archive:{compressed_docker_archive}:app:zstd"
    digest = optimize("--oci", "--no-optimize", ref, f"oci-archive:{out}:v1")
    check_output(f"oci-archive:{out}:v1", digest, tmp_path, LAYERS)
    small = optimize("--oci", "--no-optimize",
                     f"docker-archive:{compressed_docker_archive}:example.com/small:1",
                     f"oci-archive:{out}:small")
    assert skopeo_digest(f"oci-archive:{out}:small") == small
    assert optimize("--oci", "--no-optimize", f"docker-archive:{compressed_docker_archive}:@1",
                    f"oci:{tmp_path / 'n'}:small") == small  # skopeo's @N: the Nth image
    assert skopeo_digest(f"oci-archive:{out}:v1") == digest  # the first tag is kept


def test_docker_archive_layer_types_follow_their_bytes(compressed_docker_archive: Path):
    """gzip and zstd layers are typed by their magic and named by their own digest; a
    plain tar's digest is its DiffID (verify reads and checks every one)."""
    tars = [f.simple_layer(x) for x in LAYERS]
    res = cli("verify", "--json", f"docker-archive:{compressed_docker_archive}:app:zstd")
    layers = json.loads(res.stdout)["layers"]
    assert [x["mediaType"] for x in layers] == [
        f.DOCKER_LAYER_GZIP, f.DOCKER_LAYER_GZIP[:-5] + ".zstd", f.DOCKER_LAYER_GZIP[:-5]]
    assert [x["digest"] for x in layers] == [
        f.sha256_digest(gzip.compress(tars[0], mtime=0)),
        f.sha256_digest(zstandard.ZstdCompressor().compress(tars[1])),
        f.sha256_digest(tars[2]),
    ]
    # not eStargz yet: verify says so, layer by layer, and fails
    assert res.returncode != 0 and all(not x["ok"] for x in layers), res.stdout


def test_oci_to_oci_archive_with_external_toc(src_layout: Path, tmp_path: Path):
    out = tmp_path / "new.tar"
    digest = optimize("--oci", "--no-optimize", "--estargz-external-toc",
                      f"oci:{src_layout}:{SRC_TAG}", f"oci-archive:{out}:v1")
    assert skopeo_digest(f"oci-archive:{out}:v1") == digest
    skopeo_digest(f"oci-archive:{out}:v1-esgztoc")
    res = cli("verify", f"oci-archive:{out}:v1")  # finds the TOCs in v1-esgztoc
    assert res.returncode == 0, res.stdout + res.stderr
    assert leftovers(tmp_path) == []


def test_containerd_to_oci_archive(containerd, src_layout: Path, tmp_path: Path):
    name = "docker.io/estargz-opt-test/archive:1"
    containerd.ctr("images", "import",
                   str(f.archive_for_ctr(src_layout, SRC_TAG, name, tmp_path / "import.tar")))
    try:
        out = tmp_path / "out.tar"
        digest = optimize_with(containerd, "--oci", "--no-optimize", name,
                               f"oci-archive:{out}:v1")
        check_output(f"oci-archive:{out}:v1", digest, tmp_path, LAYERS)
    finally:
        containerd.ctr("images", "rm", name)


def optimize_with(containerd, *args: str) -> str:
    res = cli("-a", containerd.address, "optimize", *args)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def test_inspect_archives(oci_archive: Path, docker_archive: Path):
    for ref in (f"oci-archive:{oci_archive}:{SRC_TAG}", f"docker-archive:{docker_archive}"):
        res = cli("inspect", "--json", ref)
        assert res.returncode == 0, res.stderr
        assert len(json.loads(res.stdout)["layers"]) == len(LAYERS)


# --- bad input ----------------------------------------------------------------------------

def test_truncated_archive(oci_archive: Path, tmp_path: Path):
    data = oci_archive.read_bytes()
    # inside a header, inside a blob, and after the last member (no end-of-archive blocks)
    for cut in (512 * 3 + 100, len(data) // 2, len(data) - 1024):
        broken = tmp_path / "broken.tar"
        broken.write_bytes(data[:cut])
        out = tmp_path / "out.tar"
        one_error(cli("--log-level", "error", "optimize", "--oci", "--no-optimize",
                      f"oci-archive:{broken}:{SRC_TAG}", f"oci-archive:{out}:x"),
                  str(broken), "truncated")
        assert not out.exists()
        assert leftovers(tmp_path) == []


def test_missing_manifest_json(docker_archive: Path, tmp_path: Path):
    tree = tmp_path / "tree"
    tree.mkdir()
    tool("tar", "-C", tree, "-xf", docker_archive)
    (tree / "manifest.json").unlink()
    broken = tmp_path / "nomanifest.tar"
    tool("tar", "-C", tree, "-cf", broken, ".")
    out = tmp_path / "out.tar"
    one_error(cli("optimize", "--oci", "--no-optimize", f"docker-archive:{broken}",
                  f"oci-archive:{out}:x"), "no manifest.json")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_name_not_in_archive(compressed_docker_archive: Path, oci_archive: Path, tmp_path: Path):
    out = tmp_path / "out.tar"
    msg = one_error(cli("optimize", "--oci", "--no-optimize",
                        f"docker-archive:{compressed_docker_archive}:app:nope",
                        f"oci-archive:{out}:x"), "docker.io/library/app:nope")
    assert "docker.io/library/app:zstd" in msg  # the tags it has
    one_error(cli("optimize", "--oci", "--no-optimize",
                  f"docker-archive:{compressed_docker_archive}", f"oci-archive:{out}:x"),
              "holds 2 images")
    one_error(cli("optimize", "--oci", "--no-optimize", f"oci-archive:{oci_archive}:nope",
                  f"oci-archive:{out}:x"), "'nope'")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_corrupt_layer_leaves_the_destination_as_it_was(oci_archive: Path, src_layout: Path,
                                                       tmp_path: Path):
    """A layer whose bytes do not match its digest fails the run after other layers were
    written: the existing destination archive is unchanged and no temporary is left."""
    layer = f.platform_manifests(src_layout, SRC_TAG)[0][2]["layers"][2]["digest"]
    data = bytearray(oci_archive.read_bytes())
    blob = f.blob_path(src_layout, layer).read_bytes()
    at = data.find(blob)
    assert at > 0
    data[at + 100] ^= 0xFF
    broken = tmp_path / "corrupt.tar"
    broken.write_bytes(bytes(data))
    out = tmp_path / "out.tar"
    shutil.copy(oci_archive, out)
    before = out.read_bytes()
    one_error(cli("--log-level", "error", "optimize", "--oci", "--no-optimize",
                  f"oci-archive:{broken}:{SRC_TAG}", f"oci-archive:{out}:x"), layer)
    assert out.read_bytes() == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("ref, words", [
    ("oci-archive:", "no archive path"),
    ("docker-archive:", "no archive path"),
    ("docker-archive:x.tar:Bad/Name:1", "not a docker NAME:TAG"),
    ("docker-archive:x.tar:app@sha256:" + "0" * 64, "by tag"),
])
def test_bad_archive_references(ref: str, words: str, tmp_path: Path):
    res = cli("optimize", "--oci", "--no-optimize", ref, f"oci:{tmp_path / 'out'}:x")
    one_error(res, words)
    assert res.returncode == 2
    assert not (tmp_path / "out").exists()


def test_docker_archive_is_not_a_destination(src_layout: Path, tmp_path: Path):
    out = tmp_path / "out.tar"
    res = cli("optimize", "--oci", "--no-optimize", f"oci:{src_layout}:{SRC_TAG}",
              f"docker-archive:{out}:app:1")
    one_error(res, "read only", "oci-archive:PATH")
    assert res.returncode == 2
    assert not out.exists()


def test_compressed_or_foreign_archive_files(oci_archive: Path, tmp_path: Path):
    gz = tmp_path / "archive.tar.gz"
    gz.write_bytes(gzip.compress(oci_archive.read_bytes()))
    one_error(cli("verify", f"oci-archive:{gz}"), "gzip-compressed")
    text = tmp_path / "notes.txt"
    text.write_text("not an archive\n" * 100)
    one_error(cli("verify", f"oci-archive:{text}"), str(text))
    one_error(cli("verify", f"oci-archive:{tmp_path / 'absent.tar'}"), "No such file")
    # an existing file that is not an OCI archive is never overwritten
    out = tmp_path / "keep.tar"
    shutil.copy(text, out)
    one_error(cli("--log-level", "error", "optimize", "--oci", "--no-optimize",
                  f"oci-archive:{oci_archive}:{SRC_TAG}", f"oci-archive:{out}:x"), str(out))
    assert out.read_text() == text.read_text()
    missing = tmp_path / "no" / "such" / "out.tar"
    one_error(cli("--log-level", "error", "optimize", "--oci", "--no-optimize",
                  f"oci-archive:{oci_archive}:{SRC_TAG}", f"oci-archive:{missing}:x"),
              "cannot write", "No such file")
    one_error(cli("verify", f"oci-archive:{tmp_path}"), "Is a directory")


# --- archives written by other tools ----------------------------------------------------------

def _relink_blobs(archive: Path, tmp: Path, first: list[str]) -> dict[str, str]:
    """Rewrite `archive` with every blob's data under store/ and blobs/sha256/HEX a
    symlink or a hardlink member to it, alternately (the digests `first` first, so that
    they get both kinds); which kind holds each blob."""
    tree = tmp / "relink"
    tree.mkdir()
    tool("tar", "-C", tree, "-xf", archive)
    kinds = {}
    with tarfile.open(archive, "w") as out:
        for name in ("index.json", "oci-layout"):
            out.add(tree / name, arcname=name)
        order = {digest[7:]: n for n, digest in enumerate(first)}
        blobs = sorted((tree / "blobs" / "sha256").iterdir(),
                       key=lambda p: (order.get(p.name, len(order)), p.name))
        for n, blob in enumerate(blobs):
            out.add(blob, arcname=f"store/{blob.name}")
            link = tarfile.TarInfo(f"blobs/sha256/{blob.name}")
            if n % 2:
                link.type, link.linkname = tarfile.SYMTYPE, f"../../store/{blob.name}"
            else:
                link.type, link.linkname = tarfile.LNKTYPE, f"store/{blob.name}"
            out.addfile(link)
            kinds["sha256:" + blob.name] = "symlink" if n % 2 else "hardlink"
    return kinds


def test_an_archive_whose_blobs_are_links_keeps_every_image(oci_archive: Path,
                                                             tmp_path: Path):
    """A destination whose blobs are symlink and hardlink members (read through the
    links) gains a tag and loses no blob: not its images', nor the shared ones the new
    image finds there and so does not write again."""
    archive = tmp_path / "linked.tar"
    shutil.copy(oci_archive, archive)
    src = f"oci-archive:{oci_archive}:{SRC_TAG}"
    old = optimize("--oci", "--no-optimize", src, f"oci-archive:{archive}:old")
    old_layers = [x["digest"] for x in json.loads(
        tool("skopeo", "inspect", "--raw", f"oci-archive:{archive}:old").stdout)["layers"]]
    kinds = _relink_blobs(archive, tmp_path, old_layers)
    assert {kinds[d] for d in old_layers} == {"symlink", "hardlink"}, kinds
    plain = skopeo_digest(f"oci-archive:{archive}:{SRC_TAG}")
    new = optimize("--oci", "--no-optimize", src, f"oci-archive:{archive}:new")
    assert new == old  # the same conversion: every layer blob shared with "old"
    assert skopeo_digest(f"oci-archive:{archive}:{SRC_TAG}") == plain
    tool("skopeo", "copy", f"oci-archive:{archive}:{SRC_TAG}", f"oci:{tmp_path / 'plain'}:x")
    for tag in ("old", "new"):
        (tmp_path / tag).mkdir()
        check_output(f"oci-archive:{archive}:{tag}", new, tmp_path / tag, LAYERS)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["oci-archive", "docker-archive"])
def test_a_piped_archive_is_one_line_naming_it(oci_archive: Path, docker_archive: Path,
                                               tmp_path: Path, kind: str):
    archive = oci_archive if kind == "oci-archive" else docker_archive
    ref = f"{kind}:/dev/stdin" + (f":{SRC_TAG}" if kind == "oci-archive" else "")
    out = tmp_path / "out.tar"
    for args in (["verify", ref], ["inspect", ref],
                 ["optimize", "--oci", "--no-optimize", ref, f"oci-archive:{out}:x"]):
        with open(archive, "rb") as data:
            feed = subprocess.Popen(["cat"], stdin=data, stdout=subprocess.PIPE)
            res = subprocess.run([*cli_argv(), "--log-level", "error",
                                  *args], stdin=feed.stdout, capture_output=True, text=True,
                                 timeout=60)
            feed.stdout.close()
            feed.wait()
        one_error(res, f"{kind}:/dev/stdin is a pipe", "save it to")
    assert not out.exists()
    assert leftovers(tmp_path) == []
