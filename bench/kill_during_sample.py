"""SIGKILL `optimize` around the creation of its sample task; does anything outlive the next run?

Usage: kill_during_sample.py WORK_DIR [--trials N] [--seed S]

A private containerd (scripts/containerd-up.sh, in WORK_DIR) holds busybox + a workload
that sleeps 601 s. Each trial starts `optimize --period 3`, waits for its sample container
to appear, SIGKILLs it after a random 0-0.4 s (the window in which containerd creates the
task), notes whether a shim is left that containerd no longer knows the task of (an
orphan), then runs `optimize --period 1` (whose reaper must clean up) and counts the
shims and workloads of the killed run's container still running. Prints a JSON summary;
exits non-zero if anything was left. About 1 kill in 12 lands inside containerd's task
creation, so the orphan case needs a few dozen trials.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import imagefactory as f
from support.containerd import Containerd
from support.layers import build_busybox_layer

from estargz_opt.stores.containerd.client import Client

PREFIX = "estargz-opt-sample-"
WORKLOAD = ["/bin/busybox", "sh", "-c", "echo started; exec sleep 601"]


def processes(needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmd:
                found.append(int(entry.name))
    return found


def optimize(c: Containerd, period: str, dst: str) -> list[str]:
    return [sys.executable, "-m", "estargz_opt", "-a", c.address, "optimize", "--oci",
            "--period", period, "localhost/kill-sample:1", dst]


def trial(c: Containerd, client: Client, i: int, delay: float) -> dict[str, object]:
    proc = subprocess.Popen(optimize(c, "3", f"localhost/kill-sample:{i}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (cids := [x.id for x in client.containers.list() if x.id.startswith(PREFIX)]):
        if proc.poll() is not None:
            break
        time.sleep(0.002)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    time.sleep(1)
    cid = cids[0] if cids else "-"
    try:
        task = client.tasks.get(cid).status
    except Exception:  # any failure: containerd has no such task
        task = "none"
    shims = processes(f"-id {cid} ")
    nxt = subprocess.run(optimize(c, "1", f"localhost/kill-sample:next{i}"),
                         capture_output=True, text=True)
    time.sleep(1)
    left = processes(f"-id {cid} ") + processes("sleep 601")
    for pid in left:  # the next trial starts clean whatever happened
        os.kill(pid, signal.SIGKILL)
    return {"delay": round(delay, 3), "task_after_kill": task,
            "orphan_shim": bool(shims) and task == "none", "next_run_status": nxt.returncode,
            "next_run_error": nxt.stderr.strip().splitlines()[-1:] if nxt.returncode else [],
            "left_after_next_run": len(left)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--trials", type=int, default=25)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    c = Containerd.start(args.work / "containerd")
    try:
        layout = args.work / "layout"
        f.write_busybox_image(layout, "v1", build_busybox_layer(args.work / "busybox.tar"),
                              cmd=WORKLOAD)
        f.archive_for_ctr(layout, "v1", "localhost/kill-sample:1", args.work / "image.tar")
        c.ctr("images", "import", "--no-unpack", str(args.work / "image.tar"))
        client = Client(c.address, "default")
        trials = [trial(c, client, i, rng.uniform(0, 0.4)) for i in range(args.trials)]
    finally:
        c.stop()
    summary = {
        "trials": len(trials),
        "orphan_shims_after_kill": sum(1 for t in trials if t["orphan_shim"]),
        "next_runs_failed": sum(1 for t in trials if t["next_run_status"]),
        "left_after_next_run": sum(int(str(t["left_after_next_run"])) for t in trials),
        "details": trials,
    }
    print(json.dumps(summary, indent=1))
    return 1 if summary["left_after_next_run"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
