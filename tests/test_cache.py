"""The converted-layer cache (estargz_opt.cache), through the real CLI on OCI layouts.

Every run is a real `estargz-opt` subprocess; results are checked by manifest digest
against a run without the cache, and by `estargz-opt verify` (every chunk, TOC digest
and DiffID). Faults are real: bytes flipped on disk, a read-only tmpfs, a full tmpfs, a
SIGKILL while an entry is being written.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import Invoked, cli_argv, invoke
from support.imagefactory import simple_layer, write_layout

CLI = cli_argv()
FORMATS = {
    "estargz": [],
    "zstdchunked": ["--zstdchunked"],
    "estargz-external-toc": ["--estargz-external-toc"],
}


def run(*args: str, cache: Path | None = None, check: bool = True) -> Invoked:
    """The CLI in process (the concurrent and killed runs below are child processes)."""
    done = invoke(*args, env={"ESTARGZ_OPT_CACHE_DIR": str(cache)} if cache else None)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def optimize(src: str, dst: str, *flags: str, cache: Path | None = None) -> dict:
    done = run("optimize", "--oci", "--no-optimize", "--json", *flags, src, dst, cache=cache)
    report = json.loads(done.stdout)
    report["stderr"] = done.stderr
    return report


def states(report: dict) -> list[str]:
    return [x["cache"] for x in report["layers"]]


def verify(ref: str) -> None:
    done = run("verify", ref, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "layers").glob("*.meta"))


def blobs(cache: Path) -> list[Path]:
    return sorted((cache / "layers").glob("*.blob"))


def cache_warnings(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if "WARNING" in x and "layer cache" in x]


def tag_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    found = [m["digest"] for m in index["manifests"]
             if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    assert len(found) == 1, index
    return str(found[0])


def noise(n: int, seed: int) -> bytes:
    """Incompressible bytes: a layer of them is as large compressed as it is raw."""
    return random.Random(seed).randbytes(n)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write_layout(src, "t", [
        simple_layer({"a/": None, "a/one": b"1" * 300_000, "a/two": noise(20_000, 1)}),
        simple_layer({"b/": None, "b/three": b"3" * 70_000, "b/four": b"four\n"}),
    ])
    write_layout(src, "rebuilt", [  # the same base layer, a changed top layer
        simple_layer({"a/": None, "a/one": b"1" * 300_000, "a/two": noise(20_000, 1)}),
        simple_layer({"b/": None, "b/three": b"3" * 70_000, "b/four": b"FOUR\n"}),
    ])
    return src


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_hit_gives_the_image_a_cold_run_gives(image: Path, tmp_path: Path, fmt: str) -> None:
    cache = tmp_path / "cache"
    flags = FORMATS[fmt]
    plain = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'plain'}:t", "--no-cache", *flags)
    cold = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'cold'}:t", *flags, cache=cache)
    warm = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'warm'}:t", *flags, cache=cache)
    assert states(plain) == ["off", "off"]
    assert states(cold) == ["miss", "miss"]
    assert states(warm) == ["hit", "hit"]
    assert plain["target"] == cold["target"] == warm["target"]
    assert len(entries(cache)) == 2
    assert warm["stderr"].count("from the layer cache") == 2  # the progress lines
    if fmt == "estargz-external-toc":
        # The TOC image is made from the cached TOC blobs: the same digest too.
        assert tag_digest(tmp_path / "plain", "t-esgztoc") == tag_digest(
            tmp_path / "warm", "t-esgztoc")
    verify(f"oci:{tmp_path / 'warm'}:t")


def test_a_rebuilt_image_converts_only_its_changed_layer(image: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    optimize(f"oci:{image}:t", f"oci:{tmp_path / 'one'}:t", cache=cache)
    rebuilt = optimize(f"oci:{image}:rebuilt", f"oci:{tmp_path / 'two'}:t", cache=cache)
    assert states(rebuilt) == ["hit", "miss"]
    plain = optimize(f"oci:{image}:rebuilt", f"oci:{tmp_path / 'plain'}:t", "--no-cache")
    assert rebuilt["target"] == plain["target"]
    info = json.loads(run("cache", "info", "--json", cache=cache).stdout)
    assert (info["entries"], info["hits"], info["misses"]) == (3, 1, 3)
    assert info["bytes"] == sum(p.stat().st_size for p in (cache / "layers").glob("*.*")
                                if p.suffix in (".meta", ".blob"))


@pytest.mark.parametrize("flags", [
    ["--estargz-compression-level", "6"],
    ["--estargz-chunk-size", "65536"],
    ["--estargz-min-chunk-size", "8192"],
    ["--estargz-external-toc"],
    ["--zstdchunked"],
    ["--prefetch-list", "LIST"],
], ids=["level", "chunk-size", "min-chunk-size", "external-toc", "format", "prioritized"])
def test_a_changed_option_or_list_is_a_miss(image: Path, tmp_path: Path, flags: list[str]) -> None:
    cache = tmp_path / "cache"
    optimize(f"oci:{image}:t", f"oci:{tmp_path / 'one'}:t", cache=cache)
    if "LIST" in flags:
        listing = tmp_path / "list"
        listing.write_text("b/four\n")
        flags = ["--prefetch-list", str(listing)]
        done = run("optimize", "--oci", "--json", *flags, f"oci:{image}:t",
                   f"oci:{tmp_path / 'two'}:t", cache=cache)
        report = json.loads(done.stdout)
        # Only the layer whose prioritized list changed is converted again.
        assert states(report) == ["hit", "miss"]
        # Another order of the same files is another key as well.
        listing.write_text("b/three\nb/four\n")
        again = run("optimize", "--oci", "--json", *flags, f"oci:{image}:t",
                    f"oci:{tmp_path / 'three'}:t", cache=cache)
        listing.write_text("b/four\nb/three\n")
        other = run("optimize", "--oci", "--json", *flags, f"oci:{image}:t",
                    f"oci:{tmp_path / 'four'}:t", cache=cache)
        assert states(json.loads(again.stdout)) == ["hit", "miss"]
        assert states(json.loads(other.stdout)) == ["hit", "miss"]
        return
    report = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'two'}:t", *flags, cache=cache)
    assert states(report) == ["miss", "miss"]
    again = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'three'}:t", *flags, cache=cache)
    assert states(again) == ["hit", "hit"]
    assert again["target"] == report["target"]


def test_another_engine_version_is_a_miss(image: Path, tmp_path: Path) -> None:
    """A run of an engine whose OUTPUT_VERSION differs uses none of the entries."""
    cache = tmp_path / "cache"
    optimize(f"oci:{image}:t", f"oci:{tmp_path / 'one'}:t", cache=cache)
    code = (
        "import sys, estargz_opt.format as f, estargz_opt.format.build as b\n"
        "f.OUTPUT_VERSION = b.OUTPUT_VERSION = b.OUTPUT_VERSION + 1\n"
        "sys.argv[0] = 'estargz-opt'\n"
        "from estargz_opt._entry import main\n"
        "main()\n"
    )
    env = {**os.environ, "ESTARGZ_OPT_CACHE_DIR": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", code, "optimize", "--oci", "--no-optimize", "--json",
         f"oci:{image}:t", f"oci:{tmp_path / 'two'}:t"],
        capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert states(json.loads(done.stdout)) == ["miss", "miss"]
    assert len(entries(cache)) == 4


@pytest.mark.parametrize("damage", ["flip", "truncate", "metadata"])
def test_a_damaged_entry_is_removed_logged_and_rebuilt(
    image: Path, tmp_path: Path, damage: str
) -> None:
    cache = tmp_path / "cache"
    cold = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'one'}:t", cache=cache)
    blob = max(blobs(cache), key=lambda p: p.stat().st_size)
    original = blob.read_bytes()
    data = bytearray(original)
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        blob.write_bytes(bytes(data))
    elif damage == "truncate":
        blob.write_bytes(bytes(data[:-100]))
    else:
        blob.with_suffix(".meta").write_text("{not json")
    again = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'two'}:t", cache=cache)
    assert sorted(states(again)) == ["hit", "miss"]
    assert again["target"] == cold["target"]
    damaged = [x for x in again["stderr"].splitlines() if "is damaged" in x]
    assert len(damaged) == 1 and blob.stem in damaged[0], again["stderr"]
    verify(f"oci:{tmp_path / 'two'}:t")
    # Rebuilt: the entry is whole again and serves the next run.
    assert blob.read_bytes() == original
    third = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'three'}:t", cache=cache)
    assert states(third) == ["hit", "hit"]
    assert "is damaged" not in third["stderr"]


def test_two_concurrent_runs_on_a_cold_cache_make_one_entry_per_layer(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    write_layout(src, "t", [simple_layer({"big/": None, "big/x": noise(6 << 20, n)})
                            for n in range(3)])
    cache = tmp_path / "cache"
    env = {**os.environ, "ESTARGZ_OPT_CACHE_DIR": str(cache)}
    procs = [
        subprocess.Popen([*CLI, "optimize", "--oci", "--no-optimize", "--json",
                          f"oci:{src}:t", f"oci:{tmp_path / f'out{i}'}:t"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    reports = [json.loads(out) for out, _ in outs]
    assert reports[0]["target"] == reports[1]["target"]
    assert len(entries(cache)) == 3 and len(blobs(cache)) == 3
    # Each layer was converted once: the run that waited for it used the entry.
    every = states(reports[0]) + states(reports[1])
    assert sorted(every) == ["hit"] * 3 + ["miss"] * 3
    for i in range(2):
        verify(f"oci:{tmp_path / f'out{i}'}:t")


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "mnt"
    where.mkdir()
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _mount_tmpfs(where: Path, options: str) -> None:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"mounting a tmpfs needs root: {done.stderr}"


@pytest.mark.root
def test_a_read_only_cache_directory_is_one_warning(image: Path, tmp_path: Path,
                                                     mount_point: Path) -> None:
    _mount_tmpfs(mount_point, "ro,size=1m")
    report = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'out'}:t", cache=mount_point)
    plain = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'plain'}:t", "--no-cache")
    assert states(report) == ["off", "off"]
    assert report["target"] == plain["target"]
    assert len(cache_warnings(report["stderr"])) == 1, report["stderr"]
    assert "Read-only" in cache_warnings(report["stderr"])[0]
    assert [w for w in report["warnings"] if "layer cache" in w] == [
        cache_warnings(report["stderr"])[0].split("WARNING: ", 1)[1]]
    verify(f"oci:{tmp_path / 'out'}:t")


@pytest.mark.root
def test_a_full_cache_filesystem_is_one_warning(tmp_path: Path, mount_point: Path) -> None:
    src = tmp_path / "src"
    write_layout(src, "t", [simple_layer({"x/": None, "x/y": noise(400_000, n)})
                            for n in range(3)])
    _mount_tmpfs(mount_point, "size=256k")
    report = optimize(f"oci:{src}:t", f"oci:{tmp_path / 'out'}:t", cache=mount_point)
    plain = optimize(f"oci:{src}:t", f"oci:{tmp_path / 'plain'}:t", "--no-cache")
    assert report["target"] == plain["target"]
    warnings = cache_warnings(report["stderr"])
    assert len(warnings) == 1 and "No space left" in warnings[0], report["stderr"]
    # A layer filled before the disk was full is an entry; every other one is "off".
    assert states(report).count("miss") == len(entries(mount_point))
    assert "off" in states(report)
    # Nothing half-written is left to be served: every entry present is whole.
    for meta in entries(mount_point):
        assert meta.with_suffix(".blob").stat().st_size == json.loads(meta.read_text())["size"]
    assert not list((mount_point / "layers").glob(".*.tmp"))
    verify(f"oci:{tmp_path / 'out'}:t")


def test_a_run_killed_mid_fill_leaves_nothing_the_next_run_uses(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_layout(src, "t", [simple_layer({"big/": None, "big/x": noise(80 << 20, 7)})])
    cache = tmp_path / "cache"
    env = {**os.environ, "ESTARGZ_OPT_CACHE_DIR": str(cache)}
    proc = subprocess.Popen([*CLI, "optimize", "--oci", "--no-optimize", "--quiet",
                             f"oci:{src}:t", f"oci:{tmp_path / 'one'}:t"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    fills: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        fills = [p for p in (cache / "layers").glob(".fill-*@*.tmp") if p.stat().st_size > 1 << 20]
        if fills:
            break
        time.sleep(0.05)
    assert fills and proc.poll() is None, "the run ended before it filled an entry"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not entries(cache)
    again = optimize(f"oci:{src}:t", f"oci:{tmp_path / 'two'}:t", cache=cache)
    assert states(again) == ["miss"]
    assert not fills[0].exists()  # the killed run's temp file was deleted
    assert "left by a run that was killed" in again["stderr"]
    verify(f"oci:{tmp_path / 'two'}:t")
    assert states(optimize(f"oci:{src}:t", f"oci:{tmp_path / 'three'}:t", cache=cache)) == ["hit"]


def test_a_run_waits_for_a_fill_only_while_it_grows(tmp_path: Path) -> None:
    """A stopped run holding an entry's lock does not hold up the next run for long."""
    src = tmp_path / "src"
    write_layout(src, "t", [simple_layer({"big/": None, "big/x": noise(80 << 20, 8)})])
    cache = tmp_path / "cache"
    env = {**os.environ, "ESTARGZ_OPT_CACHE_DIR": str(cache)}
    a = subprocess.Popen([*CLI, "optimize", "--oci", "--no-optimize", "--json", "--quiet",
                          f"oci:{src}:t", f"oci:{tmp_path / 'a'}:t"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while a.poll() is None and time.monotonic() < deadline and not [
            p for p in (cache / "layers").glob(".fill-*@*.tmp") if p.stat().st_size > 1 << 20
        ]:
            time.sleep(0.05)
        assert a.poll() is None, "A ended before it filled an entry"
        a.send_signal(signal.SIGSTOP)
        b = optimize(f"oci:{src}:t", f"oci:{tmp_path / 'b'}:t", cache=cache)
        assert states(b) == ["off"]
        assert "made no progress" in b["stderr"], b["stderr"]
    finally:
        a.send_signal(signal.SIGCONT)
    out, err = a.communicate(timeout=600)
    assert a.returncode == 0, err
    assert states(json.loads(out)) == ["miss"]
    assert json.loads(out)["target"] == b["target"]
    assert len(entries(cache)) == 1


def test_eviction_keeps_the_recently_used_entries(image: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    other = tmp_path / "other"
    write_layout(other, "t", [simple_layer({"c/": None, "c/x": noise(50_000, 3)})])
    optimize(f"oci:{image}:t", f"oci:{tmp_path / 'one'}:t", cache=cache)
    optimize(f"oci:{other}:t", f"oci:{tmp_path / 'two'}:t", cache=cache)
    time.sleep(0.05)
    optimize(f"oci:{image}:t", f"oci:{tmp_path / 'three'}:t", cache=cache)  # used again
    info = json.loads(run("cache", "info", "--json", cache=cache).stdout)
    assert info["entries"] == 3
    done = run("cache", "prune", "--cache-max-size", str(info["bytes"] - 1), cache=cache)
    assert done.stdout.strip() == "removed 1 entry"
    assert states(optimize(f"oci:{image}:t", f"oci:{tmp_path / 'four'}:t", cache=cache)) == [
        "hit", "hit"]
    assert states(optimize(f"oci:{other}:t", f"oci:{tmp_path / 'five'}:t", cache=cache)) == [
        "miss"]
    # A run's own limit evicts after the run: 0 leaves nothing.
    optimize(f"oci:{image}:t", f"oci:{tmp_path / 'six'}:t", "--cache-max-size", "0",
             cache=cache)
    assert not entries(cache)
    assert run("cache", "prune", "--all", cache=cache).stdout.strip() == "removed 0 entries"


def test_prune_all_empties_the_cache(image: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    optimize(f"oci:{image}:t", f"oci:{tmp_path / 'one'}:t", cache=cache)
    assert run("cache", "prune", "--all", cache=cache).stdout.strip() == "removed 2 entries"
    info = json.loads(run("cache", "info", "--json", cache=cache).stdout)
    assert (info["entries"], info["bytes"], info["hits"], info["misses"]) == (0, 0, 0, 0)


def test_a_destination_holding_the_blob_gets_no_copy(image: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    optimize(f"oci:{image}:t", f"oci:{out}:t", cache=cache)
    before = {p: p.stat().st_ino for p in (out / "blobs" / "sha256").iterdir()}
    for b in blobs(cache):
        b.write_bytes(b"")  # a copy from the cache would now be refused as damaged
    again = optimize(f"oci:{image}:t", f"oci:{out}:t2", cache=cache)
    assert "is damaged" not in again["stderr"]
    assert states(again) == ["hit", "hit"]
    after = {p: p.stat().st_ino for p in before}
    assert before == after


def test_layer_convert_with_a_cache_dir(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    layer.write_bytes(simple_layer({"d/": None, "d/x": b"x" * 100_000}))
    cache = tmp_path / "cache"
    first = run("layer", "convert", "--cache-dir", str(cache), str(layer), str(tmp_path / "a"))
    second = run("layer", "convert", "--cache-dir", str(cache), str(layer), str(tmp_path / "b"))
    plain = run("layer", "convert", str(layer), str(tmp_path / "c"))
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert (a["cache"], b["cache"]) == ("miss", "hit")
    assert a["digest"] == b["digest"] == json.loads(plain.stdout)["digest"]
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == (
        tmp_path / "c").read_bytes()


def test_the_default_directory(tmp_path: Path) -> None:
    from estargz_opt.cache import default_dir

    assert default_dir({"ESTARGZ_OPT_CACHE_DIR": "/x"}) == Path("/x")
    assert default_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/estargz-opt")
    want = Path("/var/cache/estargz-opt") if os.geteuid() == 0 else (
        Path.home() / ".cache" / "estargz-opt")
    assert default_dir({}) == want


def test_usage_errors(image: Path, tmp_path: Path) -> None:
    done = run("optimize", "--oci", "--no-optimize", "--cache-max-size", "lots",
               f"oci:{image}:t", f"oci:{tmp_path / 'x'}:t", check=False)
    assert done.returncode == 2
    assert "is not a size" in done.stderr and "Traceback" not in done.stderr


def test_containerd_uses_the_cache_and_copies_nothing_it_holds(containerd, tmp_path: Path,
                                                               ) -> None:
    """containerd as source and destination: a hit is copied into a namespace that lacks
    the blob, and not even read where containerd already holds it."""
    from support.imagefactory import archive_for_ctr

    cache = tmp_path / "cache"
    layout = tmp_path / "layout"
    write_layout(layout, "v1", [
        simple_layer({"a/": None, "a/one": noise(300_000, 11)}),
        simple_layer({"b/": None, "b/two": b"two\n" * 1000}),
    ])
    name = f"localhost/cachetest-{os.getpid()}:v1"
    archive = archive_for_ctr(layout, "v1", name, tmp_path / "image.tar")
    other_ns = f"cachetest-{os.getpid()}"
    for ns in ("default", other_ns):
        subprocess.run(["ctr", "-a", containerd.address, "-n", ns, "images", "import",
                        "--no-unpack", str(archive)], check=True, capture_output=True)

    def convert(ns: str, dst: str) -> dict:
        done = run("-a", containerd.address, "-n", ns, "optimize", "--oci", "--no-optimize",
                   "--json", name, dst, cache=cache)
        report = json.loads(done.stdout)
        report["stderr"] = done.stderr
        return report

    cold = convert("default", f"{name}-esgz1")
    assert states(cold) == ["miss", "miss"]
    copied = convert(other_ns, f"{name}-esgz")  # the blobs are not in this namespace
    assert states(copied) == ["hit", "hit"] and copied["target"] == cold["target"]
    verify_done = run("-a", containerd.address, "-n", other_ns, "verify", f"{name}-esgz",
                      check=False)
    assert verify_done.returncode == 0, verify_done.stdout + verify_done.stderr
    for b in blobs(cache):
        b.write_bytes(b"")  # reading (copying) one now would be refused as damaged
    held = convert("default", f"{name}-esgz2")
    assert states(held) == ["hit", "hit"] and held["target"] == cold["target"]
    assert "is damaged" not in held["stderr"]
    subprocess.run(["ctr", "-a", containerd.address, "-n", other_ns, "images", "rm",
                    name, f"{name}-esgz"], capture_output=True)
    containerd.ctr("images", "rm", name, f"{name}-esgz1", f"{name}-esgz2")


def test_archives_use_the_cache(image: Path, tmp_path: Path) -> None:
    """oci-archive: and docker-archive: sources and an oci-archive: destination go
    through the same cache: a warm run from each archive is all hits and gives the image
    a cold run gives."""
    cache = tmp_path / "cache"
    archive = tmp_path / "src.tar"
    docker = tmp_path / "docker.tar"
    for dst in (f"oci-archive:{archive}:t", f"docker-archive:{docker}:example.com/app:t"):
        subprocess.run(["skopeo", "copy", "-q", f"oci:{image}:t", dst], check=True,
                       capture_output=True)
    plain = optimize(f"oci-archive:{archive}:t", f"oci-archive:{tmp_path / 'plain.tar'}:t",
                     "--no-cache")
    cold = optimize(f"oci-archive:{archive}:t", f"oci-archive:{tmp_path / 'cold.tar'}:t",
                    cache=cache)
    warm = optimize(f"oci-archive:{archive}:t", f"oci-archive:{tmp_path / 'warm.tar'}:t",
                    cache=cache)
    assert states(plain) == ["off", "off"]
    assert states(cold) == ["miss", "miss"]
    assert states(warm) == ["hit", "hit"]
    assert plain["target"] == cold["target"] == warm["target"]
    verify(f"oci-archive:{tmp_path / 'warm.tar'}:t")
    # skopeo stores docker-archive layers uncompressed: other source digests, other keys;
    # a second run from the same archive is all hits.
    first = optimize(f"docker-archive:{docker}", f"oci:{tmp_path / 'd1'}:t", cache=cache)
    second = optimize(f"docker-archive:{docker}", f"oci:{tmp_path / 'd2'}:t", cache=cache)
    assert states(first) == ["miss", "miss"]
    assert states(second) == ["hit", "hit"]
    assert first["target"] == second["target"]
    verify(f"oci:{tmp_path / 'd2'}:t")


# ----------------------------------------------------------------------------- hostile cache


def _snapshot(tree: Path) -> dict[str, tuple[bytes | str, int, int]]:
    """Content (or link target), atime and mtime of every file under `tree`, unfollowed;
    read with O_NOATIME, so that taking it moves no atime."""
    found = {}
    for path in sorted(tree.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            body: bytes | str = os.readlink(path)
        elif path.is_file():
            fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
            with os.fdopen(fd, "rb") as f:
                body = f.read()
        else:
            body = ""
        found[str(path.relative_to(tree))] = (body, st.st_atime_ns, st.st_mtime_ns)
    return found


def _to_host(path: Path, host: Path) -> Path:
    """Move a cache file out to `host`, symlink it back, and make its atime older than its
    mtime, so that a single read of it (relatime) would move the atime."""
    moved = host / path.name
    path.rename(moved)
    path.symlink_to(moved)
    os.utime(moved, ns=(1_000_000_000 * 10**9, 1_700_000_000 * 10**9))
    return moved


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _plant(cache: Path, host: Path, how: str) -> None:
    """Damage a filled cache the way `how` says; host files go under `host`."""
    layers = cache / "layers"
    metas = entries(cache)
    big = max(metas, key=lambda p: p.with_suffix(".blob").stat().st_size)
    if how == "swapped":  # both entries consistent in themselves, under each other's key
        _swap(metas[0], metas[1])
        _swap(metas[0].with_suffix(".blob"), metas[1].with_suffix(".blob"))
    elif how == "blob-links-to-a-valid-host-blob":
        _to_host(big.with_suffix(".blob"), host)
    elif how == "blob-hardlinks-a-valid-host-blob":
        blob = big.with_suffix(".blob")
        _to_host(blob, host)
        blob.unlink()
        os.link(host / blob.name, blob)
    elif how == "meta-links-to-host":
        _to_host(big, host)
    elif how == "blob-links-to-dev-zero":
        blob = big.with_suffix(".blob")
        blob.unlink()
        blob.symlink_to("/dev/zero")
    elif how == "blob-is-a-fifo":
        blob = big.with_suffix(".blob")
        blob.unlink()
        os.mkfifo(blob)
    elif how == "meta-is-a-directory":
        big.unlink()
        big.mkdir()
    elif how == "locks-link-out":  # a run must not create the link's target
        for meta in metas:
            lock = meta.with_suffix(".lock")
            lock.unlink(missing_ok=True)
            lock.symlink_to(host / f"planted-{meta.stem}")
        (layers / "stats.lock").unlink(missing_ok=True)
        (layers / "stats.lock").symlink_to(host / "planted-stats")
    elif how == "stats-links-to-host":
        _to_host(layers / "stats.json", host)
    elif how == "meta-deep-json":
        big.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "meta-mistyped":
        doc = json.loads(big.read_text())
        big.write_text(json.dumps({**doc, "size": "large", "annotations": ["x"]}))
    elif how == "meta-wrong-size":  # claims a size the blob does not have
        doc = json.loads(big.read_text())
        big.write_text(json.dumps({**doc, "size": doc["size"] + 1}))
    elif how == "stats-garbage":
        (layers / "stats.json").write_bytes(b"\x00\xffnot json" * 100)
    elif how == "stats-deep-and-mistyped":
        (layers / "stats.json").write_text('{"hits": ' + "[" * 50_000 + "]" * 50_000 + "}")
    elif how == "layers-links-to-host":  # a whole valid cache, elsewhere
        layers.rename(host / "layers")
        layers.symlink_to(host / "layers")
        for path in (host / "layers").iterdir():
            os.utime(path, ns=(1_000_000_000 * 10**9, 1_700_000_000 * 10**9),
                     follow_symlinks=False)
    else:
        raise AssertionError(how)


DAMAGE = ["swapped", "blob-links-to-a-valid-host-blob", "blob-hardlinks-a-valid-host-blob",
          "meta-links-to-host",
          "blob-links-to-dev-zero", "blob-is-a-fifo", "meta-is-a-directory", "locks-link-out",
          "stats-links-to-host", "meta-deep-json", "meta-mistyped", "meta-wrong-size",
          "stats-garbage", "stats-deep-and-mistyped", "layers-links-to-host"]


@pytest.mark.parametrize("how", DAMAGE)
def test_whatever_the_cache_holds_the_image_is_a_no_cache_runs(
    image: Path, tmp_path: Path, how: str
) -> None:
    """A damaged, swapped or planted cache never changes the output and never reads,
    writes or touches a file outside it; `cache info` and `prune` survive it."""
    cache, host = tmp_path / "cache", tmp_path / "host"
    host.mkdir()
    (host / "bystander").write_text("not yours")
    os.utime(host / "bystander", ns=(1_000_000_000 * 10**9, 1_700_000_000 * 10**9))
    plain = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'plain'}:t", "--no-cache")
    optimize(f"oci:{image}:t", f"oci:{tmp_path / 'cold'}:t", cache=cache)
    _plant(cache, host, how)
    before = _snapshot(host)
    started = time.monotonic()
    # Into a new layout, and into one that holds both blobs already (nothing is copied
    # there: a swapped entry would give its digest to the wrong layer without a copy).
    fresh = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'fresh'}:t", cache=cache)
    holding = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'cold'}:again", cache=cache)
    assert time.monotonic() - started < 60
    for report in (fresh, holding):
        assert report["target"] == plain["target"], (how, report["stderr"])
        assert "Traceback" not in report["stderr"]
    assert tag_digest(tmp_path / "cold", "again") == plain["target"]
    assert _snapshot(host) == before, how
    assert not list(host.glob("planted-*"))
    verify(f"oci:{tmp_path / 'fresh'}:t")
    verify(f"oci:{tmp_path / 'cold'}:again")
    for args in (["cache", "info", "--json"], ["cache", "prune"], ["cache", "prune", "--all"]):
        done = run(*args, cache=cache, check=False)
        assert "Traceback" not in done.stderr, done.stderr
        if how == "layers-links-to-host":  # refused: the cache is not used at all
            assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
            assert "is a symbolic link" in done.stderr
        else:
            assert done.returncode == 0, done.stderr
    assert _snapshot(host) == before, how
    assert not list((cache / "layers").glob(".*.tmp"))


def test_swapped_entries_never_give_layer_convert_another_layer(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    layers = []
    for n in range(2):
        layers.append(tmp_path / f"{n}.tar")
        layers[n].write_bytes(simple_layer({"d/": None, f"d/{n}": noise(50_000 + n, n)}))
        run("layer", "convert", "--cache-dir", str(cache), str(layers[n]),
            str(tmp_path / f"{n}.cold"))
    metas = entries(cache)
    _swap(metas[0], metas[1])
    _swap(metas[0].with_suffix(".blob"), metas[1].with_suffix(".blob"))
    for n in range(2):
        plain = run("layer", "convert", str(layers[n]), str(tmp_path / f"{n}.plain"))
        warm = run("layer", "convert", "--cache-dir", str(cache), str(layers[n]),
                   str(tmp_path / f"{n}.warm"))
        assert json.loads(warm.stdout)["cache"] == "miss", warm.stderr
        assert "written for another key" in warm.stderr
        assert (tmp_path / f"{n}.warm").read_bytes() == (tmp_path / f"{n}.plain").read_bytes()
        assert json.loads(warm.stdout)["digest"] == json.loads(plain.stdout)["digest"]


def test_a_cache_directory_owned_by_another_user_is_not_used(
    image: Path, tmp_path: Path
) -> None:
    """Its owner could plant entries (as git's safe.directory): one warning, no entry
    read or written; `cache info` and `prune` refuse it in one line."""
    if os.geteuid() != 0:
        pytest.fail("changing a directory's owner needs root")
    cache = tmp_path / "cache"
    plain = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'plain'}:t", "--no-cache")
    optimize(f"oci:{image}:t", f"oci:{tmp_path / 'cold'}:t", cache=cache)
    before = _snapshot(cache)
    for where in (cache, cache / "layers"):
        os.chown(where, 65534, 65534)
        report = optimize(f"oci:{image}:t", f"oci:{tmp_path / ('out-' + where.name)}:t",
                          cache=cache)
        assert states(report) == ["off", "off"]
        assert report["target"] == plain["target"]
        warnings = cache_warnings(report["stderr"])
        assert len(warnings) == 1 and "owned by uid 65534" in warnings[0], report["stderr"]
        for args in (["cache", "info"], ["cache", "prune", "--all"]):
            done = run(*args, cache=cache, check=False)
            assert done.returncode == 1, done.stdout
            assert done.stderr.count("\n") == 1 and "owned by uid 65534" in done.stderr
        os.chown(where, 0, 0)
    assert {k: v[0] for k, v in _snapshot(cache).items()} == {
        k: v[0] for k, v in before.items()}
    # Nothing is made in another user's directory, not even layers/.
    empty = tmp_path / "empty"
    empty.mkdir()
    os.chown(empty, 65534, 65534)
    report = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'out-empty'}:t", cache=empty)
    assert states(report) == ["off", "off"] and report["target"] == plain["target"]
    assert list(empty.iterdir()) == []


def test_a_missing_blob_is_named_missing(image: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'one'}:t", cache=cache)
    blobs(cache)[0].unlink()
    again = optimize(f"oci:{image}:t", f"oci:{tmp_path / 'two'}:t", cache=cache)
    assert again["target"] == cold["target"]
    damaged = [x for x in again["stderr"].splitlines() if "is damaged" in x]
    assert len(damaged) == 1 and "its blob is missing" in damaged[0], again["stderr"]
    assert "-1" not in damaged[0]
