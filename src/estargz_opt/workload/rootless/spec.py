"""What the shared spec needs to run inside the rootless runner's user namespace.

The spec comes from the same steps as every runner's (`spec.build_spec`); this only
takes out what an unprivileged user namespace cannot have, as `runc spec --rootless`
does: no cgroups (no path, no resource or device rules: the runtime then needs no
cgroup it could not create), no `gid=5` on /dev/pts when that group is not mapped, and
with --net-host (the host's network namespace, which the user namespace does not own,
so sysfs cannot be mounted) the host's /sys bound read-only instead. The workload's
user and group must be ids the namespace maps; without a subordinate range its
supplementary groups are dropped (setgroups is denied there).
"""

from __future__ import annotations

import logging
from typing import Any

from estargz_opt.workload.rootless.checks import IdMapping, several_ids_refusal
from estargz_opt.workload.spec import Spec

log = logging.getLogger("estargz_opt")

_TTY_GID = "gid=5"


def rootless_spec(spec: Spec, mapping: IdMapping) -> Spec:
    """`spec` changed in place for the rootless runner; see the module docstring."""
    linux: dict[str, Any] = spec["linux"]
    linux.pop("cgroupsPath", None)
    linux.pop("resources", None)
    user = spec["process"]["user"]
    extra = user.get("additionalGids") or []
    if not mapping.several and extra:
        # setgroups is denied in a namespace mapped by its unprivileged owner
        dropped = [g for g in extra if g != user.get("gid", 0)]
        if dropped:
            log.warning("rootless: the workload runs without its groups %s", dropped)
        del user["additionalGids"]
        extra = []
    ids = [("uid", user.get("uid", 0)), ("gid", user.get("gid", 0))]
    ids += [("group", g) for g in extra]
    for kind, value in ids:
        if value >= mapping.size:
            how = "" if mapping.several else "; --user 0 runs it as root of the namespace"
            raise several_ids_refusal(
                mapping, f"the workload runs as {kind} {value} (its User, or --user{how})"
            )
    own_netns = any(ns["type"] == "network" for ns in linux["namespaces"])
    for mount in spec["mounts"]:
        options = mount.get("options", [])
        if mount.get("type") == "devpts" and mapping.size <= 5 and _TTY_GID in options:
            options.remove(_TTY_GID)
        if mount.get("type") == "sysfs" and not own_netns:
            mount.update(
                type="bind", source="/sys", options=["rbind", "nosuid", "noexec", "nodev", "ro"]
            )
    return spec
