"""What a run against a private containerd must leave behind: nothing new (no sample
container, task, snapshot, lease, mount, network namespace, monitor process or file in its
TMPDIR). `Leftovers` takes the state before a run and checks it after.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from support.containerd import Containerd, images

SAMPLE = "estargz-opt-sample-"
MONITOR = "estargz_opt.workload.monitor"


def _ctr_rows(c: Containerd, *args: str) -> set[str]:
    res = c.ctr(*args)
    return {line.split()[0] for line in res.stdout.splitlines()[1:] if line.strip()}


def _netns() -> set[str]:
    d = Path("/var/run/netns")
    return set(os.listdir(d)) if d.is_dir() else set()


def monitor_processes(c: Containerd) -> list[str]:
    """Monitor processes of runs against *c* (their mounts name its directory): other
    estargz-opt runs on this machine (other test sessions) have their own."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone meanwhile
        if MONITOR in cmdline and str(c.dir) in cmdline:
            found.append(f"{pid} {cmdline}")
    return found


@dataclass
class State:
    containers: set[str]
    tasks: set[str]
    snapshots: set[str]
    leases: set[str]
    images: set[str]
    sample_mounts: list[str]
    netns: set[str]

    @classmethod
    def take(cls, c: Containerd) -> State:
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        return cls(
            containers=set(c.ctr("containers", "ls", "-q").stdout.split()),
            tasks=_ctr_rows(c, "tasks", "ls"),
            snapshots=_ctr_rows(c, "snapshots", "ls"),
            leases=_ctr_rows(c, "leases", "ls"),
            images=images(c),
            sample_mounts=[m for m in mountinfo if SAMPLE in m or str(c.dir) in m],
            netns=_netns(),
        )


class Leftovers:
    """Take the state before a run; `check()` after it: nothing new may remain."""

    def __init__(self, c: Containerd, tmpdir: Path) -> None:
        self.c = c
        self.tmpdir = tmpdir
        tmpdir.mkdir(parents=True, exist_ok=True)
        self.before = State.take(c)

    def reset(self) -> None:
        """Take the state again (after a test built and imported its own image)."""
        self.before = State.take(self.c)

    def check(self, *, new_images: set[str] = frozenset()) -> None:
        after = State.take(self.c)
        b = self.before
        # A sample mount or network namespace of another estargz-opt run on this machine
        # (another test session) may come and go meanwhile: what a run leaks stays.
        deadline = time.monotonic() + 10
        while (set(after.sample_mounts) - set(b.sample_mounts) or after.netns - b.netns) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
            after = State.take(self.c)
        assert not {x for x in after.containers if x.startswith(SAMPLE)}, after.containers
        # "Nothing new" rather than "equal": a run may reap what a SIGKILLed one left.
        assert after.containers <= b.containers, "containers left behind"
        assert after.tasks <= b.tasks, "tasks left behind"
        assert not {x for x in after.snapshots if SAMPLE in x}, after.snapshots
        assert after.snapshots - b.snapshots == set(), \
            f"new snapshots: {after.snapshots - b.snapshots}"
        assert after.leases <= b.leases, f"leases: before {b.leases}, after {after.leases}"
        assert set(after.sample_mounts) <= set(b.sample_mounts), after.sample_mounts
        # The runs get a private $TMPDIR: their estargz-opt-sample-* directory goes there
        # (checked in test_sample_container_spec), so /tmp is not looked at: other
        # estargz-opt runs on this machine may come and go there.
        assert list(self.tmpdir.iterdir()) == [], \
            f"left in $TMPDIR: {list(self.tmpdir.iterdir())}"
        assert after.netns <= b.netns, f"network namespaces left: {after.netns - b.netns}"
        assert monitor_processes(self.c) == [], f"monitor process left: {monitor_processes(self.c)}"
        assert after.images - b.images == set(new_images), \
            f"new images {after.images - b.images}, want {set(new_images)}"
