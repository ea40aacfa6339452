"""zstd:chunked in the containers/storage flavour: the writer's layout, its chunking rule,
the layer cache keyed by flavour, and `verify` failing with the reason on the layers
c/storage would refuse or silently pull whole. (podman itself reads these layers in
test_podman_partial.py.)"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings, strategies as st
from support.cli import cli_argv
from support.imagefactory import (
    blob_path,
    put_json,
    read_json,
    resolve_tag,
    tag_descriptor,
    write_layout,
)

from estargz_opt.format import zchunked
from estargz_opt.format.zchunked_verify import open_containers_layer, verify_containers_layer

CLI = cli_argv()
CONTAINERS = ("--format", "zstdchunked", "--zstdchunked-flavor", "containers")
STARGZ_TOC = "containerd.io/snapshot/stargz/toc.digest"


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def sample_tar() -> bytes:
    """Every kind of entry c/storage handles, a file of many chunks and one of zeros."""
    buf = io.BytesIO()
    rnd = random.Random(7)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:

        def add(name: str, data: bytes | None = None, **kw: Any) -> None:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1700000000
            for k, v in kw.items():
                setattr(ti, k, v)
            if data is not None:
                ti.size = len(data)
            t.addfile(ti, io.BytesIO(data) if data is not None else None)

        add("data/", type=tarfile.DIRTYPE, mode=0o755)
        add("data/big", rnd.randbytes(1 << 20) + bytes(5000) + rnd.randbytes(1 << 20))
        add("data/zeros", bytes(100_000))
        add("data/empty", b"")
        add("data/x", b"x\n", mode=0o600, pax_headers={"SCHILY.xattr.user.k": "v"})
        add("data/hl", type=tarfile.LNKTYPE, linkname="data/x")
        add("data/sl", type=tarfile.SYMTYPE, linkname="x")
        add("data/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
    return buf.getvalue()


# ----------------------------------------------------------------------------- chunking


def _chunks(data: bytes, cuts: list[int]) -> list[tuple[bytes, bool]]:
    """The chunks a Chunker makes of data fed in pieces ending at the offsets in cuts."""
    chunker = zchunked.Chunker()
    out: list[tuple[bytes, bool]] = []
    current = b""
    pieces = []
    start = 0
    for end in [*sorted(set(cuts)), len(data)]:
        pieces.extend(chunker.feed(data[start:end]))
        start = end
    pieces.extend(chunker.finish())
    for p in pieces:
        current += p.data
        if p.cut and current:
            out.append((current, p.zeros))
            current = b""
    if current:
        out.append((current, False))
    return out


@pytest.mark.unit
@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(st.binary(min_size=1, max_size=3000), st.integers(1, 5000).map(bytes)),
        max_size=12,
    ),
    st.lists(st.integers(0, 40_000), max_size=6),
)
def test_chunks_do_not_depend_on_how_the_content_is_fed(
    parts: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(parts)
    whole = _chunks(data, [])
    assert whole == _chunks(data, [c for c in cuts if c <= len(data)])
    assert b"".join(c for c, _ in whole) == data
    for chunk, zeros in whole:
        assert not zeros or (chunk == bytes(len(chunk)) and len(chunk) >= zchunked.HOLE_MIN)
    # every run of HOLE_MIN zeros or more is a zeros chunk of its own
    runs = [c for c, z in whole if z]
    assert sum(map(len, runs)) == sum(
        len(m) for m in re.findall(rb"\x00{1024,}", data)
    )


@pytest.mark.unit
def test_a_local_edit_keeps_the_other_chunks() -> None:
    rnd = random.Random(1)
    a = rnd.randbytes(2 << 20)
    b = a[:1_000_000] + b"EDIT" + a[1_000_000:]
    ca = {hashlib.sha256(c).digest() for c, _ in _chunks(a, [])}
    cb = [hashlib.sha256(c).digest() for c, _ in _chunks(b, [])]
    assert len(ca) > 10
    assert sum(c not in ca for c in cb) <= 2


@pytest.mark.unit
def test_no_chunk_exceeds_the_bound() -> None:
    data = b"\x01" * (zchunked.MAX_CHUNK * 2 + 10)  # a constant byte never cuts
    sizes = [len(c) for c, _ in _chunks(data, [1 << 20])]
    assert sizes == [zchunked.MAX_CHUNK, zchunked.MAX_CHUNK, 10]


# ----------------------------------------------------------------------------- the layer


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("zc")
    (d / "in.tar").write_bytes(sample_tar())
    (d / "prio").write_text("data/x\n")
    done = cli("layer", "convert", *CONTAINERS,
               "--prioritized-files", d / "prio", d / "in.tar", d / "out")
    assert done.returncode == 0, done.stderr
    return d / "out", json.loads(done.stdout)


def test_layout_annotations_and_diffid(converted: tuple[Path, dict[str, Any]]) -> None:
    blob, summary = converted
    ann = summary["annotations"]
    assert set(ann) == {zchunked.MANIFEST_CHECKSUM, zchunked.MANIFEST_POSITION,
                        zchunked.TARSPLIT_POSITION}
    data = blob.read_bytes()
    assert data[-8:] == b"GNUlInUx"
    assert summary["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    # zstd(1) skips the skippable frames: what it decodes is the tar the DiffID names
    tar = subprocess.run(["zstd", "-dc", blob], capture_output=True, check=True).stdout
    assert summary["diffID"] == "sha256:" + hashlib.sha256(tar).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        names = t.getnames()
    assert names[:2] == ["data", "data/x"]  # the prioritized file first, no landmark
    assert ".prefetch.landmark" not in names
    report = verify_containers_layer(blob, ann, summary["diffID"])
    assert report.errors == []


def test_toc_fields(converted: tuple[Path, dict[str, Any]]) -> None:
    blob, _ = converted
    with open(blob, "rb") as f:
        layer = open_containers_layer(f)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for e in layer.entries:
        by_name.setdefault(e["name"], []).append(e)
    big = by_name["data/big"]
    assert big[0]["type"] == "reg" and len(big) > 4
    assert all(c["type"] == "chunk" for c in big[1:])
    with tarfile.open(fileobj=io.BytesIO(sample_tar())) as t:
        member = t.extractfile("data/big")
        assert member is not None
        assert big[0]["digest"] == "sha256:" + hashlib.sha256(member.read()).hexdigest()
    assert [c.get("chunkType") for c in big].count("zeros") == 1
    assert big[0]["offset"] < big[0]["endOffset"]
    (zeros,) = by_name["data/zeros"]
    assert zeros.get("chunkType") is None and zeros["size"] == 100_000  # one chunk: no fields
    (empty,) = by_name["data/empty"]
    assert "digest" not in empty and "offset" not in empty
    assert by_name["data/x"][0]["xattrs"] == {"user.k": "dg=="}
    assert by_name["data/hl"][0]["type"] == "hardlink"
    assert by_name["data/null"][0]["devMajor"] == 1
    assert layer.toc["tarSplitDigest"].startswith("sha256:")


def test_the_cache_keeps_the_flavours_apart(tmp_path: Path) -> None:
    (tmp_path / "in.tar").write_bytes(sample_tar())
    cache = tmp_path / "cache"
    first = cli("layer", "convert", "--format", "zstdchunked", "--cache-dir", cache,
                tmp_path / "in.tar", tmp_path / "a")
    second = cli("layer", "convert", *CONTAINERS, "--cache-dir", cache,
                 tmp_path / "in.tar", tmp_path / "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert json.loads(second.stdout)["cache"] == "miss"
    assert (tmp_path / "b").read_bytes()[-8:] == b"GNUlInUx"
    assert (tmp_path / "a").read_bytes()[-8:] == b"GnUlInUx"
    again = cli("layer", "convert", *CONTAINERS, "--cache-dir", cache,
                tmp_path / "in.tar", tmp_path / "c")
    assert json.loads(again.stdout)["cache"] == "hit"
    assert (tmp_path / "c").read_bytes() == (tmp_path / "b").read_bytes()


def test_flavor_applies_to_zstdchunked_only(tmp_path: Path) -> None:
    (tmp_path / "in.tar").write_bytes(sample_tar())
    done = cli("layer", "convert", "--zstdchunked-flavor", "containers", tmp_path / "in.tar",
               tmp_path / "out")
    assert done.returncode != 0 and not (tmp_path / "out").exists()
    assert "applies to zstd:chunked only" in done.stderr
    assert "Traceback" not in done.stderr


def test_flavor_needs_zstdchunked(tmp_path: Path) -> None:
    done = cli("optimize", "--oci", "--no-optimize", "--zstdchunked-flavor", "containers",
               f"oci:{tmp_path}/a:t", f"oci:{tmp_path}/b:t")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("--zstdchunked-flavor needs --zstdchunked")


# ----------------------------------------------------------------------------- verify


@pytest.fixture
def image(tmp_path: Path) -> Path:
    src = tmp_path / "img"
    write_layout(src, "t", [sample_tar()])
    done = cli("optimize", "--oci", "--no-optimize", "--zstdchunked", "--zstdchunked-flavor",
               "containers", f"oci:{src}:t", f"oci:{src}:zc")
    assert done.returncode == 0, done.stderr
    ok = cli("verify", f"oci:{src}:zc")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    return src


def _edit(layout: Path, edit_manifest: Any = None, edit_config: Any = None) -> None:
    """Rewrite the manifest tagged zc (and its config) in place, tagged zc again."""
    mdesc = resolve_tag(layout, "zc")
    manifest = read_json(layout, mdesc["digest"])
    if edit_config:
        config = read_json(layout, manifest["config"]["digest"])
        edit_config(config)
        digest, size = put_json(layout, config)
        manifest["config"].update(digest=digest, size=size)
    if edit_manifest:
        edit_manifest(manifest)
    digest, size = put_json(layout, manifest)
    tag_descriptor(layout, "zc", {**mdesc, "digest": digest, "size": size})


def _verify_fails(layout: Path, reason: str) -> None:
    done = cli("verify", f"oci:{layout}:zc")
    assert done.returncode != 0
    assert reason in done.stdout + done.stderr, done.stdout + done.stderr


def test_verify_refuses_both_annotations(image: Path) -> None:
    def add(m: dict[str, Any]) -> None:
        m["layers"][0]["annotations"][STARGZ_TOC] = "sha256:" + "0" * 64

    _edit(image, edit_manifest=add)
    _verify_fails(image, "c/storage refuses such a layer")


def test_verify_refuses_a_wrong_diffid(image: Path) -> None:
    def wrong(c: dict[str, Any]) -> None:
        c["rootfs"]["diff_ids"][0] = "sha256:" + "1" * 64

    _edit(image, edit_config=wrong)
    _verify_fails(image, "DiffID")


def test_verify_refuses_a_tarsplit_that_disagrees_with_the_toc(image: Path) -> None:
    """A blob whose TOC says another mode for one file, consistent in every other way
    (TOC digest, footer, annotations): only the tar-split comparison can catch it."""
    mdesc = resolve_tag(image, "zc")
    manifest = read_json(image, mdesc["digest"])
    layer = manifest["layers"][0]
    path = blob_path(image, layer["digest"])
    with open(path, "rb") as f:
        parsed = open_containers_layer(f)
    entries = parsed.entries
    next(e for e in entries if e["name"] == "data/x")["mode"] = 0o777
    toc = zchunked.toc_json(entries, parsed.toc["tarSplitDigest"])
    ctoc = zstandard.ZstdCompressor().compress(toc)
    payload = path.read_bytes()[: parsed.footer.toc_offset - 8]
    tail, ann = zchunked.tail_frames(
        len(payload), ctoc, len(toc), parsed.tarsplit_raw, parsed.footer.tarsplit_plain_size
    )
    blob = payload + tail
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    blob_path(image, digest).write_bytes(blob)

    def swap(m: dict[str, Any]) -> None:
        m["layers"][0].update(digest=digest, size=len(blob), annotations=ann)

    _edit(image, edit_manifest=swap)
    _verify_fails(image, "TOC and tar-split disagree on mode of 'data/x'")


def test_verify_refuses_a_toc_over_the_limit(
    converted: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """A footer stating a TOC over 150 MiB: c/storage pulls such a layer whole."""
    blob, summary = converted
    data = bytearray(blob.read_bytes())
    footer = zchunked.FooterData.parse(bytes(data[-zchunked.FOOTER_SIZE:]))
    big = zchunked.FooterData(footer.toc_offset, footer.toc_size, 151 << 20,
                              footer.manifest_type, footer.tarsplit_offset,
                              footer.tarsplit_size, footer.tarsplit_plain_size)
    data[-zchunked.FOOTER_SIZE:] = big.to_bytes()
    (tmp_path / "blob").write_bytes(data)
    ann = {**summary["annotations"], zchunked.MANIFEST_POSITION: big.manifest_position()}
    errors = verify_containers_layer(tmp_path / "blob", ann, None).errors
    assert len(errors) == 1 and "over c/storage's 157286400-byte limit" in errors[0], errors


def _layer_digests(layout: Path, tag: str) -> list[str]:
    manifest = read_json(layout, resolve_tag(layout, tag)["digest"])
    return [layer["digest"] for layer in manifest["layers"]]


def test_reuse_keeps_containers_layers_only(image: Path) -> None:
    """--reuse keeps a sound containers-flavour layer; a stargz-flavour one is converted."""
    kept = cli("optimize", "--oci", "--no-optimize", "--reuse", *CONTAINERS[2:], "--zstdchunked",
               f"oci:{image}:zc", f"oci:{image}:again")
    assert kept.returncode == 0, kept.stderr
    assert _layer_digests(image, "again") == _layer_digests(image, "zc")
    stargz = cli("optimize", "--oci", "--no-optimize", "--zstdchunked", f"oci:{image}:t",
                 f"oci:{image}:sz")
    assert stargz.returncode == 0, stargz.stderr
    redone = cli("optimize", "--oci", "--no-optimize", "--reuse", *CONTAINERS[2:],
                 "--zstdchunked", f"oci:{image}:sz", f"oci:{image}:redone")
    assert redone.returncode == 0, redone.stderr
    (digest,) = _layer_digests(image, "redone")
    assert digest != _layer_digests(image, "sz")[0]
    assert blob_path(image, digest).read_bytes()[-8:] == b"GNUlInUx"


def test_verify_names_a_truncated_blob(
    converted: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    blob, summary = converted
    (tmp_path / "blob").write_bytes(blob.read_bytes()[:-10])
    errors = verify_containers_layer(tmp_path / "blob", summary["annotations"], None).errors
    assert errors and all("\n" not in e for e in errors), errors


def test_non_utf8_names_are_refused_in_one_line(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT,
                      encoding="latin-1") as t:
        ti = tarfile.TarInfo("caf\xe9")
        t.addfile(ti, io.BytesIO(b""))
    (tmp_path / "in.tar").write_bytes(buf.getvalue())
    done = cli("layer", "convert", *CONTAINERS, tmp_path / "in.tar", tmp_path / "out")
    assert done.returncode != 0 and not (tmp_path / "out").exists()
    assert "is not UTF-8" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("entry", [["not", "an", "object"], {"name": "x", "offset": "12"}])
def test_verify_names_a_malformed_toc(
    converted: tuple[Path, dict[str, Any]], tmp_path: Path, entry: Any
) -> None:
    blob, _ = converted
    with open(blob, "rb") as f:
        parsed = open_containers_layer(f)
    toc = zchunked.toc_json([*parsed.entries, entry], parsed.toc["tarSplitDigest"])
    payload = blob.read_bytes()[: parsed.footer.toc_offset - 8]
    tail, ann = zchunked.tail_frames(len(payload), zstandard.ZstdCompressor().compress(toc),
                                     len(toc), parsed.tarsplit_raw,
                                     parsed.footer.tarsplit_plain_size)
    (tmp_path / "blob").write_bytes(payload + tail)
    errors = verify_containers_layer(tmp_path / "blob", ann, None).errors
    assert len(errors) == 1 and "TOC entry" in errors[0], errors
