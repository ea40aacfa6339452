#!/usr/bin/env python3
"""Time to ready with lazy pulling: pull + run until the app's ready line, from empty daemons.

On the cached 3-layer Debian minbase + python3 image (bench/build_image.py; its
workload ``python3 /app/main.py`` imports some stdlib modules and prints ``ready``):

1. A private "builder" containerd (scripts/containerd-up.sh) imports the image and
   makes the variants:
     * ``original``: the image as built (gzip layers);
     * ``eo-noopt``: ``estargz-opt -a SOCK optimize --oci --no-optimize``;
     * ``eo-opt``: ``estargz-opt -a SOCK optimize --oci --period 3`` (runs the workload);
     * ``ctrr-opt``: ``ctr-remote image optimize --oci --period 3`` (0.14.3, the reference);
     * ``eo-ctrr-record`` (diagnostic): ``estargz-opt optimize --oci --record-in R``
       with R the record ctr-remote wrote (``--record-out``): its profile, our layers.
   All are pushed (``ctr push --plain-http``) to Debian's docker-registry on loopback.
2. tests/support/throttle_proxy.py sits in front of the registry and emulates the link: 20 ms
   per request (and per new connection), 100 Mbit/s shared (``--rtt-ms``, ``--mbit``).
3. Each run starts from empty daemons: a fresh stargz snapshotter
   (tests/e2e/snapshotter/main.go on Debian's 0.12 library, default settings:
   prefetch and background fetch on) and a fresh containerd using it. Then
     * original: ``ctr pull --plain-http REF`` + ``ctr run REF`` (overlayfs);
     * the others: ``ctr-remote images rpull --plain-http REF`` +
       ``ctr run --snapshotter stargz REF``,
   all through the proxy, timed from the start of the pull until the container's
   ``ready`` line. Runs are interleaved (every variant once, then again, in an order
   rotated each round), the median of ``--repeat`` (default 3) is reported, with the
   bytes that went through the proxy.

Results: a markdown table on stdout, all details in bench/results/<name>.json.
Usage: python3 bench/bench_time_to_ready.py [--repeat N] [--rtt-ms 20] [--mbit 100]
       [--variants original,eo-noopt,eo-opt,ctrr-opt,eo-ctrr-record] [--wait-idle S]
       [--name NAME]
Needs root, the e2e prerequisites (scripts/install-e2e-deps.sh) and ctr-remote
(scripts/install-ctr-remote.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))
import benchlib
import build_image
from bench_layers import private_containerd
from benchlib import REPO_ROOT, RESULTS_DIR, log, markdown_table, run
from support import lazypull

READY = "ready"
CTR_REMOTE = Path(os.environ.get("ESTARGZ_OPT_CTR_REMOTE",
                                 "/opt/estargz-opt/ctr-remote/usr/bin/ctr-remote"))
VARIANTS = ("original", "eo-noopt", "eo-opt", "ctrr-opt", "eo-ctrr-record")
LABELS = {
    "original": "original gzip layers, `ctr pull` + `ctr run` (overlayfs)",
    "eo-noopt": "estargz-opt `--no-optimize`, lazy pull",
    "eo-opt": "estargz-opt optimized (`--period 3`, its own workload run), lazy pull",
    "ctrr-opt": "ctr-remote 0.14.3 optimized (`--period 3`), lazy pull",
    "eo-ctrr-record": "estargz-opt with ctr-remote's record (`--record-in`), lazy pull",
}


def make_variants(sock: Path, src: str, variants: list[str], work: Path,
                  registry: str) -> dict[str, dict]:
    """Convert in the builder containerd and push; return per variant its repo and details."""
    cli = benchlib.estargz_opt_cmd()
    out: dict[str, dict] = {}
    ctrr_record = work / "ctr-remote.record.jsonl"
    order = [v for v in VARIANTS if v in variants]
    if "eo-ctrr-record" in order and "ctrr-opt" not in order:
        order.insert(order.index("eo-ctrr-record"), "ctrr-opt")
    for v in order:
        local = f"bench/{v}:1"
        t0 = time.monotonic()
        if v == "original":
            local = src
        elif v == "eo-noopt":
            run([*cli, "-a", sock, "optimize", "--oci", "--no-optimize", src, local])
        elif v == "eo-opt":
            rec = work / "estargz-opt.record.jsonl"
            run([*cli, "-a", sock, "optimize", "--oci", "--period", "3", "--record-out", rec,
                 src, local])
        elif v == "ctrr-opt":
            run([CTR_REMOTE, "-a", sock, "image", "optimize", "--oci", "--period", "3",
                 "--record-out", ctrr_record, src, local])
        elif v == "eo-ctrr-record":
            run([*cli, "-a", sock, "optimize", "--oci", "--record-in", ctrr_record, src, local])
        convert_s = time.monotonic() - t0
        repo = f"bench/{v}"
        push = run(["ctr", "-a", sock, "images", "push", "--plain-http", f"{registry}/{repo}:1",
                    local], check=False)
        if push.returncode != 0:
            daemon_log = Path(sock).parent / "containerd.log"
            tail = daemon_log.read_text(errors="replace")[-3000:] if daemon_log.exists() else ""
            raise RuntimeError(f"ctr push of {local} failed: {push.stderr.strip()}\n"
                               f"builder containerd log:\n{tail}")
        manifest = json.loads(subprocess.run(
            ["ctr", "-a", sock, "content", "get", image_digest(sock, local)],
            capture_output=True, check=True).stdout)
        layers = manifest.get("layers", [])
        out[v] = {"repo": repo, "local": local, "convert_s": round(convert_s, 2),
                  "manifest_digest": image_digest(sock, local),
                  "layers": [{"digest": la["digest"], "size": la["size"], "mediaType":
                              la["mediaType"]} for la in layers],
                  "size": sum(la["size"] for la in layers)}
        log(f"{v}: {len(layers)} layers, {out[v]['size'] / 1e6:.1f} MB, made in {convert_s:.1f} s")
    for name in ("estargz-opt.record.jsonl", "ctr-remote.record.jsonl"):
        p = work / name
        if p.exists():
            out.setdefault("_records", {})[name] = sorted(
                {(json.loads(x)["layerIndex"], json.loads(x)["path"])
                 for x in p.read_text().splitlines() if x.strip()})
    return out


def image_digest(sock: Path, name: str) -> str:
    for line in run(["ctr", "-a", sock, "images", "ls", f"name=={name}"]).stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == name:
            return parts[2]
    raise RuntimeError(f"image {name} not in the builder containerd")


def one_run(binary: Path, proxy: lazypull.Proxy, variant: str, repo: str, attempt: int
            ) -> dict:
    ref = f"{proxy.host}/{repo}:1"
    with lazypull.lazy_daemons(binary, Path("/tmp"), ctr_remote=CTR_REMOTE) as d:
        proxy.clear()
        t0 = time.monotonic()
        t0_wall = time.time()
        if variant == "original":
            d.ctr("images", "pull", "--plain-http", ref, timeout=900)
            run_args = ["run", "--rm", ref, f"ttr-{attempt}"]
        else:
            d.ctr_remote_cmd("images", "rpull", "--plain-http", ref, timeout=900)
            run_args = ["run", "--rm", "--snapshotter", "stargz", ref, f"ttr-{attempt}"]
        pull_s = time.monotonic() - t0
        fuse = len(d.fuse_mounts())
        ready_s, rc, out, err = lazypull.run_until_line(
            ["ctr", "-a", d.address, "-n", "default", *run_args], READY, timeout=600)
        if ready_s is None or rc != 0:
            raise RuntimeError(f"{variant}: no ready line (exit {rc}):\n{out}\n{err}\n"
                               f"{d.snapshotter_log_text()[-2000:]}")
        total = pull_s + ready_s
        reqs = proxy.requests()
        fetched = sum(r["bytes"] for r in reqs)  # pull and run, until the container exited
    res = {"attempt": attempt, "pull_s": round(pull_s, 3), "run_to_ready_s": round(ready_s, 3),
           "total_s": round(total, 3), "fuse_mounts": fuse, "requests": len(reqs),
           "bytes_through_proxy": fetched,
           "request_log": [{"what": r["path"].rsplit("/", 1)[-1][:19], "method": r["method"],
                            "range": r["range"], "bytes": r["bytes"],
                            "t0": round(r["t0"] - t0_wall, 3), "t1": round(r["t1"] - t0_wall, 3)}
                           for r in reqs]}
    log(f"{variant} #{attempt + 1}: pull {pull_s:.2f} s + run {ready_s:.2f} s = {total:.2f} s, "
        f"{fuse} FUSE mounts, {len(reqs)} requests, {fetched / 1e6:.1f} MB")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="before each run, wait up to SECONDS for a load average below 1.0")
    ap.add_argument("--name", default=f"time-to-ready-{time.strftime('%Y%m%d-%H%M%S')}")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    benchlib.install_signal_handlers()
    reason = lazypull.unavailable_reason()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    if not CTR_REMOTE.exists():
        raise SystemExit(f"{CTR_REMOTE} missing: run scripts/install-ctr-remote.sh")

    image = build_image.ensure_image()
    binary = lazypull.build_snapshotter()
    report: dict = {
        "name": args.name, "image": image["ref"], "image_size": image["total_size"],
        "link": {"rtt_ms": args.rtt_ms, "mbit": args.mbit}, "repeat": args.repeat,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "results": {},
        "git_head": run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
                        check=False).stdout.strip(),
        "nproc": os.cpu_count(),
    }
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(benchlib.temp_dir("eo-ttr-", "/var/tmp"))
        registry = lazypull.Registry.start(Path("/tmp"))
        stack.callback(registry.stop)
        with private_containerd() as (sock, _pid):
            log("ctr images import (OCI layout tarball, --no-unpack) ...")
            run(["ctr", "-a", sock, "images", "import", "--no-unpack", "--base-name",
                 image["base_name"], image["oci_tar"]])
            made = make_variants(sock, image["ref"], variants, work, registry.host)
        report["records"] = made.pop("_records", {})
        report["images"] = made
        proxy = lazypull.Proxy.start(registry.host, work / "requests.jsonl",
                                     rtt_ms=args.rtt_ms, mbit=args.mbit)
        stack.callback(proxy.stop)
        for attempt in range(args.repeat):
            # Rotate the order each round, so no variant always follows the same one.
            k = attempt % len(variants)
            for v in variants[k:] + variants[:k]:
                if args.wait_idle:
                    benchlib.wait_for("a 1-min load average below 1.0",
                                      lambda: os.getloadavg()[0] < 1.0, args.wait_idle)
                report["results"].setdefault(v, []).append(
                    one_run(binary, proxy, v, made[v]["repo"], attempt))
                report.setdefault("loadavg_per_run", []).append(
                    [v, attempt, round(os.getloadavg()[0], 2)])
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    rows = []
    med = {v: statistics.median(r["total_s"] for r in report["results"][v]) for v in variants}
    ref = med.get("ctrr-opt")
    for v in variants:
        runs = report["results"][v]
        totals = [r["total_s"] for r in runs]
        rows.append([
            LABELS[v], f"{made[v]['size'] / 1e6:.1f} MB",
            f"{statistics.median(r['pull_s'] for r in runs):.2f}",
            f"{statistics.median(r['run_to_ready_s'] for r in runs):.2f}",
            f"**{med[v]:.2f}**", f"{min(totals):.2f}-{max(totals):.2f}",
            f"{statistics.median(r['bytes_through_proxy'] for r in runs) / 1e6:.1f} MB",
            f"{med[v] / ref:.2f}x" if ref else "-",
        ])
    table = markdown_table(["image", "size", "pull s", "run to ready s", "total s (median)",
                            "min-max", "through the link", "vs ctr-remote"], rows)
    same = [(a, b) for i, a in enumerate(variants) for b in variants[i + 1:]
            if made[a]["manifest_digest"] == made[b]["manifest_digest"]]
    notes = [f"`{a}` and `{b}` are the same image ({made[a]['manifest_digest'][:19]}...): "
             "their difference is run-to-run noise" for a, b in same]
    report["notes"] = notes
    report["table"] = table
    report["median_total_s"] = med
    out = RESULTS_DIR / f"{args.name}.json"
    benchlib.write_json_atomic(out, report)
    print(f"Time to ready, median of {args.repeat}, link {args.rtt_ms:g} ms per request, "
          f"{args.mbit:g} Mbit/s; load average {report['loadavg_start'][0]:.2f} at the start, "
          f"{report['loadavg_end'][0]:.2f} at the end\n")
    print(table)
    for n in notes:
        print(f"\nNote: {n}")
    log(f"details: {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, AssertionError, subprocess.CalledProcessError) as e:
        log(f"error: {e}")
        sys.exit(1)
