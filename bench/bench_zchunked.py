#!/usr/bin/env python3
"""Containers-flavour zstd:chunked: estargz-opt against skopeo 1.18, side by side, in one run.

On the cached 3-layer Debian test image (bench/build_image.py), OCI layout to OCI layout:
  * reference: ``skopeo copy --dest-compress-format zstd:chunked oci:SRC oci:DST`` with
    Debian trixie's skopeo 1.18, in the trixie root of scripts/trixie-root.sh;
  * ours: ``estargz-opt optimize --oci --no-optimize --no-cache --zstdchunked
    --zstdchunked-flavor containers oci:SRC oci:DST``.
The two alternate (--repeat N); each is timed (wall, user+sys CPU of the child), the
output layers' sizes summed, and our output checked with ``estargz-opt verify``. A
markdown table goes to stdout and the details to bench/results/<name>.json.

Usage: python3 bench/bench_zchunked.py [--repeat N] [--name NAME]
Needs root (the trixie root; building the image the first time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
import build_image
from benchlib import NO_CACHE, REPO_ROOT, RESULTS_DIR, log, run, run_measured

TRIXIE = REPO_ROOT / "scripts" / "trixie-root.sh"


def layers_size(layout: Path) -> int:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][-1]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
    return sum(layer["size"] for layer in manifest["layers"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--name", default="zchunked")
    args = ap.parse_args()
    benchlib.install_signal_handlers()
    run(["bash", TRIXIE])  # builds the root when missing
    image = build_image.ensure_image()
    src_tag = "latest"
    rows: dict[str, list[dict[str, float]]] = {"estargz-opt": [], "skopeo 1.18": []}
    with benchlib.temp_dir("bench-zchunked-") as work:
        shutil.copytree(image["oci_layout"], work / "src", copy_function=os.link)
        env = {**os.environ, "TRIXIE_SHARE": str(work)}
        for attempt in range(args.repeat):
            ours = work / f"ours{attempt}"
            m = run_measured([
                *benchlib.estargz_opt_cmd(), "optimize", "-q", "--oci", "--no-optimize",
                *NO_CACHE, "--zstdchunked", "--zstdchunked-flavor", "containers",
                f"oci:{work}/src:{src_tag}", f"oci:{ours}:zc"]).check()
            rows["estargz-opt"].append({"wall_s": m.wall_s, "cpu_s": m.cpu_s,
                                        "size": layers_size(ours)})
            run([*benchlib.estargz_opt_cmd(), "verify", f"oci:{ours}:zc"])
            m = run_measured(["bash", TRIXIE, "run",
                              f"skopeo copy -q --dest-compress-format zstd:chunked "
                              f"oci:/share/src:{src_tag} oci:/share/sk{attempt}:zc"],
                             env=env).check()
            rows["skopeo 1.18"].append({"wall_s": m.wall_s, "cpu_s": m.cpu_s,
                                        "size": layers_size(work / f"sk{attempt}")})
            log(f"attempt {attempt}: {rows['estargz-opt'][-1]} vs {rows['skopeo 1.18'][-1]}")
            shutil.rmtree(ours)
            shutil.rmtree(work / f"sk{attempt}")
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("wall_s", "cpu_s", "size")}
           for k, v in rows.items()}
    ref = med["skopeo 1.18"]
    table = benchlib.markdown_table(
        ["tool", "wall s", "CPU s", "layers size", "wall vs skopeo", "size vs skopeo"],
        [[k, f"{v['wall_s']:.1f}", f"{v['cpu_s']:.1f}", benchlib.fmt_bytes(int(v["size"])),
          f"{v['wall_s'] / ref['wall_s']:.2f}x", f"{v['size'] / ref['size']:.3f}x"]
         for k, v in med.items()])
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    benchlib.write_json_atomic(RESULTS_DIR / f"{args.name}.json",
                               {"runs": rows, "median": med, "cpus": os.cpu_count()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
