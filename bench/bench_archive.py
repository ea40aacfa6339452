#!/usr/bin/env python3
"""Peak memory of converting a 2 GiB layer that lives in an image archive.

`docker save` keeps layers as plain tars, so the case is a docker archive holding one
2 GiB uncompressed layer (bench_memory.py's zero-filled file, decompressed once into the
archive). Measured, each against the 200 MiB target: `optimize --oci --no-optimize
--no-cache docker-archive:SAVED oci-archive:OUT:v1` (the layer is read in place, copied
once to a temporary file for the format engine, and the output archive streamed at the
end), then `verify` of the output archive. The archive is rebuilt in a temporary
directory under /var/tmp each run (about 4 GiB of disk while it runs).

Usage: python3 bench/bench_archive.py [--name NAME] [--check]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from bench_layers import our_cli
from bench_memory import TARGET_RSS_MIB, ensure_zeros
from benchlib import NO_CACHE, REPO_ROOT, RESULTS_DIR, MiB, log, run_measured


def docker_archive(layer_tgz: Path, work: Path) -> Path:
    """A docker archive (manifest.json, config, one plain layer tar) of the layer."""
    plain = work / "layer.tar"
    h = hashlib.sha256()
    with gzip.open(layer_tgz, "rb") as src, open(plain, "wb") as dst:
        while block := src.read(MiB):
            h.update(block)
            dst.write(block)
    diff_id = "sha256:" + h.hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["bench/zeros:1"],
                            "Layers": ["layer/layer.tar"]}]).encode()
    out = work / "saved.tar"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("manifest.json", manifest), ("config.json", config)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.add(plain, arcname="layer/layer.tar")
    plain.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default=None)
    ap.add_argument("--check", action="store_true", help="exit 1 above the RSS target")
    args = ap.parse_args(argv)
    name = args.name or time.strftime("archive-%Y%m%d-%H%M%S")
    benchlib.install_signal_handlers()
    cli = our_cli()
    rows, results = [], {}
    with benchlib.temp_dir("eo-bench-arch-", "/var/tmp") as work:
        log("building a docker archive with one 2 GiB plain layer ...")
        saved = docker_archive(ensure_zeros(), work)
        out = work / "out.tar"
        steps = {
            "optimize docker-archive: → oci-archive:": [
                *cli, "optimize", "--oci", "--no-optimize", *NO_CACHE,
                f"docker-archive:{saved}", f"oci-archive:{out}:v1"],
            "verify oci-archive:": [*cli, "verify", f"oci-archive:{out}:v1"],
        }
        for step, cmd in steps.items():
            log(step)
            m = run_measured(cmd).check()
            results[step] = m.as_dict()
            rows.append([step, f"{m.wall_s:.1f}", f"{m.cpu_s:.1f}", f"{m.maxrss_mib:.0f}"])
        sizes = {"archive_bytes": saved.stat().st_size, "output_bytes": out.stat().st_size}
    table = benchlib.markdown_table(["step", "wall s", "CPU s", "peak RSS MiB"], rows)
    report = {"name": name, "results": results, **sizes, "target_rss_mib": TARGET_RSS_MIB,
              "table": table}
    dest = RESULTS_DIR / f"{name}.json"
    benchlib.write_json_atomic(dest, report)
    print(table)
    print(f"\n{sizes['archive_bytes'] / MiB:.0f} MiB archive -> {sizes['output_bytes'] / MiB:.1f}"
          f" MiB; target {TARGET_RSS_MIB} MiB\nresults: {dest.relative_to(REPO_ROOT)}")
    over = [s for s, r in results.items() if r["maxrss_mib"] > TARGET_RSS_MIB]
    return 1 if args.check and over else 0


if __name__ == "__main__":
    sys.exit(main())
