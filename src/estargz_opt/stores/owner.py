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


def temp_prefix(kind: str) -> str:
    """`.KIND@host@pid@start@`: the owner of a temporary file, in its name (host names
    hold no '/' or '@'; mkstemp's random part holds neither)."""
    return f".{kind}@{this_process().replace('/', '@')}@"


def temp_owner(name: str) -> str | None:
    """The owner a temporary file's name (`temp_prefix` + mkstemp's part + `.tmp`)
    carries; None for any other file."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    parts = name[1:-4].split("@")
    return "/".join(parts[1:4]) if len(parts) == 5 else None
