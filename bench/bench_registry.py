#!/usr/bin/env python3
"""Registry to registry over an emulated link: estargz-opt against ctr-remote's pipeline.

The cached ~250 MB test image (bench/build_image.py) is copied by skopeo, directly, into
a fresh loopback ``docker-registry`` as ``img:1``; the tools then reach the registry only
through tests/support/throttle_proxy.py (``--rtt-ms`` per request and per connection, ``--mbit``
shared by every connection and by both directions: ``--throttle-uploads``). Each run:

* estargz-opt: ``optimize --oci --no-optimize --no-cache --src-tls-verify=false
  --dest-tls-verify=false docker://HOST/img:1 docker://HOST/img:1-esgz``, no daemon;
* ctr-remote 0.14.3's pipeline for the same result, on a fresh private containerd:
  ``ctr-remote images pull --plain-http`` (which also unpacks), ``ctr-remote image
  optimize --oci --no-optimize``, ``ctr images push --plain-http``.

Every run gets a new registry and containerd, so neither tool finds anything already
there. Reported per tool (median wall time of --repeat runs, alternating order): wall time
(the pipeline's steps too), the bytes that crossed the proxy each way (its request log),
the link's floor for those bytes (down + up over the bandwidth), peak RSS (ours: the one
process; the pipeline: the largest of its client processes, containerd not counted), and
the pushed image's manifest digest. Targets: ours <= 0.4x the pipeline's wall time and
<= 1.25x its own floor.

Usage: python3 bench/bench_registry.py [--repeat N] [--rtt-ms 20] [--mbit 100]
       [--tools estargz-opt,ctr-remote] [--name NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))
import benchlib
import build_image
from bench_layers import find_ctr_remote, median_run, our_cli, private_containerd
from benchlib import NO_CACHE, REPO_ROOT, RESULTS_DIR, log, run, run_measured
from support import lazypull

SRC, DST = "img:1", "img:1-esgz"
TOOLS = ("estargz-opt", "ctr-remote")


@contextlib.contextmanager
def seeded_registry(image: dict, work: Path, rtt_ms: float, mbit: float
                    ) -> Iterator[tuple[lazypull.Registry, lazypull.Proxy]]:
    """A new registry holding the test image as img:1, and the link in front of it."""
    reg = lazypull.Registry.start(work)
    try:
        run(["skopeo", "copy", "--dest-tls-verify=false", f"oci-archive:{image['oci_tar']}",
             f"docker://{reg.host}/{SRC}"])
        proxy = lazypull.Proxy.start(reg.host, work / f"proxy-{time.monotonic_ns()}.jsonl",
                                     rtt_ms=rtt_ms, mbit=mbit, extra=["--throttle-uploads"])
        try:
            yield reg, proxy
        finally:
            proxy.stop()
    finally:
        reg.stop()


def pushed_digest(reg: lazypull.Registry) -> tuple[str, list[dict]]:
    """The manifest digest of img:1-esgz (read past the proxy) and its layers."""
    raw = run(["skopeo", "inspect", "--raw", "--tls-verify=false",
               f"docker://{reg.host}/{DST}"]).stdout
    digest = json.loads(run(["skopeo", "inspect", "--tls-verify=false",
                             f"docker://{reg.host}/{DST}"]).stdout)["Digest"]
    return digest, json.loads(raw)["layers"]


def link_figures(proxy: lazypull.Proxy, mbit: float) -> dict:
    """Bytes each way, the floor, and when (seconds after the first request) the link
    carried blob downloads and uploads: how much of them overlapped."""
    reqs = proxy.requests()
    down = sum(r["bytes"] for r in reqs)
    up = sum(r.get("req_bytes", 0) for r in reqs)
    t0 = min((r["t0"] for r in reqs), default=0.0)
    gets = [r for r in reqs if r["method"] == "GET" and "/blobs/" in r["path"] and r["bytes"]]
    puts = [r for r in reqs if r.get("req_bytes")]

    def span(rs: list[dict]) -> list[float] | None:
        return [round(min(r["t0"] for r in rs) - t0, 2),
                round(max(r["t1"] for r in rs) - t0, 2)] if rs else None

    return {"requests": len(reqs), "bytes_down": down, "bytes_up": up,
            "floor_s": round((down + up) * 8 / (mbit * 1e6), 3),
            "download_span_s": span(gets), "upload_span_s": span(puts)}


def run_ours(cli: list[str], proxy: lazypull.Proxy) -> dict:
    cmd = [*cli, "optimize", "--oci", "--no-optimize", *NO_CACHE, "--src-tls-verify=false",
           "--dest-tls-verify=false", f"docker://{proxy.host}/{SRC}",
           f"docker://{proxy.host}/{DST}"]
    m = run_measured(cmd).check()
    return {**m.as_dict(), "steps": {}}


def run_pipeline(ctr_remote: str, proxy: lazypull.Proxy) -> dict:
    steps: dict[str, dict] = {}
    with private_containerd() as (sock, _pid):
        src, dst = f"{proxy.host}/{SRC}", f"{proxy.host}/{DST}"
        for step, cmd in (
            ("pull", [ctr_remote, "-a", sock, "images", "pull", "--plain-http", src]),
            ("optimize", [ctr_remote, "-a", sock, "image", "optimize", "--oci",
                          "--no-optimize", src, dst]),
            ("push", ["ctr", "-a", sock, "images", "push", "--plain-http", dst]),
        ):
            steps[step] = run_measured(cmd).check().as_dict()
            log(f"  {step}: {steps[step]['wall_s']:.1f} s")
    return {
        "cmd": [s["cmd"] for s in steps.values()],
        "wall_s": round(sum(s["wall_s"] for s in steps.values()), 3),
        "cpu_s": round(sum(s["cpu_s"] for s in steps.values()), 3),
        "maxrss_mib": max(s["maxrss_mib"] for s in steps.values()),
        "steps": {k: v["wall_s"] for k, v in steps.items()},
    }


def one_run(tool: str, image: dict, work: Path, args: argparse.Namespace, ctr_remote: str,
            attempt: int) -> dict:
    with seeded_registry(image, work, args.rtt_ms, args.mbit) as (reg, proxy):
        log(f"{tool} (#{attempt + 1}) through {proxy.host} "
            f"({args.rtt_ms:g} ms, {args.mbit:g} Mbit/s)")
        res = run_ours(our_cli(), proxy) if tool == "estargz-opt" else run_pipeline(
            ctr_remote, proxy)
        res |= link_figures(proxy, args.mbit)
        res["digest"], layers = pushed_digest(reg)
        res["toc_annotated"] = all(
            "containerd.io/snapshot/stargz/toc.digest" in (x.get("annotations") or {})
            for x in layers)
    res["vs_floor"] = round(res["wall_s"] / res["floor_s"], 3) if res["floor_s"] else None
    log(f"  {res['wall_s']:.1f} s wall, {res['bytes_down'] / 1e6:.1f} MB down "
        f"(s {res['download_span_s']}), {res['bytes_up'] / 1e6:.1f} MB up "
        f"(s {res['upload_span_s']}), floor {res['floor_s']:.1f} s, "
        f"peak RSS {res['maxrss_mib']:.0f} MiB")
    return res


def render(report: dict) -> str:
    rows = []
    ref = report["results"].get("ctr-remote")
    for tool, r in report["results"].items():
        steps = " + ".join(f"{k} {v:.1f}" for k, v in r["steps"].items())
        ratio = f"**{r['wall_s'] / ref['wall_s']:.2f}x**" if ref else "-"
        rows.append([
            "ctr-remote 0.14.3 pull + optimize + ctr push" if tool == "ctr-remote"
            else "estargz-opt docker:// → docker://",
            f"{r['wall_s']:.1f}" + (f" ({steps})" if steps else ""),
            ratio if tool != "ctr-remote" else "1.00x",
            f"{r['bytes_down'] / 1e6:.1f} / {r['bytes_up'] / 1e6:.1f}",
            f"{r['floor_s']:.1f}", f"{r['vs_floor']:.2f}x", f"{r['maxrss_mib']:.0f}",
        ])
    table = benchlib.markdown_table(
        ["pipeline", "wall s", "vs ctr-remote", "MB down / up", "link floor s",
         "wall vs floor", "peak RSS MiB"], rows)
    digests = {r["digest"] for r in report["results"].values()}
    same = "n/a" if len(report["results"]) < 2 else (
        "identical" if len(digests) == 1 else "differ")
    notes = [f"median of {report['repeat']}, {report['rtt_ms']:g} ms per request and per "
             f"connection, {report['mbit']:g} Mbit/s shared by both directions; "
             f"pushed manifests {same} (all "
             f"eStargz, every layer TOC-annotated: "
             f"{all(r['toc_annotated'] for r in report['results'].values())}); load average "
             f"{report['loadavg_start']} -> {report['loadavg_end']}"]
    return table + "\n\n" + "\n".join(notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--ctr-remote", default=None)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    if unknown := set(tools) - set(TOOLS):
        raise SystemExit(f"unknown tools {sorted(unknown)}; choose from {TOOLS}")
    if os.geteuid() != 0:
        raise SystemExit("run as root: ctr-remote's pipeline needs a private containerd")
    name = args.name or time.strftime("registry-%Y%m%d-%H%M%S")
    benchlib.install_signal_handlers()
    image = build_image.ensure_image()
    ctr_remote = find_ctr_remote(args.ctr_remote) if "ctr-remote" in tools else ""
    report: dict = {"name": name, "repeat": args.repeat, "rtt_ms": args.rtt_ms,
                    "mbit": args.mbit,
                    "image": {k: image[k] for k in ("ref", "manifest_digest", "total_size")},
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                    "git_head": run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
                                    check=False).stdout.strip(),
                    "results": {}}
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    with benchlib.temp_dir("eo-bench-reg-", "/var/tmp") as work:
        for attempt in range(args.repeat):
            for tool in tools if attempt % 2 == 0 else reversed(tools):
                runs[tool].append(one_run(tool, image, work, args, ctr_remote, attempt))
    for tool in tools:
        report["results"][tool] = median_run(runs[tool]) | {"runs": runs[tool]}
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = render(report)
    report["table"] = text
    out = RESULTS_DIR / f"{name}.json"
    benchlib.write_json_atomic(out, report)
    print(text)
    print(f"\nresults: {out.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
