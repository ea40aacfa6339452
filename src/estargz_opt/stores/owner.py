"""Which process owns something estargz-opt left in containerd, and whether it is gone.

A run killed with SIGKILL cannot remove its lease, sample container or temporary files.
Each of them is labelled with its owner, `host/pid/start-time` (the start time tells a
reused pid apart), so that a later run can tell a dead run's leftovers from a live run's
objects and remove only the former.
"""

from __future__ import annotations

import os
import socket

#: containerd label naming the owning process of a lease or container.
OWNER_LABEL = "estargz-opt/owner"


def owner_of(pid: int) -> str | None:
    """`host/pid/start-time` of a running process; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return f"{socket.gethostname()}/{pid}/{start}"


def this_process() -> str:
    return owner_of(os.getpid()) or f"{socket.gethostname()}/{os.getpid()}/0"


def is_dead(owner: str) -> bool:
    """Whether `owner` names a process of this host that no longer runs.

    Objects of other hosts (a containerd shared over the network) or without an owner
    are never considered dead: they may belong to a live run.
    """
    host, _, rest = owner.partition("/")
    pid = rest.split("/")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return owner_of(int(pid)) != owner
