#!/usr/bin/env python3
"""Full `optimize` with the workload run: estargz-opt against ctr-remote 0.14.3, one run.

On the cached 3-layer Debian test image (bench/build_image.py, workload
`python3 /app/main.py`), in one private containerd, each tool runs

    optimize --oci --period 3 [--zstdchunked] --record-out REC SRC DST

i.e. unpack check, sample container under fanotify, record, conversion of every layer.
The image is unpacked once before measuring (a warm-up run of ctr-remote), so neither
tool pays for the unpack in the timed runs. Runs alternate between the tools; the median
wall time of --repeat runs is reported with the number of files each recorded and the
converted image's size. Results: a markdown table on stdout and
bench/results/<name>.json.

Usage: python3 bench/bench_optimize.py [--repeat N] [--formats estargz,zstdchunked]
       [--period S] [--wait-idle SECONDS] [--name NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
import build_image
from bench_layers import (
    CTR_REMOTE_FLAGS,
    find_ctr_remote,
    image_layers,
    image_target,
    median_run,
    our_cli,
    private_containerd,
    remove_image,
)
from benchlib import NO_CACHE, REPO_ROOT, RESULTS_DIR, log, run, run_measured


def one_run(tool: str, cmd_head: list[str], sock: Path, src: str, fmt: str, period: int,
            arch: str, attempt: int, work: Path) -> dict:
    dst = f"{build_image.IMAGE_BASE_NAME}:opt-{tool}-{fmt}-{attempt}"
    record = work / f"{tool}-{fmt}-{attempt}.jsonl"
    cmd = [*cmd_head, "-a", str(sock), *(["image"] if tool == "ctr-remote" else []),
           "optimize", "--oci", "--period", str(period), *CTR_REMOTE_FLAGS[fmt],
           *([] if tool == "ctr-remote" else NO_CACHE), "--record-out", str(record), src, dst]
    log(f"{tool} {fmt} (#{attempt + 1}): {' '.join(cmd[1:])}")
    m = run_measured(cmd).check()
    layers = image_layers(sock, dst, arch)
    lines = [json.loads(x) for x in record.read_text().splitlines() if x.strip()]
    res = {
        **m.as_dict(),
        "total_size": sum(la["size"] for la in layers),
        "recorded_lines": len(lines),
        "recorded_files": len({(r["layerIndex"], r["path"]) for r in lines}),
        "recorded_set": sorted({f"{r['layerIndex']}:{r['path']}" for r in lines}),
    }
    log(f"  {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s CPU, {res['total_size'] / 1e6:.1f} MB,"
        f" {res['recorded_files']} files recorded")
    remove_image(sock, dst, layers)
    return res


def render(report: dict) -> str:
    rows = []
    for fmt, r in report["results"].items():
        ref, ours = r["ctr-remote"], r["estargz-opt"]
        rows.append(["ctr-remote 0.14.3", fmt, f"{ref['wall_s']:.1f}",
                     benchlib.fmt_bytes(ref["total_size"]), ref["recorded_files"], "", ""])
        rows.append(["estargz-opt", fmt, f"{ours['wall_s']:.1f}",
                     benchlib.fmt_bytes(ours["total_size"]), ours["recorded_files"],
                     f"**{r['time_ratio']:.2f}x**", f"{r['size_ratio']:.3f}x"])
    table = benchlib.markdown_table(
        ["tool", "format", "wall s (median)", "size", "files recorded", "time vs ref",
         "size vs ref"], rows)
    notes = [f"optimize --oci --period {report['period']}, median of {report['repeat']}"
             f" alternating runs, one private containerd, image unpacked beforehand."]
    for fmt, r in report["results"].items():
        notes.append(f"{fmt}: recorded sets {'equal' if r['same_record'] else 'DIFFER'};"
                     f" load average {report['loadavg_start']} -> {report['loadavg_end']}")
    return table + "\n\n" + "\n".join(notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="estargz", help="estargz, zstdchunked (comma list)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--period", type=int, default=3)
    ap.add_argument("--name", default=None)
    ap.add_argument("--ctr-remote", default=None)
    ap.add_argument("--wait-idle", type=float, default=0,
                    help="wait up to this many seconds for the load average to drop below 0.5")
    args = ap.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    name = args.name or time.strftime("optimize-%Y%m%d-%H%M%S")
    benchlib.install_signal_handlers()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the sample container needs a private containerd")
    image = build_image.ensure_image()
    if args.wait_idle:
        benchlib.wait_for("the machine to be idle (1-min load < 0.5)",
                          lambda: os.getloadavg()[0] < 0.5, args.wait_idle, every_s=10)
    ctr_remote = find_ctr_remote(args.ctr_remote)
    tools = {"ctr-remote": [ctr_remote], "estargz-opt": our_cli()}
    report: dict = {"name": name, "period": args.period, "repeat": args.repeat,
                    "image": {k: image[k] for k in ("ref", "manifest_digest", "total_size")},
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                    "git_head": run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
                                    check=False).stdout.strip(),
                    "results": {}}
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        sock, _pid = stack.enter_context(private_containerd())
        work = stack.enter_context(benchlib.temp_dir("eo-bench-opt-", "/var/tmp"))
        run(["ctr", "-a", sock, "images", "import", "--no-unpack", "--base-name",
             image["base_name"], image["oci_tar"]])
        image_target(sock, image["ref"])
        log("warm-up (unpacks the image once; not measured)")
        one_run("ctr-remote", tools["ctr-remote"], sock, image["ref"], formats[0], args.period,
                image["architecture"], 99, work)
        for fmt in formats:
            runs: dict[str, list[dict]] = {t: [] for t in tools}
            for attempt in range(args.repeat):
                order = list(tools) if attempt % 2 == 0 else list(reversed(tools))
                for tool in order:
                    runs[tool].append(one_run(tool, tools[tool], sock, image["ref"], fmt,
                                              args.period, image["architecture"], attempt, work))
            r = {f"{t}-runs": v for t, v in runs.items()}
            r.update({t: median_run(v) for t, v in runs.items()})
            r["time_ratio"] = round(r["estargz-opt"]["wall_s"] / r["ctr-remote"]["wall_s"], 3)
            r["size_ratio"] = round(r["estargz-opt"]["total_size"]
                                    / r["ctr-remote"]["total_size"], 4)
            r["same_record"] = (r["estargz-opt"]["recorded_set"]
                                == r["ctr-remote"]["recorded_set"])
            report["results"][fmt] = r
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    text = render(report)
    report["table"] = text
    out = RESULTS_DIR / f"{name}.json"
    benchlib.write_json_atomic(out, report)
    print(text)
    print(f"\nresults: {out.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
