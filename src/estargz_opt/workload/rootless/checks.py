"""What a rootless run needs from the host, checked before anything is made.

Each refusal is one line naming the exact reason and the ways out. The inputs (the
kernel release, the /proc/sys directory, the id files) are parameters with the host's
as defaults, so a test can make each reason true without touching the host.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from estargz_opt.errors import RootlessUnavailableError

#: fanotify filesystem marks inside a user namespace (commit 58f5fbeb367f).
MIN_KERNEL = (6, 16)

WAYS_OUT = (
    "run as root, or convert without running the workload: --record-in FILE (a record "
    "made by `estargz-opt analyze --record-out` where that works) or --prefetch-list FILE"
)


def refuse(reason: str) -> RootlessUnavailableError:
    return RootlessUnavailableError(f"cannot run the workload rootless: {reason}; {WAYS_OUT}")


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a `uname -r` string such as "6.18.44-fc"; (0, 0) if unreadable."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_kernel(release: str) -> None:
    if kernel_version(release) < MIN_KERNEL:
        need = ".".join(map(str, MIN_KERNEL))
        raise refuse(
            f"Linux {release} is older than {need}, the first to allow fanotify filesystem "
            f"marks inside a user namespace"
        )


def _sysctl(proc_sys: str, name: str) -> str | None:
    try:
        with open(os.path.join(proc_sys, *name.split("."))) as f:
            return f.read().strip()
    except OSError:
        return None


def check_userns(proc_sys: str = "/proc/sys") -> None:
    """Unprivileged user namespaces: the sysctls that turn them off, then a real try."""
    if _sysctl(proc_sys, "kernel.unprivileged_userns_clone") == "0":
        raise refuse(
            "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0)"
        )
    if _sysctl(proc_sys, "user.max_user_namespaces") == "0":
        raise refuse("user namespaces are disabled (user.max_user_namespaces=0)")
    if _sysctl(proc_sys, "kernel.apparmor_restrict_unprivileged_userns") == "1":
        raise refuse(
            "AppArmor restricts unprivileged user namespaces "
            "(kernel.apparmor_restrict_unprivileged_userns=1)"
        )
    err = probe_userns()
    if err:
        raise refuse(f"this process cannot create a user namespace ({os.strerror(err)})")


_PROBE = (
    "import ctypes, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "sys.exit(0 if libc.unshare(0x10000000) == 0 else ctypes.get_errno())\n"
)


def probe_userns() -> int:
    """0 if a child of ours can unshare a user namespace, else its errno."""
    return subprocess.run([sys.executable, "-c", _PROBE], check=False).returncode


@dataclass(frozen=True, slots=True)
class IdRange:
    """One /etc/subuid or /etc/subgid line of the caller's: `count` ids from `start`."""

    start: int
    count: int


@dataclass(frozen=True, slots=True)
class IdMapping:
    """The ids of the user namespace: the caller's own is 0; `sub_*` map 1..count."""

    uid: int
    gid: int
    sub_uids: IdRange | None = None
    sub_gids: IdRange | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> IdMapping:
        """The mapping from its `dataclasses.asdict` form (the helper's command line)."""
        users, groups = raw.get("sub_uids"), raw.get("sub_gids")
        return cls(
            int(raw["uid"]),
            int(raw["gid"]),
            IdRange(**users) if users else None,
            IdRange(**groups) if groups else None,
        )

    @property
    def several(self) -> bool:
        return self.sub_uids is not None and self.sub_gids is not None

    @property
    def size(self) -> int:
        """How many ids (from 0) files and processes may use in the namespace."""
        if self.sub_uids is None or self.sub_gids is None:
            return 1
        return 1 + min(self.sub_uids.count, self.sub_gids.count)


def _sub_range(path: str, uid: int) -> IdRange | None:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (str(uid), name):
            continue
        if parts[1].isdigit() and parts[2].isdigit() and int(parts[2]) > 0:
            return IdRange(int(parts[1]), int(parts[2]))
    return None


CAP_SETGID, CAP_SETUID = 6, 7


def _status(field: str) -> str:
    """A field of /proc/self/status ("" if unreadable)."""
    try:
        with open("/proc/self/status") as f:
            return next((x.split(":", 1)[1].strip() for x in f if x.startswith(f"{field}:")), "")
    except OSError:
        return ""


def setuid_helper_obstacle() -> str:
    """Why newuidmap/newgidmap (setuid root) cannot work for us, or "" if they can: they
    get CAP_SETUID/CAP_SETGID only if our bounding set still has them (a runner started
    with an empty one cannot use them), and no setuid binary gains anything under
    no_new_privs (Kubernetes' allowPrivilegeEscalation: false, docker's
    no-new-privileges)."""
    if _status("NoNewPrivs") == "1":
        return "newuidmap cannot gain privileges under no_new_privs"
    bounding = int(_status("CapBnd") or "0", 16)
    if not all(bounding >> cap & 1 for cap in (CAP_SETUID, CAP_SETGID)):
        return "newuidmap cannot work without CAP_SETUID and CAP_SETGID in the bounding set"
    return ""


def plan_ids(
    uid: int, gid: int, *, subuid: str = "/etc/subuid", subgid: str = "/etc/subgid"
) -> IdMapping:
    """Several ids when newuidmap/newgidmap and the caller's ranges are there, else one."""
    if shutil.which("newuidmap") is None or shutil.which("newgidmap") is None:
        return IdMapping(uid, gid)
    if setuid_helper_obstacle():
        return IdMapping(uid, gid)
    users, groups = _sub_range(subuid, uid), _sub_range(subgid, uid)
    if users is None or groups is None:
        return IdMapping(uid, gid)
    return IdMapping(uid, gid, users, groups)


def one_id_reason(mapping: IdMapping) -> str:
    """Why only the caller's own id can be mapped (for the info line and the refusals)."""
    if shutil.which("newuidmap") is None or shutil.which("newgidmap") is None:
        return "newuidmap and newgidmap (apt-get install uidmap) are not installed"
    no_range = f"uid {mapping.uid} has no range in /etc/subuid and /etc/subgid"
    return setuid_helper_obstacle() or no_range


#: What a run with one id does, said once per run (podman's ignore_chown_errors).
ONE_ID = (
    "every file of the image is unpacked as your id and the workload runs as root of its "
    "user namespace (as podman's ignore_chown_errors); only a workload whose user or group "
    "is not root cannot run this way"
)


def several_ids_refusal(mapping: IdMapping, why: str) -> RootlessUnavailableError:
    """The image needs ids the namespace does not have; say what would give them."""
    if mapping.several:
        return refuse(f"{why}, beyond the {mapping.size} ids of this user's /etc/subuid range")
    return refuse(f"{why}, and only your own id can be mapped: {one_id_reason(mapping)}")


def is_real_root() -> bool:
    """Root in the initial user namespace (the rootless runner is for everyone else)."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            first = f.read().split()
    except OSError:
        return True
    return first[:3] == ["0", "0", "4294967295"]


def mem_available(meminfo: str = "/proc/meminfo") -> int:
    """MemAvailable in bytes: what a tmpfs can take without pushing anything out."""
    with open(meminfo) as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_refusal(what: str, available: int) -> RootlessUnavailableError:
    """`what` (the image, with its size) is larger than the memory a tmpfs can take."""
    return refuse(
        f"{what} does not fit in memory, where a rootless run holds the rootfs "
        f"(MemAvailable {available >> 20} MiB)"
    )
