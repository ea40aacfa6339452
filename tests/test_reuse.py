"""--reuse keeps layers that are already sound eStargz and have no prioritized files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support.cli import cli_argv
from support.imagefactory import (
    all_layer_descriptors,
    blob_path,
    simple_layer,
    write_layout,
)

CLI = cli_argv()


def optimize(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "optimize", *args], capture_output=True, text=True)


def layer_digests(layout: Path, tag: str) -> list[str]:
    return [layer["digest"] for _m, layer in all_layer_descriptors(layout, tag)]


@pytest.fixture
def esgz_image(tmp_path: Path) -> Path:
    """An image converted once: two eStargz layers with annotations."""
    src = tmp_path / "src"
    write_layout(src, "t", [
        simple_layer({"a/": None, "a/one": b"1" * 5000}),
        simple_layer({"b/": None, "b/two": b"2" * 7000}),
    ])
    done = optimize("--oci", "--no-optimize", f"oci:{src}:t", f"oci:{src}:esgz")
    assert done.returncode == 0, done.stderr
    return src


def test_reuse_keeps_sound_layers(esgz_image: Path) -> None:
    """At another compression level a rebuild changes the bytes; a reused layer does not."""
    before = layer_digests(esgz_image, "esgz")
    args = ("--oci", "--no-optimize", "--estargz-compression-level", "1")
    done = optimize(*args, "--reuse", f"oci:{esgz_image}:esgz", f"oci:{esgz_image}:again")
    assert done.returncode == 0, done.stderr
    assert layer_digests(esgz_image, "again") == before
    done = optimize(*args, f"oci:{esgz_image}:esgz", f"oci:{esgz_image}:rebuilt")
    assert done.returncode == 0, done.stderr
    rebuilt = layer_digests(esgz_image, "rebuilt")
    assert all(a != b for a, b in zip(rebuilt, before, strict=True))


def test_reuse_rebuilds_layers_with_prioritized_files(esgz_image: Path, tmp_path: Path) -> None:
    before = layer_digests(esgz_image, "esgz")
    index = json.loads((esgz_image / "index.json").read_text())
    manifest = next(m for m in index["manifests"]
                    if m["annotations"]["org.opencontainers.image.ref.name"] == "esgz")
    record = tmp_path / "rec.jsonl"
    record.write_text(json.dumps({"path": "b/two", "manifestDigest": manifest["digest"],
                                  "layerIndex": 1}) + "\n")
    done = optimize("--oci", "--reuse", "--record-in", str(record), f"oci:{esgz_image}:esgz",
                    f"oci:{esgz_image}:rec")
    assert done.returncode == 0, done.stderr
    after = layer_digests(esgz_image, "rec")
    assert after[0] == before[0]  # no records: kept
    assert after[1] != before[1]  # records: rebuilt with b/two first
    toc = subprocess.run([*CLI, "layer", "toc", str(blob_path(esgz_image, after[1]))],
                         capture_output=True, text=True, check=True).stdout
    names = [e["name"] for e in json.loads(toc)["entries"]]
    assert names[: names.index(".prefetch.landmark")] == ["b/", "b/two"]


def test_reuse_refuses_a_layer_whose_chunk_is_corrupt(esgz_image: Path, tmp_path: Path) -> None:
    """A blob that fails chunk verification is not kept, even with a valid TOC digest."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(esgz_image), str(copy)], check=True)
    before = layer_digests(copy, "esgz")
    # Flip a byte in the first chunk of layer 0 and re-point the manifest at the new bytes.
    path = blob_path(copy, before[0])
    data = bytearray(path.read_bytes())
    toc = json.loads(subprocess.run([*CLI, "layer", "toc", str(path)], capture_output=True,
                                    text=True, check=True).stdout)
    first = next(e for e in toc["entries"] if e["name"] == "a/one")
    data[first["offset"] + 12] ^= 0xFF
    _rewrite_layer(copy, "esgz", before[0], bytes(data))
    done = optimize("--oci", "--no-optimize", "--reuse", f"oci:{copy}:esgz", f"oci:{copy}:fixed")
    # The corrupt gzip member cannot be decompressed: the layer is not reusable and its
    # conversion reports the damage instead of passing it on.
    assert done.returncode != 0
    assert "corrupt" in done.stderr or "gzip" in done.stderr
    assert "fixed" not in (copy / "index.json").read_text()


def _rewrite_layer(layout: Path, tag: str, old: str, data: bytes) -> None:
    import hashlib

    new = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_path(layout, new).write_bytes(data)
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m["annotations"]["org.opencontainers.image.ref.name"] != tag:
            continue
        manifest = json.loads(blob_path(layout, m["digest"]).read_bytes())
        for layer in manifest["layers"]:
            if layer["digest"] == old:
                layer["digest"], layer["size"] = new, len(data)
        raw = json.dumps(manifest).encode()
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        blob_path(layout, digest).write_bytes(raw)
        m["digest"], m["size"] = digest, len(raw)
    (layout / "index.json").write_text(json.dumps(index))
