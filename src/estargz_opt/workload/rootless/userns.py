"""Find and kill every process of one user namespace: the rootless runner's cleanup.

All a rootless run makes lives in the user namespace of its monitor helper: the
container's processes (whatever the runtime does with them), the mount namespace and the
tmpfs that holds the rootfs. Once no process is left in it, the kernel frees all of that.
So a run, and the run after one killed with SIGKILL, cleans up by killing the processes
of that namespace, found by the namespace's identity (device and inode of its nsfs
file), which the run writes into its run directory. Its owner may kill them: it owns the
namespace, which gives it CAP_KILL there, and nothing on the host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time


def ns_id(path: str) -> str:
    """`dev:ino` of a namespace file such as /proc/PID/ns/user."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def members(ns: str) -> list[int]:
    """The pids of the processes in the user namespace `ns` that we can see."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if ns_id(f"/proc/{entry.name}/ns/user") == ns:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_all(ns: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process of `ns` until none is left (or `timeout`); those killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        pids = members(ns)
        if not pids or time.monotonic() > deadline:
            return killed
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.02)
