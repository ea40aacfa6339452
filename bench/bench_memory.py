#!/usr/bin/env python3
"""Peak memory of ``estargz-opt layer convert`` on one ~2 GiB layer.

The layer is generated deterministically (seeded PRNG; fixed mtimes and owners;
sorted, docker-style entries) and cached, as .tar and .tar.gz, under
/var/cache/estargz-opt/bench/memory/.  It mixes what real layers hold:
  big/     one 640 MiB incompressible file and one 512 MiB text-like file
  mixed/   64 x 8 MiB files: text, random, and half/half (each spans several chunks)
  small/   40,000 files of 0-16 KiB in 200 directories (a large TOC)
  links/   symlinks and hard links to files above
Each format is converted once from the .tar.gz (and/or the .tar), timed, and its peak
RSS (wait4() of the child) compared with the 200 MiB target.

--case zeros measures what compresses 1000:1 instead: a ~2 MiB tar.gz holding one
2 GiB zero-filled file. Each format is converted from it, then `layer tar` of the result
to /dev/null and `layer verify` of it are measured too; all must stay under the target
(memory follows a fixed buffer size, not the compression ratio).

--case registry measures `optimize docker://… docker://…` on an image whose one layer is
a 2 GiB uncompressed tar of incompressible bytes, in Debian's docker-registry on
loopback: 2 GiB are downloaded, converted (estargz, gzip level 9) and ~2 GiB uploaded,
all streamed (temporary files, never whole blobs in memory).

Usage: python3 bench/bench_memory.py [--case mixed|zeros|registry]
       [--formats estargz,zstdchunked,estargz-external-toc]
       [--input gz|tar|both] [--name NAME] [--check] [--rebuild]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from benchlib import CACHE_DIR, REPO_ROOT, RESULTS_DIR, MiB, log, run_measured, sha256_file

MEM_DIR = CACHE_DIR / "memory"
TAR = MEM_DIR / "layer-2g.tar"
TGZ = MEM_DIR / "layer-2g.tar.gz"
META = MEM_DIR / "layer-2g.json"
GENERATOR_VERSION = 1  # bump when the content recipe changes: the cache is rebuilt
SEED = 20240101
MTIME = 1704067200  # 2024-01-01T00:00:00Z
TARGET_RSS_MIB = 200
FORMATS = ("estargz", "zstdchunked", "estargz-external-toc")


# --------------------------------------------------------------------------- generator


def make_corpus(rng: random.Random, size: int) -> bytes:
    """Text-like bytes: lines of words from a fixed pseudo-vocabulary (compresses ~3:1)."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [26 - i for i in range(26)]
    vocab = ["".join(rng.choices(letters, weights, k=rng.randint(2, 11))) for _ in range(6000)]
    vocab += ["{", "}", "(", ")", "=", "return", "def", "import", "0", "1", "self", "None"]
    out: list[str] = []
    n = 0
    while n < size:
        indent = " " * (4 * rng.randint(0, 3))
        line = indent + " ".join(rng.choices(vocab, k=rng.randint(1, 14))) + "\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


class GenReader:
    """A file-like object yielding ``size`` deterministic bytes of one kind."""

    def __init__(self, size: int, kind: str, seed: str, corpus: bytes):
        self.left = size
        self.kind = kind
        self.rng = random.Random(seed)
        self.corpus = corpus
        self.pos = 0

    def _text(self, n: int) -> bytes:
        off = self.rng.randrange(len(self.corpus) - n)
        return self.corpus[off:off + n]

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self.left:
            n = self.left
        if n == 0:
            return b""
        if self.kind == "zeros":
            data = bytes(n)
        elif self.kind == "random":
            data = self.rng.randbytes(n)
        elif self.kind == "text":
            data = b"".join(self._text(min(n - i, 16384)) for i in range(0, n, 16384))
        else:  # "half": alternate 1 MiB of text and 1 MiB of random bytes
            parts = []
            done = 0
            while done < n:
                in_block = (self.pos + done) % MiB
                take = min(n - done, MiB - in_block)
                if ((self.pos + done) // MiB) % 2 == 0:
                    parts.append(b"".join(self._text(min(take - i, 16384))
                                          for i in range(0, take, 16384)))
                else:
                    parts.append(self.rng.randbytes(take))
                done += take
            data = b"".join(parts)
        self.pos += n
        self.left -= n
        return data


def _ti(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, size: int = 0,
        uid: int = 0, gid: int = 0, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.mtime = kind, mode, size, MTIME
    ti.uid, ti.gid, ti.uname, ti.gname, ti.linkname = uid, gid, "", "", linkname
    return ti


def generate(tar_path: Path) -> dict:
    rng = random.Random(SEED)
    corpus = make_corpus(rng, 8 * MiB)
    stats = {"entries": 0, "files": 0, "bytes": 0}
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.copybufsize = 1 * MiB

        def d(name: str) -> None:
            tar.addfile(_ti(name, tarfile.DIRTYPE, 0o755))
            stats["entries"] += 1

        def f(name: str, size: int, kind: str, mode: int = 0o644, uid: int = 0) -> None:
            tar.addfile(_ti(name, size=size, mode=mode, uid=uid, gid=uid),
                        GenReader(size, kind, f"{SEED}:{name}", corpus))
            stats["entries"] += 1
            stats["files"] += 1
            stats["bytes"] += size

        d("big")
        f("big/blob.bin", 640 * MiB, "random")
        f("big/log.txt", 512 * MiB, "text")

        d("links")
        tar.addfile(_ti("links/blob-hardlink", tarfile.LNKTYPE, linkname="big/blob.bin"))
        tar.addfile(_ti("links/log-symlink", tarfile.SYMTYPE, 0o777, linkname="../big/log.txt"))
        for i in range(0, 40, 4):
            tar.addfile(_ti(f"links/small-{i:02d}", tarfile.SYMTYPE, 0o777,
                            linkname=f"../small/d{i:03d}/f00000.txt"))
        stats["entries"] += 12

        d("mixed")
        kinds = ("text", "random", "half")
        for i in range(64):
            f(f"mixed/part-{i:03d}.dat", 8 * MiB, kinds[i % 3])

        d("small")
        srng = random.Random(f"{SEED}:small")
        for dn in range(200):
            d(f"small/d{dn:03d}")
            for fn in range(200):
                size = 0 if srng.random() < 0.02 else srng.randint(1, 16 * 1024)
                kind = "random" if srng.random() < 0.15 else "text"
                f(f"small/d{dn:03d}/f{fn:05d}.txt", size, kind, 0o755 if fn % 50 == 0 else 0o644,
                  uid=1000 if dn % 10 == 0 else 0)
    stats["tar_size"] = tar_path.stat().st_size
    return stats


def ensure_layer(rebuild: bool = False) -> dict:
    if not rebuild and META.exists() and TAR.exists() and TGZ.exists():
        meta = json.loads(META.read_text())
        if meta.get("generator_version") == GENERATOR_VERSION and \
                meta.get("tar_size") == TAR.stat().st_size and \
                meta.get("gz_size") == TGZ.stat().st_size:
            return meta
    MEM_DIR.mkdir(parents=True, exist_ok=True)
    META.unlink(missing_ok=True)
    tmp_tar, tmp_gz = TAR.with_suffix(".tar.tmp"), TGZ.with_suffix(".gz.tmp")
    try:
        t0 = time.monotonic()
        log(f"generating the ~2 GiB test layer (seed {SEED}) -> {TAR} ...")
        stats = generate(tmp_tar)
        log(f"  {stats['tar_size'] / MiB:.0f} MiB tar, {stats['entries']} entries"
            f" in {time.monotonic() - t0:.0f} s; gzip -n ...")
        t1 = time.monotonic()
        with open(tmp_gz, "wb") as out:
            subprocess.run(["gzip", "-n", "-c", str(tmp_tar)], stdout=out, check=True)
        log(f"  gzip done in {time.monotonic() - t1:.0f} s")
        meta = {**stats, "generator_version": GENERATOR_VERSION, "seed": SEED,
                "tar": str(TAR), "gz": str(TGZ), "gz_size": tmp_gz.stat().st_size,
                "diffID": sha256_file(tmp_tar), "digest": sha256_file(tmp_gz)}
        os.replace(tmp_tar, TAR)
        os.replace(tmp_gz, TGZ)
        benchlib.write_json_atomic(META, meta)
        return meta
    finally:
        tmp_tar.unlink(missing_ok=True)
        tmp_gz.unlink(missing_ok=True)


ZEROS_TGZ = MEM_DIR / "zeros-2g.tar.gz"
ZEROS_SIZE = 2 << 30


def ensure_zeros(rebuild: bool = False) -> Path:
    """The zero-filled layer: one 2 GiB file of zeros, gzip -9 (about 2 MiB)."""
    if ZEROS_TGZ.exists() and not rebuild:
        return ZEROS_TGZ
    MEM_DIR.mkdir(parents=True, exist_ok=True)
    tmp = ZEROS_TGZ.with_suffix(".gz.tmp")
    try:
        with tarfile.open(tmp, "w:gz", compresslevel=9, format=tarfile.PAX_FORMAT) as tar:
            tar.copybufsize = 1 * MiB
            tar.addfile(_ti("zeros.bin", size=ZEROS_SIZE),
                        GenReader(ZEROS_SIZE, "zeros", "", b""))
        os.replace(tmp, ZEROS_TGZ)
    finally:
        tmp.unlink(missing_ok=True)
    return ZEROS_TGZ


def run_zeros(cli: list[str], formats: list[str], name: str, check: bool, rebuild: bool) -> int:
    """convert, tar and verify of the zero-filled layer, one row each per format."""
    src = ensure_zeros(rebuild)
    log(f"layer: {ZEROS_SIZE / MiB:.0f} MiB of zeros in {src.stat().st_size / MiB:.1f} MiB"
        f" of gzip ({src})")
    results = []
    with benchlib.temp_dir("eo-bench-mem-", "/var/tmp") as tmp:
        for fmt in formats:
            out = tmp / f"out.{fmt}"
            toc = out.with_name(out.name + ".toc")
            steps = [("convert", [*cli, "layer", "convert", src, out, "--format", fmt])]
            extra = ["--toc", toc] if fmt == "estargz-external-toc" else []
            steps.append(("tar", [*cli, "layer", "tar", out, "/dev/null", *extra]))
            steps.append(("verify", [*cli, "layer", "verify", out, *extra]))
            for step, cmd in steps:
                log(f"estargz-opt layer {step} ({fmt}) ...")
                m = run_measured(cmd).check()
                row = {**m.as_dict(), "format": fmt, "step": step,
                       "within_target": m.maxrss_mib <= TARGET_RSS_MIB}
                results.append(row)
                log(f"  {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s CPU, peak RSS"
                    f" {m.maxrss_mib:.0f} MiB")
            for p in (out, toc):
                p.unlink(missing_ok=True)
    rows = [[r["format"], f"layer {r['step']}", f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
             f"{ZEROS_SIZE / 1e6 / r['wall_s']:.0f}", f"{r['maxrss_mib']:.0f}",
             "yes" if r["within_target"] else "NO"] for r in results]
    text = (f"Peak memory on one 2 GiB zero-filled file ({src.stat().st_size / MiB:.1f} MiB"
            f" gzip); {os.cpu_count()} CPUs\n\n" + benchlib.markdown_table(
                ["format", "command", "wall s", "CPU s", "MB/s (plain)", "peak RSS MiB",
                 f"<= {TARGET_RSS_MIB} MiB"], rows))
    report = {"name": name, "case": "zeros", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "target_rss_mib": TARGET_RSS_MIB, "results": results, "table": text,
              "loadavg_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    path = RESULTS_DIR / f"{name}.json"
    benchlib.write_json_atomic(path, report)
    print(text)
    print(f"\nresults: {path.relative_to(REPO_ROOT)}")
    return 1 if check and not all(r["within_target"] for r in results) else 0


# --------------------------------------------------------------------------- registry

RANDOM_TAR = MEM_DIR / "random-2g.tar"


def ensure_random_tar(rebuild: bool = False) -> Path:
    """One 2 GiB file of seeded random bytes, as an uncompressed tar (a layer blob)."""
    if RANDOM_TAR.exists() and not rebuild:
        return RANDOM_TAR
    MEM_DIR.mkdir(parents=True, exist_ok=True)
    tmp = RANDOM_TAR.with_suffix(".tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.copybufsize = 1 * MiB
            tar.addfile(_ti("random.bin", size=ZEROS_SIZE),
                        GenReader(ZEROS_SIZE, "random", str(SEED), b""))
        os.replace(tmp, RANDOM_TAR)
    finally:
        tmp.unlink(missing_ok=True)
    return RANDOM_TAR


def _layout_with_layer(layout: Path, layer: Path) -> None:
    """An OCI layout whose one image has `layer` (uncompressed tar) as its layer; the blob
    is a hard link (or copy) of the cached tar."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    digest = sha256_file(layer)
    try:
        os.link(layer, blobs / digest.split(":")[1])
    except OSError:
        subprocess.run(["cp", str(layer), str(blobs / digest.split(":")[1])], check=True)

    def put(doc: dict) -> dict:
        data = json.dumps(doc, separators=(",", ":")).encode()
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        (blobs / d.split(":")[1]).write_bytes(data)
        return {"digest": d, "size": len(data)}

    config = put({"architecture": "amd64", "os": "linux",
                  "rootfs": {"type": "layers", "diff_ids": [digest]}})
    manifest = put({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                "digest": digest, "size": layer.stat().st_size}]})
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
        "annotations": {"org.opencontainers.image.ref.name": "1"}}]}))


def run_registry(cli: list[str], name: str, check: bool, rebuild: bool) -> int:
    """optimize registry -> registry of the 2 GiB layer: peak RSS against the target."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from support import lazypull  # the tests' registry helper

    layer = ensure_random_tar(rebuild)
    log(f"layer: {layer.stat().st_size / MiB:.0f} MiB uncompressed tar ({layer})")
    with benchlib.temp_dir("eo-bench-memreg-", "/var/tmp") as tmp:
        registry = lazypull.Registry.start(tmp)
        try:
            layout = tmp / "layout"
            _layout_with_layer(layout, layer)
            src, dst = f"docker://{registry.host}/mem:1", f"docker://{registry.host}/mem:esgz"
            log("skopeo copy of the source image into the registry ...")
            benchlib.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:1", src])
            log("estargz-opt optimize docker://… docker://… ...")
            m = run_measured([*cli, "optimize", "--oci", "--no-optimize", "--no-cache",
                              "--src-tls-verify=false", "--dest-tls-verify=false", src,
                              dst]).check()
            verify = run_measured([*cli, "verify", "--tls-verify=false", dst]).check()
        finally:
            registry.stop()
    rows = [["optimize (registry -> registry)", f"{m.wall_s:.1f}", f"{m.cpu_s:.1f}",
             f"{m.maxrss_mib:.0f}", "yes" if m.maxrss_mib <= TARGET_RSS_MIB else "NO"],
            ["verify docker://", f"{verify.wall_s:.1f}", f"{verify.cpu_s:.1f}",
             f"{verify.maxrss_mib:.0f}", "yes" if verify.maxrss_mib <= TARGET_RSS_MIB else "NO"]]
    text = (f"Peak memory, registry to registry, one 2 GiB incompressible layer (uncompressed"
            f" tar, estargz level 9); {os.cpu_count()} CPUs\n\n" + benchlib.markdown_table(
                ["command", "wall s", "CPU s", "peak RSS MiB", f"<= {TARGET_RSS_MIB} MiB"],
                rows))
    report = {"name": name, "case": "registry", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "target_rss_mib": TARGET_RSS_MIB, "optimize": m.as_dict(),
              "verify": verify.as_dict(), "table": text,
              "loadavg_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    path = RESULTS_DIR / f"{name}.json"
    benchlib.write_json_atomic(path, report)
    print(text)
    print(f"\nresults: {path.relative_to(REPO_ROOT)}")
    ok = m.maxrss_mib <= TARGET_RSS_MIB and verify.maxrss_mib <= TARGET_RSS_MIB
    return 1 if check and not ok else 0


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=("mixed", "zeros", "registry"), default="mixed",
                    help="the mixed 2 GiB layer (default), one 2 GiB zero-filled file, or a "
                    "2 GiB layer registry -> registry")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--input", choices=("gz", "tar", "both"), default="gz",
                    help="convert the .tar.gz (default), the .tar, or both")
    ap.add_argument("--name", default=None, help="results name (default memory-<timestamp>)")
    ap.add_argument("--check", action="store_true",
                    help=f"exit 1 if any peak RSS exceeds {TARGET_RSS_MIB} MiB")
    ap.add_argument("--rebuild", action="store_true", help="regenerate the cached layer")
    ap.add_argument("--wait-cli", type=float, default=0,
                    help="seconds to wait for `estargz-opt layer convert` to exist")
    ap.add_argument("--wait-idle", type=float, default=0,
                    help="wait up to this many seconds for the 1-min load average to drop"
                    " below 0.5 before measuring")
    args = ap.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for fmt in formats:
        if fmt not in FORMATS:
            ap.error(f"unknown format {fmt!r}")
    name = args.name or time.strftime("memory-%Y%m%d-%H%M%S")
    benchlib.install_signal_handlers()
    if args.case == "zeros":
        local = Path(sys.executable).parent / "estargz-opt"
        cli = [str(local)] if local.exists() else benchlib.estargz_opt_cmd()
        return run_zeros(cli, formats, name + "-zeros" if not args.name else name,
                         args.check, args.rebuild)
    if args.case == "registry":
        local = Path(sys.executable).parent / "estargz-opt"
        cli = [str(local)] if local.exists() else benchlib.estargz_opt_cmd()
        return run_registry(cli, name + "-registry" if not args.name else name, args.check,
                            args.rebuild)

    meta = ensure_layer(args.rebuild)
    log(f"layer: {meta['tar_size'] / MiB:.0f} MiB tar, {meta['gz_size'] / MiB:.0f} MiB gzip,"
        f" {meta['entries']} entries ({MEM_DIR})")
    if not benchlib.wait_for("`estargz-opt layer convert`", benchlib.cli_layer_convert_ready,
                             args.wait_cli):
        raise SystemExit("`estargz-opt layer convert --help` does not work; "
                         "pip install -e '.[test]' first")
    if args.wait_idle:
        benchlib.wait_for("the machine to be idle (1-min load < 0.5)",
                          lambda: os.getloadavg()[0] < 0.5, args.wait_idle, every_s=10)
    local = Path(sys.executable).parent / "estargz-opt"  # skip a pyenv shim's start-up
    cli = [str(local)] if local.exists() else benchlib.estargz_opt_cmd()
    inputs = {"gz": [TGZ], "tar": [TAR], "both": [TGZ, TAR]}[args.input]

    results = []
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    with benchlib.temp_dir("eo-bench-mem-", "/var/tmp") as tmp:
        for src in inputs:
            for fmt in formats:
                out = tmp / f"out.{fmt}"
                log(f"estargz-opt layer convert {src.name} --format {fmt} ...")
                m = run_measured([*cli, "layer", "convert", src, out, "--format", fmt]).check()
                info = json.loads(m.stdout)
                toc = out.with_name(out.name + ".toc")
                row = {**m.as_dict(), "format": fmt, "input": src.name,
                       "size": out.stat().st_size,
                       "toc_size": toc.stat().st_size if toc.exists() else None,
                       "digest": info.get("digest"), "tocDigest": info.get("tocDigest"),
                       "uncompressedSize": info.get("uncompressedSize"),
                       "within_target": m.maxrss_mib <= TARGET_RSS_MIB}
                results.append(row)
                log(f"  {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s CPU, peak RSS"
                    f" {m.maxrss_mib:.0f} MiB, {row['size'] / MiB:.0f} MiB out")
                for p in (out, toc):
                    p.unlink(missing_ok=True)

    rows = [[r["format"], r["input"], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
             f"{meta['tar_size'] / 1e6 / r['wall_s']:.0f}",
             f"{r['maxrss_mib']:.0f}", f"{r['size'] / MiB:.0f} MiB",
             "yes" if r["within_target"] else "NO"] for r in results]
    head = (f"Peak memory of `estargz-opt layer convert`, one layer of"
            f" {meta['tar_size'] / MiB:.0f} MiB ({meta['entries']} entries,"
            f" {meta['gz_size'] / MiB:.0f} MiB gzip); {os.cpu_count()} CPUs")
    table = benchlib.markdown_table(
        ["format", "input", "wall s", "CPU s", "MB/s (tar)", "peak RSS MiB", "output",
         f"<= {TARGET_RSS_MIB} MiB"], rows)
    text = f"{head}\n\n{table}"
    if loadavg_start[0] >= 1.0:
        text += (f"\n\n- WARNING: the machine was busy (1-min load {loadavg_start[0]:.1f} at"
                 " the start): times are inflated; peak RSS is not affected.")
    report = {"name": name, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "layer": meta, "target_rss_mib": TARGET_RSS_MIB, "results": results,
              "loadavg_start": loadavg_start, "cpus": os.cpu_count(), "table": text,
              "command": [*cli, "layer", "convert", "SRC", "OUT", "--format", "F"]}
    path = RESULTS_DIR / f"{name}.json"
    benchlib.write_json_atomic(path, report)
    print(text)
    print(f"\nresults: {path.relative_to(REPO_ROOT)}")
    if args.check and not all(r["within_target"] for r in results):
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        log(f"error: {e}")
        sys.exit(1)
