"""How the OCI runtime is run for this host's cgroup layout (v1, hybrid or unified).

runc runs the sample container on every layout. crun (Debian's 1.8, and crun to this
day) refuses a hybrid host whose cgroup v2 hierarchy still holds a controller ("cgroups
in hybrid mode not supported, drop all controllers from cgroupv2"): it checks that
before it looks at its cgroup manager, so neither `--cgroup-manager=disabled` nor a spec
without `cgroupsPath` or resources gets past it (measured on this kind of host, which
leaves hugetlb on v2). There, crun is run in a private mount namespace of its own in
which the v2 hierarchy is unmounted: it then takes the host for a cgroup v1 one and
puts the container in the v1 controllers, as runc does on that host. Nothing changes on
the host, and the namespace goes when the runtime command exits (the container's init
joins the monitor's mount namespace). A sample container needs no cgroup limits, so
leaving the controllers on v2 unused loses nothing. The rootless runner's crun gets an
empty /sys/fs/cgroup the same way (`runtime_prefix(rootless=True)`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from estargz_opt.errors import SampleError

log = logging.getLogger("estargz_opt")

#: where a hybrid host mounts its cgroup v2 hierarchy (systemd's layout)
HYBRID_V2 = "/sys/fs/cgroup/unified"
#: where the containerd runner keeps runtime wrappers (root's only: the shim runs them)
RUNTIME_WRAPPERS = "/run/estargz-opt/runtimes"


def v2_controllers_in_hybrid(cgroup_root: str = "/sys/fs/cgroup") -> list[str]:
    """The controllers a hybrid host leaves on its v2 hierarchy ([] on a v1 or a unified
    host, or on a hybrid one whose v2 hierarchy only tracks processes)."""
    if os.path.exists(os.path.join(cgroup_root, "cgroup.controllers")):
        return []  # unified
    try:
        with open(os.path.join(cgroup_root, "unified", "cgroup.controllers")) as f:
            return f.read().split()
    except OSError:
        return []  # v1 only


def refuses_hybrid(binary: str) -> bool:
    """Whether this runtime is a crun (by what it says it is: a wrapper that execs runc
    is runc), which refuses a hybrid host with controllers on v2."""
    try:
        out = subprocess.run(
            [binary, "--version"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return out.startswith("crun ")


def runtime_prefix(binary: str, *, rootless: bool = False) -> tuple[str, ...]:
    """What the runtime `binary` is run under on this host: nothing, or (crun on a
    hybrid host with controllers on v2) a private mount namespace without cgroup v2.

    As root, only the v2 hierarchy is unmounted there, so crun uses the v1 controllers.
    In a user namespace (`rootless`, crun run with `--cgroup-manager=disabled`), the
    host's cgroup mounts cannot be unmounted (they are locked), but an empty tmpfs can
    be mounted over /sys/fs/cgroup: crun then finds no hybrid layout to refuse, and
    makes no cgroup (the rootless runner uses none)."""
    if not v2_controllers_in_hybrid() or not refuses_hybrid(binary):
        return ()
    tool = "mount" if rootless else "umount"
    tools = {name: shutil.which(name) for name in ("unshare", tool, "sh")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise SampleError(
            f"{os.path.basename(binary)} refuses this hybrid cgroup host, and running it "
            f"without cgroup v2 needs {', '.join(missing)} (util-linux): install it, or "
            "use --runtime runc"
        )
    unshare, hider, sh = (str(tools[n]) for n in ("unshare", tool, "sh"))
    hide = (
        f"{hider} -t tmpfs -o size=4k,mode=755 tmpfs {os.path.dirname(HYBRID_V2)}"
        if rootless
        else f"{hider} -l {HYBRID_V2}"
    )
    # Checked again where the runtime runs: containerd's shim may see another layout
    # (a containerd started in a mount namespace of its own).
    script = (
        f'if read -r c < {HYBRID_V2}/cgroup.controllers 2>/dev/null && [ -n "$c" ]; '
        f'then {hide} || exit 125; fi; exec "$@"'
    )
    return (unshare, "--mount", "--propagation", "private", "--", sh, "-c", script, "sh")


def wrapped_runtime(binary: str, directory: Path) -> str:
    """The runtime as one executable, for containerd's shim (which takes a binary, not a
    command line): `binary` itself, or a script in `directory` (root's only) that runs
    it under `runtime_prefix`. The script is named after its content, written once."""
    prefix = runtime_prefix(binary)
    if not prefix:
        return binary
    text = f'#!/bin/sh\nexec {shlex.join([*prefix, binary])} "$@"\n'
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = directory / f"{os.path.basename(binary)}-cgroup-v1-{digest}"
    if path.is_file():
        return str(path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o700)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return str(path)


def remove_cgroup(cgroups_path: str, mountinfo: str = "/proc/self/mountinfo") -> None:
    """Remove the (empty) cgroup `cgroups_path` from every cgroup hierarchy mounted here.

    A runtime that fails after it made the container's cgroups (crun on cgroup v2 when it
    cannot load its device filter) leaves them, and its `delete` knows no container to
    remove them with. A cgroup that still has processes is left (and logged)."""
    rel = cgroups_path.strip("/")
    if not rel:
        return
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.split(" - ", 1)
        if len(fields) != 2 or fields[1].split(" ", 1)[0] not in ("cgroup", "cgroup2"):
            continue
        mount_point = fields[0].split(" ")[4].replace("\\040", " ")
        try:
            os.rmdir(os.path.join(mount_point, rel))
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cleanup: cannot remove cgroup %s in %s: %s", rel, mount_point, exc)
