#!/usr/bin/env python3
"""Full `optimize` of an `oci:` image with the runners that need no containerd, against
ctr-remote 0.14.3's optimize of the same image in containerd, in the same run.

On the cached 3-layer Debian test image (bench/build_image.py, workload
`python3 /app/main.py`, ~250 MB of tar):

    ctr-remote -a SOCK image optimize --oci --period 3 --record-out REC SRC DST
    estargz-opt optimize --oci --period 3 --no-cache --record-out REC RUNNER_FLAGS \
        oci:IMAGE_LAYOUT:latest oci:OUT:TAG

Both tools first run once untimed: ctr-remote's run unpacks the image into containerd's
snapshots, ours into the unpacked-layer cache (a private one, in the work directory),
so that neither pays for the unpack in the timed runs. --no-cache turns off only our
converted-layer cache (a repeat would copy instead of converting). Runs alternate
between the tools; the median wall time of --repeat runs is reported with the number of
(layer, path) pairs each recorded and the converted image's size.

`RUNNERS` holds one row per runner (name -> flags, environment). The rootless runner's
row runs as an unprivileged uid with no capabilities at all (setpriv --inh-caps=-all
--bounding-set=-all, as tests/support/unprivileged.py does) and no /etc/subuid range, as in a
restricted Kubernetes pod: only its own id is mapped, so the Debian image's files of
several owners are all that id's. It runs on a copy of the layout that uid owns, unpacks
the image onto a tmpfs on every run (nothing is kept between rootless runs), and its row
also gives how much memory that tmpfs took (the rootfs is held in memory), besides every
row's peak RSS.

--image small runs the same on a 2 MiB image instead (Debian's busybox-static and an
app that prints "ready" and sleeps: what stopping costs shows, not unpacking or
converting). Every run is checked for "did not exit" warnings (a workload that ignored
the stop signal); the notes say how many there were.

Results: a markdown table on stdout and bench/results/<name>.json.

Usage: python3 bench/bench_runners.py [--repeat N] [--period S] [--runners runc,rootless]
       [--image debian|small] [--wait-idle SECONDS] [--name NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))
import benchlib
import build_image
from bench_layers import find_ctr_remote, image_target, median_run, our_cli, private_containerd
from bench_optimize import one_run as ctr_remote_run
from benchlib import NO_CACHE, REPO_ROOT, RESULTS_DIR, log, run, run_measured
from support import analyzeimages, imagefactory
from support.layers import build_busybox_layer
from support.unprivileged import Unprivileged, make_unprivileged

#: runner -> (estargz-opt flags, extra environment); the rootless runner adds its row
RUNNERS: dict[str, tuple[list[str], dict[str, str]]] = {
    "runc": (["--runner", "runc"], {}),
    "rootless": (["--runner", "rootless"], {}),
}
#: the runners whose row runs as an unprivileged uid (tests/support/unprivileged.py)
AS_USER = {"rootless"}
_TMPFS = re.compile(r"the image's rootfs takes (\d+) MiB of memory")
SMALL_REF = "docker.io/library/estargz-opt-bench-small:latest"
SMALL_APP = "echo ready\nexec /bin/busybox sleep 1000\n"


def small_image(work: Path) -> dict:
    """The 2 MiB image (busybox-static and the app), as an OCI layout and an archive for
    `ctr images import`; the keys of build_image.ensure_image() that this bench reads."""
    layout = work / "small-layout"
    busybox = build_busybox_layer(work / "busybox.tar").read_bytes()
    app = analyzeimages.layer([analyzeimages.script("app/run.sh", SMALL_APP)])
    digest = imagefactory.write_layout(layout, "latest", [busybox, app],
                                       analyzeimages.config(["/bin/sh", "/app/run.sh"]))
    tar = imagefactory.archive_for_ctr(layout, "latest", SMALL_REF, work / "small.tar")
    blobs = layout / "blobs" / "sha256"
    return {"ref": SMALL_REF, "base_name": None, "oci_layout": str(layout),
            "oci_tar": str(tar), "manifest_digest": digest,
            "total_size": sum(p.stat().st_size for p in blobs.iterdir()),
            "architecture": imagefactory.HOST_PLATFORM[1]}


def as_user(layout: str, stack: contextlib.ExitStack) -> tuple[Unprivileged, str]:
    """The unprivileged user and its own copy of `layout` (removed at the end)."""
    user = make_unprivileged()
    stack.callback(user.remove)
    copy = user.home / "layout"
    run(["cp", "-a", layout, str(copy)])
    user.give(copy)
    return user, str(copy)


def ours_run(runner: str, cli: list[str], layout: str, period: int, attempt: int,
             work: Path, user: Unprivileged | None = None) -> dict:
    flags, extra_env = RUNNERS[runner]
    if user is not None:
        work = user.home
    out = work / f"out-{runner}"
    record = work / f"{runner}-{attempt}.jsonl"
    tag = f"{runner}-{attempt}"
    args = ["optimize", "--oci", "--period", str(period), *NO_CACHE, "--record-out",
            str(record), *flags, f"oci:{layout}:latest", f"oci:{out}:{tag}"]
    if user is None:
        cmd = [*cli, *args]
        env = {**os.environ, "ESTARGZ_OPT_CACHE_DIR": str(work / "cache"), **extra_env}
    else:
        cmd = user.argv(*args)  # no capability, no /etc/subuid range: one id
        env = user.env(**extra_env)
    log(f"estargz-opt {runner} (#{attempt + 1}): {' '.join(cmd[1:])}")
    m = run_measured(cmd, env=env).check()
    tmpfs = _TMPFS.search(m.stderr)
    index = json.loads((out / "index.json").read_text())
    [desc] = [d for d in index["manifests"]
              if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    manifest = json.loads((out / "blobs" / "sha256" / desc["digest"][7:]).read_text())
    lines = [json.loads(x) for x in record.read_text().splitlines() if x.strip()]
    res = {
        **m.as_dict(),
        "total_size": sum(la["size"] for la in manifest["layers"]),
        "recorded_files": len({(r["layerIndex"], r["path"]) for r in lines}),
        "recorded_set": sorted({f"{r['layerIndex']}:{r['path']}" for r in lines}),
        "tmpfs_mib": int(tmpfs[1]) if tmpfs else None,
        "did_not_exit": m.stderr.count("did not exit"),
    }
    log(f"  {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s CPU, {res['total_size'] / 1e6:.1f} MB,"
        f" {res['recorded_files']} files recorded")
    return res


def render(report: dict) -> str:
    ref = report["ctr-remote"]
    rows = [["ctr-remote 0.14.3 (containerd)", f"{ref['wall_s']:.1f}", f"{ref['cpu_s']:.1f}",
             f"{ref['maxrss_mib']:.0f}", "", benchlib.fmt_bytes(ref["total_size"]),
             ref["recorded_files"], "1.00x", "1.000x"]]
    for runner in report["runners"]:
        r = report[runner]
        rows.append([f"estargz-opt --runner {runner} (oci:)", f"{r['wall_s']:.1f}",
                     f"{r['cpu_s']:.1f}", f"{r['maxrss_mib']:.0f}",
                     "" if r.get("tmpfs_mib") is None else str(r["tmpfs_mib"]),
                     benchlib.fmt_bytes(r["total_size"]),
                     r["recorded_files"], f"**{r['time_ratio']:.2f}x**",
                     f"{r['size_ratio']:.3f}x"])
    table = benchlib.markdown_table(
        ["tool", "wall s (median)", "CPU s", "peak RSS MiB", "rootfs tmpfs MiB", "size",
         "files recorded", "time vs ref", "size vs ref"], rows)
    notes = [f"optimize --oci --period {report['period']}, median of {report['repeat']}"
             " alternating runs; both unpacked beforehand (an untimed run each)."]
    for runner in report["runners"]:
        same = report[runner]["same_record"]
        notes.append(f"{runner}: recorded set {'equal to' if same else 'DIFFERS from'}"
                     " ctr-remote's")
    warned = sum(r.get("did_not_exit", 0) for runner in report["runners"]
                 for r in report[f"{runner}-runs"])
    notes.append(f'"did not exit" warnings in all runs of ours: {warned}')
    notes.append(f"load average {report['loadavg_start']} -> {report['loadavg_end']}")
    return table + "\n\n" + "\n".join(notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--period", type=int, default=3)
    ap.add_argument("--runners", default=",".join(RUNNERS))
    ap.add_argument("--name", default=None)
    ap.add_argument("--ctr-remote", default=None)
    ap.add_argument("--image", choices=("debian", "small"), default="debian")
    ap.add_argument("--wait-idle", type=float, default=0,
                    help="wait up to this many seconds for the load average to drop below 0.5")
    args = ap.parse_args(argv)
    runners = [r for r in args.runners.split(",") if r]
    name = args.name or time.strftime("runners-%Y%m%d-%H%M%S")
    benchlib.install_signal_handlers()
    if os.geteuid() != 0:
        raise SystemExit("run as root: ctr-remote needs a private containerd")
    if args.wait_idle:
        benchlib.wait_for("the machine to be idle (1-min load < 0.5)",
                          lambda: os.getloadavg()[0] < 0.5, args.wait_idle, every_s=10)
    ctr_remote = find_ctr_remote(args.ctr_remote)
    cli = our_cli()
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        sock, _pid = stack.enter_context(private_containerd())
        work = stack.enter_context(benchlib.temp_dir("eo-bench-runners-", "/var/tmp"))
        work.chmod(0o755)
        image = build_image.ensure_image() if args.image == "debian" else small_image(work)
        report: dict = {
            "name": name, "period": args.period, "repeat": args.repeat, "runners": runners,
            "image": {k: image[k] for k in ("ref", "manifest_digest", "total_size")},
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "git_head": run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
                            check=False).stdout.strip()}
        base = ["--base-name", image["base_name"]] if image["base_name"] else []
        run(["ctr", "-a", sock, "images", "import", "--no-unpack", *base, image["oci_tar"]])
        image_target(sock, image["ref"])
        users = {r: as_user(image["oci_layout"], stack) for r in runners if r in AS_USER}

        def ours(runner: str, attempt: int) -> dict:
            user, layout = users.get(runner, (None, image["oci_layout"]))
            return ours_run(runner, cli, layout, args.period, attempt, work, user)

        log("warm-up (each unpacks the image once; not measured)")
        ctr_remote_run("ctr-remote", [ctr_remote], sock, image["ref"], "estargz", args.period,
                       image["architecture"], 99, work)
        for runner in runners:
            ours(runner, 99)
        runs: dict[str, list[dict]] = {t: [] for t in ["ctr-remote", *runners]}
        for attempt in range(args.repeat):
            order = list(runs) if attempt % 2 == 0 else list(reversed(runs))
            for tool in order:
                if tool == "ctr-remote":
                    runs[tool].append(ctr_remote_run(
                        tool, [ctr_remote], sock, image["ref"], "estargz", args.period,
                        image["architecture"], attempt, work))
                else:
                    runs[tool].append(ours(tool, attempt))
        for tool, v in runs.items():
            report[f"{tool}-runs"] = v
            report[tool] = median_run(v)
        ref = report["ctr-remote"]
        for runner in runners:
            r = report[runner]
            r["time_ratio"] = round(r["wall_s"] / ref["wall_s"], 3)
            r["size_ratio"] = round(r["total_size"] / ref["total_size"], 4)
            r["same_record"] = r["recorded_set"] == ref["recorded_set"]
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
