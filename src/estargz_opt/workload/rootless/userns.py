"""Find and signal the processes of one namespace: the rootless runner's stopping and
cleanup.

All a rootless run makes lives in the user namespace of its monitor helper: the
container's processes (whatever the runtime does with them), the mount namespace and the
tmpfs that holds the rootfs. Once no process is left in it, the kernel frees all of that.
So a run, and the run after one killed with SIGKILL, cleans up by killing the processes
of that namespace, found by the namespace's identity (device and inode of its nsfs
file), which the run writes into its run directory. Its owner may kill them: it owns the
namespace, which gives it CAP_KILL there, and nothing on the host. The workload is
stopped the same way, by the processes of its PID namespace (`signal_pid_namespace`).
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


def members(ns: str, kind: str = "user") -> list[int]:
    """The pids of the live processes in the `kind` namespace `ns` that we can see.

    Zombies are left out: they hold nothing, and one whose parent is us (the monitor
    helper, until `close` waits for it) would otherwise be "killed" until a timeout."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if ns_id(f"/proc/{entry.name}/ns/{kind}") == ns and not _zombie(entry.name):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _zombie(pid: str) -> bool:
    """Whether /proc/PID/stat says Z (exited, not yet waited for); the state follows the
    command name, which may hold spaces and parentheses."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        after_name = f.read().rpartition(b")")[2]
    return after_name[1:2] == b"Z"


def signal_pid_namespace(init: int, signo: int) -> int:
    """Send `signo` to every process in the PID namespace of `init`; how many got it.

    `runc kill --all` finds a container's processes through its cgroup, and a rootless
    container has none (runc 1.1 then signals nobody: "lstat : no such file or
    directory"), so the rootless runner signals them itself. Each is signalled through
    a pidfd taken before its namespace is checked, so a pid reused meanwhile is never
    signalled. Every pidfd is taken first and init is signalled last: its death (with
    SIGKILL) ends the rest of the namespace at once, before they could be reached."""
    try:
        ns = ns_id(f"/proc/{init}/ns/pid")
    except OSError:
        return 0  # gone already
    pidfds: list[tuple[int, int]] = []
    try:
        for pid in members(ns, "pid"):
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            pidfds.append((pid, pidfd))
        sent = 0
        for pid, pidfd in sorted(pidfds, key=lambda p: p[0] == init):
            try:
                if ns_id(f"/proc/{pid}/ns/pid") == ns:
                    signal.pidfd_send_signal(pidfd, signo)
                    sent += 1
            except OSError:  # it exited meanwhile
                continue
        return sent
    finally:
        for _, pidfd in pidfds:
            os.close(pidfd)


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
