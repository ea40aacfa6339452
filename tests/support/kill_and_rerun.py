"""SIGKILL `optimize` into an OCI layout at random points, rerun it each time, check the result.

Usage: kill_and_rerun.py SRC_LAYOUT TAG WORK_DIR [--kills N] [--seed S] [OPTIMIZE_ARGS...]

A first, undisturbed run into WORK_DIR/calibrate measures when the destination appears
and when the run ends; each kill lands at a uniformly random time in that window (the
part of a run that writes the layout). Kill i goes into a new destination WORK_DIR/dst-i,
each odd one into a layout that already holds another image. After each kill the same
command is rerun to completion, then the destination is checked: no temporary file
(`*.tmp`) is left, and `estargz-opt verify` passes without reporting unreferenced blobs.

Prints a JSON summary (and every trial) on stdout; exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CLI = [sys.executable, "-m", "estargz_opt"]
NO_CACHE = ["--no-cache"]  # a rerun converts again, as the kill points assume


@dataclass
class Trial:
    delay: float
    #: temporary files and new blobs the killed run left (before the rerun)
    tmp_after_kill: int
    blobs_after_kill: int
    rerun_status: int
    tmp_after_rerun: list[str]
    verified: bool
    unreferenced_warning: bool


def tmp_files(layout: Path) -> list[str]:
    if not layout.exists():
        return []
    return sorted(str(p.relative_to(layout)) for p in layout.rglob("*") if ".tmp" in p.name)


def blob_count(layout: Path) -> int:
    blobs = layout / "blobs" / "sha256"
    return sum(1 for p in blobs.iterdir() if not p.name.startswith(".")) if blobs.is_dir() else 0


def command(src: Path, tag: str, dst: Path, extra: list[str]) -> list[str]:
    return [*CLI, "optimize", "--oci", "--no-optimize", *NO_CACHE, *extra, f"oci:{src}:{tag}",
            f"oci:{dst}:t"]


def calibrate(cmd: list[str], dst: Path) -> tuple[float, float]:
    """(seconds until the destination exists, seconds until the run ends)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    appeared = None
    while proc.poll() is None:
        if appeared is None and dst.exists():
            appeared = time.monotonic() - start
        time.sleep(0.002)
    ended = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"calibration run failed: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
    return appeared if appeared is not None else 0.0, ended


def seed_layout(dst: Path, src: Path, tag: str) -> None:
    """A destination that already holds an image (tag `keep`)."""
    done = subprocess.run([*CLI, "optimize", "--oci", "--no-optimize", *NO_CACHE,
                           f"oci:{src}:{tag}", f"oci:{dst}:keep",
                           "--estargz-chunk-size", "1048576"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"cannot seed {dst}: {done.stderr}")


def trial(cmd: list[str], dst: Path, delay: float) -> Trial:
    blobs_before = blob_count(dst)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left_tmp, left_blobs = len(tmp_files(dst)), blob_count(dst) - blobs_before
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    verify = subprocess.run([*CLI, "verify", "--json", f"oci:{dst}:t"],
                            capture_output=True, text=True)
    report = json.loads(verify.stdout) if verify.returncode == 0 and verify.stdout else {}
    warnings = report.get("warnings", [])
    return Trial(
        delay=round(delay, 3),
        tmp_after_kill=left_tmp,
        blobs_after_kill=left_blobs,
        rerun_status=rerun.returncode,
        tmp_after_rerun=tmp_files(dst),
        verified=verify.returncode == 0 and bool(report.get("ok")),
        unreferenced_warning=any("referenced by no image" in w for w in warnings),
    )


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("tag")
    ap.add_argument("work", type=Path)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None)
    args, extra = ap.parse_known_args(argv)
    rng = random.Random(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    calib = args.work / "calibrate"
    shutil.rmtree(calib, ignore_errors=True)
    appeared, ended = calibrate(command(args.src, args.tag, calib, extra), calib)
    trials = []
    for i in range(args.kills):
        dst = args.work / f"dst-{i}"
        shutil.rmtree(dst, ignore_errors=True)
        if i % 2:
            seed_layout(dst, args.src, args.tag)
        trials.append(trial(command(args.src, args.tag, dst, extra), dst,
                            rng.uniform(appeared, ended)))
    failed = [i for i, t in enumerate(trials)
              if t.rerun_status or t.tmp_after_rerun or not t.verified or t.unreferenced_warning]
    summary = {
        "kills": len(trials),
        "window_seconds": [round(appeared, 3), round(ended, 3)],
        "kills_leaving_tmp": sum(1 for t in trials if t.tmp_after_kill),
        "kills_leaving_blobs": sum(1 for t in trials if t.blobs_after_kill),
        "reruns_ok": sum(1 for t in trials if t.rerun_status == 0),
        "tmp_after_reruns": sum(len(t.tmp_after_rerun) for t in trials),
        "verified": sum(1 for t in trials if t.verified),
        "failed_trials": failed,
        "trials": [asdict(t) for t in trials],
    }
    print(json.dumps(summary, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
