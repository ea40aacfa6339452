"""containerd's default spec for an unprivileged Linux container, the steps' starting point.

What containerd's client gives by default (`oci.WithDefaultSpec` +
`WithDefaultUnixDevices`): the default capability set, the default pseudo-filesystem
mounts, masked and read-only /proc and /sys paths, new pid/ipc/uts/mount/network
namespaces and RLIMIT_NOFILE 1024. No host path is mounted.
"""

from __future__ import annotations

from typing import Any

#: An OCI runtime spec as JSON-ready dicts and lists.
Spec = dict[str, Any]

OCI_VERSION = "1.0.2-dev"

DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
)

READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

NAMESPACES: tuple[str, ...] = ("pid", "ipc", "uts", "mount", "network")

# (path, major, minor) of the character devices every container gets.
_UNIX_DEVICES: tuple[tuple[str, int, int], ...] = (
    ("/dev/null", 1, 3),
    ("/dev/random", 1, 8),
    ("/dev/full", 1, 7),
    ("/dev/tty", 5, 0),
    ("/dev/zero", 1, 5),
    ("/dev/urandom", 1, 9),
)

# Device cgroup rules beyond the devices above: /dev/pts/*, /dev/ptmx and tun.
_EXTRA_DEVICE_RULES: tuple[dict[str, Any], ...] = (
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},
    {"allow": True, "type": "c", "major": 10, "minor": 200, "access": "rwm"},
)


def default_mounts() -> list[dict[str, Any]]:
    """The pseudo-filesystems every container gets, in containerd's order."""

    def m(dst: str, typ: str, src: str, *opts: str) -> dict[str, Any]:
        return {"destination": dst, "type": typ, "source": src, "options": list(opts)}

    return [
        m("/proc", "proc", "proc", "nosuid", "noexec", "nodev"),
        m("/dev", "tmpfs", "tmpfs", "nosuid", "strictatime", "mode=755", "size=65536k"),
        m(
            "/dev/pts",
            "devpts",
            "devpts",
            "nosuid",
            "noexec",
            "newinstance",
            "ptmxmode=0666",
            "mode=0620",
            "gid=5",
        ),
        m("/dev/shm", "tmpfs", "shm", "nosuid", "noexec", "nodev", "mode=1777", "size=65536k"),
        m("/dev/mqueue", "mqueue", "mqueue", "nosuid", "noexec", "nodev"),
        m("/sys", "sysfs", "sysfs", "nosuid", "noexec", "nodev", "ro"),
        m("/run", "tmpfs", "tmpfs", "nosuid", "strictatime", "mode=755", "size=65536k"),
    ]


def default_spec(rootfs: str, hostname: str, cgroups_path: str | None) -> Spec:
    """A fresh default spec (no list is shared between calls) rooted at `rootfs`."""
    caps = list(DEFAULT_CAPABILITIES)
    process: dict[str, Any] = {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": [],
        "env": [],
        "cwd": "/",
        "capabilities": {"bounding": caps, "effective": list(caps), "permitted": list(caps)},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    }
    rules: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
    devices: list[dict[str, Any]] = []
    for path, major, minor in _UNIX_DEVICES:
        devices.append(
            {
                "path": path,
                "type": "c",
                "major": major,
                "minor": minor,
                "fileMode": 0o666,
                "uid": 0,
                "gid": 0,
            }
        )
        rules.append({"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"})
    rules += [dict(r) for r in _EXTRA_DEVICE_RULES]
    linux: dict[str, Any] = {
        "resources": {"devices": rules},
        "namespaces": [{"type": t} for t in NAMESPACES],
        "devices": devices,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if cgroups_path:
        linux["cgroupsPath"] = cgroups_path
    spec: Spec = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": rootfs},
        "mounts": default_mounts(),
        "linux": linux,
    }
    if hostname:
        spec["hostname"] = hostname
    return spec
