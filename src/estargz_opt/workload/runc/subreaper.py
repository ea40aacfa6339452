"""Waiting for a container's init without being its shim: estargz-opt becomes a child
subreaper, so the init the runtime double-forks is re-parented to it, and its exit
status is ours to read."""

from __future__ import annotations

import ctypes
import os
import time

from estargz_opt.errors import SampleError

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Have orphaned descendants re-parented to this process, so that the container's
    init (which the runtime double-forks) is our child and its exit status ours to read."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SampleError(f"cannot become a child subreaper: {os.strerror(ctypes.get_errno())}")


def wait_orphan(pid: int) -> int | None:
    """Wait for `pid` (re-parented to us) to exit; its status as a shell reports it
    (128+N for a signal), or None if it was not our child after all (another subreaper
    above the runtime took it: then it is polled until gone)."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        while os.path.exists(f"/proc/{pid}"):
            time.sleep(0.1)
        return None
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
