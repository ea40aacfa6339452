"""The OCI runtime spec of the sample container, and the sampler flags that shape it.

The sample container gets what containerd's client gives an unprivileged Linux container
by default (`oci.WithDefaultSpec` + `WithDefaultUnixDevices`): the default capability
set, the default pseudo-filesystem mounts, masked and read-only /proc and /sys paths,
new pid/ipc/uts/mount/network namespaces and RLIMIT_NOFILE 1024. On top of that come the
image config (user, env, working dir, entrypoint + cmd) and the sampler flags, applied in
ctr-remote's order:

    image config → --env → --mount → resolv.conf/hosts → entrypoint/args
                 → --env-file → --user → --cwd → -t → CNI netns / --net-host

so `--env-file` is applied after `--env` and wins over it for the same key, exactly as
upstream. No host path is mounted unless a flag asks for it.

Everything here is a pure function over dicts; the only I/O is reading files named by
flags (`--env-file`) and the image's /etc/passwd and /etc/group, which are read through
a resolver confined to the rootfs: a hostile image cannot point them at host files.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import stat
from dataclasses import dataclass, field
from typing import Any

from estargz_opt.errors import BadInputError
from estargz_opt.stores.containerd.model import DEFAULT_NAMESPACE

OCI_VERSION = "1.0.2-dev"

DEFAULT_PERIOD = 10

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

# Docker's /etc/hosts defaults, which upstream writes before the --add-hosts lines.
HOSTS_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("127.0.0.1", "localhost"),
    ("::1", "localhost ip6-localhost ip6-loopback"),
    ("fe00::0", "ip6-localnet"),
    ("ff00::0", "ip6-mcastprefix"),
    ("ff02::1", "ip6-allnodes"),
    ("ff02::2", "ip6-allrouters"),
)

# (path, major, minor) of the character devices every container gets.
_UNIX_DEVICES: tuple[tuple[str, int, int], ...] = (
    ("/dev/null", 1, 3),
    ("/dev/random", 1, 8),
    ("/dev/full", 1, 7),
    ("/dev/tty", 5, 0),
    ("/dev/zero", 1, 5),
    ("/dev/urandom", 1, 9),
)

_MAX_SYMLINKS = 40
_MAX_DB_SIZE = 8 << 20  # /etc/passwd or /etc/group larger than this is refused


def _default_mounts() -> list[dict[str, Any]]:
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


# --------------------------------------------------------------------------------------
# Sampler flags


@dataclass(slots=True)
class SamplerOptions:
    """Every sampler flag of `ctr-remote image optimize`, with upstream's defaults.

    Strings that upstream treats as "not given" when empty are kept as "" here too.
    """

    terminal: bool = False  # -t/--terminal; needs stdin
    stdin: bool = False  # -i
    period: int = DEFAULT_PERIOD  # seconds; <= 0 means the default
    user: str = ""  # user[:group], names or numbers
    cwd: str = ""
    args: str = ""  # JSON array; replaces the image Cmd
    entrypoint: str = ""  # JSON array; replaces the image Entrypoint (Cmd is kept)
    env: list[str] = field(default_factory=list)  # K=V, added or overridden
    env_file: str = ""  # one K=V per line
    mounts: list[str] = field(default_factory=list)  # type=…,source=…,destination=…,options=a:b
    dns_nameservers: str = "8.8.8.8"  # CSV
    dns_search_domains: str = ""  # CSV
    dns_options: str = ""  # CSV
    add_hosts: str = ""  # CSV of host:IP
    cni: bool = False
    cni_plugin_conf_dir: str = ""
    cni_plugin_dir: str = ""
    gpus: str = ""  # "all" or "0,1"
    net_host: bool = False
    wait_on_line: str = ""
    wait_on_signal: bool = False

    @property
    def effective_period(self) -> int:
        """The monitoring time in seconds: `period`, or the default when it is <= 0."""
        return self.period if self.period > 0 else DEFAULT_PERIOD

    def validate(self) -> None:
        """Reject flag combinations and values upstream refuses, with one clear line."""
        if self.terminal and not self.stdin:
            raise BadInputError("-t/--terminal requires -i")
        if self.wait_on_signal and self.terminal:
            raise BadInputError("--wait-on-signal cannot be used with -t/--terminal")
        parse_json_array("--args", self.args)
        parse_json_array("--entrypoint", self.entrypoint)
        for m in self.mounts:
            parse_mount(m)
        parse_add_hosts(self.add_hosts)
        parse_gpus(self.gpus)
        if self.cwd and not self.cwd.startswith("/"):
            raise BadInputError(f"--cwd {self.cwd!r} must be an absolute path")
        for e in self.env:
            _check_env_entry("--env", e)


def parse_json_array(flag: str, text: str) -> list[str] | None:
    """Parse a JSON-array flag value; None when the flag was not given ("")."""
    if text == "":
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInputError(f"{flag} must be a JSON array of strings: {e.msg}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadInputError(f"{flag} must be a JSON array of strings, got {text!r}")
    return value


def _csv_items(text: str) -> list[str]:
    return [item for item in text.split(",") if item != ""]


def parse_mount(text: str) -> dict[str, Any]:
    """Parse one `--mount` value into an OCI spec mount.

    The value is a CSV of `key=val` fields; keys are type, source|src, destination|dst
    and options (colon-separated). Each field must contain exactly one '='.
    """
    try:
        rows = list(csv.reader([text], strict=True))
    except csv.Error as e:
        raise BadInputError(f"invalid --mount {text!r}: {e}") from None
    fields = rows[0] if rows else []
    mount: dict[str, Any] = {}
    for f in fields:
        if f.count("=") != 1:
            raise BadInputError(f"invalid --mount {text!r}: field {f!r} is not key=val")
        key, val = f.split("=")
        if key == "type":
            mount["type"] = val
        elif key in ("source", "src"):
            mount["source"] = val
        elif key in ("destination", "dst"):
            mount["destination"] = val
        elif key == "options":
            mount["options"] = val.split(":")
        else:
            raise BadInputError(f"invalid --mount {text!r}: key {key!r} is not supported")
    dst = mount.get("destination", "")
    if not dst:
        raise BadInputError(f"invalid --mount {text!r}: destination is missing")
    if not dst.startswith("/"):
        raise BadInputError(f"invalid --mount {text!r}: destination must be absolute")
    out: dict[str, Any] = {"destination": dst}
    for k in ("type", "source", "options"):
        if mount.get(k):
            out[k] = mount[k]
    return out


def parse_add_hosts(text: str) -> list[tuple[str, str]]:
    """`--add-hosts` CSV of host:IP → [(host, ip)]. The IP may itself contain ':'."""
    out = []
    for item in _csv_items(text):
        host, sep, ip = item.partition(":")
        if not sep or not host or not ip:
            raise BadInputError(f"invalid --add-hosts entry {item!r}: expected host:IP")
        out.append((host, ip))
    return out


def find_gpu_hook() -> str | None:
    """The NVIDIA Container Toolkit's OCI prestart hook, if installed."""
    import shutil

    return shutil.which("nvidia-container-runtime-hook") or shutil.which("nvidia-container-toolkit")


def parse_gpus(text: str) -> list[str]:
    """`--gpus` → CDI device names: "all" or comma-separated indices."""
    if text == "":
        return []
    if text == "all":
        return ["nvidia.com/gpu=all"]
    out = []
    for item in text.split(","):
        if not item.strip().isdigit():
            raise BadInputError(f"invalid --gpus {text!r}: expected 'all' or indices like 0,1")
        out.append(f"nvidia.com/gpu={int(item)}")
    return out


def resolv_conf(opts: SamplerOptions) -> str:
    """The /etc/resolv.conf the sample container gets (unless --net-host)."""
    lines = [f"nameserver {ns}\n" for ns in _csv_items(opts.dns_nameservers)]
    search = _csv_items(opts.dns_search_domains)
    if search:
        lines.append("search " + " ".join(search) + "\n")
    options = _csv_items(opts.dns_options)
    if options:
        lines.append("options " + " ".join(options) + "\n")
    return "".join(lines)


def hosts_file(opts: SamplerOptions) -> str:
    """The /etc/hosts the sample container gets (unless --net-host)."""
    entries = list(HOSTS_DEFAULTS) + [(ip, h) for h, ip in parse_add_hosts(opts.add_hosts)]
    return "".join(f"{ip}\t{names}\n" for ip, names in entries)


# --------------------------------------------------------------------------------------
# Environment


def _check_env_entry(flag: str, entry: str) -> None:
    if entry.startswith("="):
        raise BadInputError(f"invalid {flag} entry {entry!r}: the variable name is empty")


def merge_env(base: list[str], overrides: list[str]) -> list[str]:
    """containerd's env merge: an override replaces the same key in place or is appended;
    a bare `KEY` (no '=') unsets KEY. Order of first appearance is kept."""
    result: list[str | None] = list(base)
    index: dict[str, int] = {}
    for i, e in enumerate(base):
        index.setdefault(e.partition("=")[0], i)
    for e in overrides:
        key, sep, _ = e.partition("=")
        if not sep:
            if key in index:
                result[index.pop(key)] = None
            continue
        if key in index:
            result[index[key]] = e
        else:
            index[key] = len(result)
            result.append(e)
    return [e for e in result if e is not None]


def read_env_file(path: str) -> list[str]:
    """`--env-file`: one K=V per line; empty lines and lines starting with '#' are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise BadInputError(f"cannot read --env-file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise BadInputError(f"--env-file {path} is not UTF-8 text") from None
    out = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        _check_env_entry("--env-file", line)
        out.append(line)
    return out


# --------------------------------------------------------------------------------------
# Reading files inside the rootfs without ever leaving it


def _open_in_root(root: str, path: str) -> int | None:
    """Open `path` inside the directory `root` as if `root` were '/'.

    Each component is opened relative to its parent's fd with O_NOFOLLOW; symlinks are
    read with readlinkat and resolved by hand, with absolute targets and '..' clamped at
    `root`. Nothing outside `root` can be reached, whatever the image contains (a
    symlink swapped in between the readlink and the open makes the open fail with
    ELOOP). Returns an fd of a regular file, or None when there is no such file.
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    dirs = [root_fd]
    pending = [p for p in path.split("/") if p not in ("", ".")]
    pending.reverse()  # a stack: the next component is at the end
    links = 0
    try:
        while pending:
            name = pending.pop()
            if name == "..":
                if len(dirs) > 1:
                    os.close(dirs.pop())
                continue
            try:
                target = os.readlink(name, dir_fd=dirs[-1])
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    return None
                if e.errno != errno.EINVAL:  # EINVAL: not a symlink
                    raise
            else:
                links += 1
                if links > _MAX_SYMLINKS:
                    return None
                if target.startswith("/"):
                    while len(dirs) > 1:
                        os.close(dirs.pop())
                parts = [p for p in target.split("/") if p not in ("", ".")]
                pending.extend(reversed(parts))
                continue
            last = not pending
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            if not last:
                flags |= os.O_DIRECTORY
            try:
                fd = os.open(name, flags, dir_fd=dirs[-1])
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EISDIR):
                    return None
                raise
            if last:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    return None
                return fd
            dirs.append(fd)
        return None
    finally:
        for d in dirs:
            os.close(d)


def read_rootfs_file(rootfs: str, path: str, limit: int = _MAX_DB_SIZE) -> str | None:
    """Text of the regular file `path` inside `rootfs` (see _open_in_root), or None."""
    try:
        fd = _open_in_root(rootfs, path)
    except OSError as e:
        raise BadInputError(f"cannot read {path} in the image rootfs: {e.strerror}") from None
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BadInputError(f"{path} in the image rootfs is larger than {limit} bytes")
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class _Passwd:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class _Group:
    name: str
    gid: int
    members: tuple[str, ...]


def _passwd_entries(rootfs: str) -> list[_Passwd] | None:
    text = read_rootfs_file(rootfs, "/etc/passwd")
    if text is None:
        return None
    out = []
    for line in text.splitlines():
        f = line.split(":")
        if len(f) < 4 or line.startswith("#"):
            continue
        try:
            out.append(_Passwd(f[0], int(f[2]), int(f[3])))
        except ValueError:
            continue
    return out


def _group_entries(rootfs: str) -> list[_Group] | None:
    text = read_rootfs_file(rootfs, "/etc/group")
    if text is None:
        return None
    out = []
    for line in text.splitlines():
        f = line.split(":")
        if len(f) < 3 or line.startswith("#"):
            continue
        try:
            gid = int(f[2])
        except ValueError:
            continue
        members = tuple(m for m in (f[3] if len(f) > 3 else "").split(",") if m)
        out.append(_Group(f[0], gid, members))
    return out


def _as_id(text: str) -> int | None:
    if text.isdigit():
        v = int(text)
        if v < 2**32:
            return v
    return None


def resolve_user(rootfs: str, userstr: str) -> dict[str, Any]:
    """containerd's `WithUser` + `WithAdditionalGIDs`: "user[:group]" → the spec's
    process.user. Numbers map directly; names are looked up in the image's /etc/passwd
    and /etc/group. The primary gid and the user's supplementary groups form
    additionalGids."""
    user_part, sep, group_part = userstr.partition(":")
    if sep and not group_part:
        raise BadInputError(f"invalid user {userstr!r}: the group is empty")
    passwd: list[_Passwd] | None = None
    uid = _as_id(user_part) if user_part else 0
    username: str | None = None
    gid: int | None = None
    if uid is None:
        passwd = _passwd_entries(rootfs)
        match = [p for p in passwd or [] if p.name == user_part]
        if not match:
            raise BadInputError(f"user {user_part!r} is not in the image's /etc/passwd")
        uid, gid, username = match[0].uid, match[0].gid, match[0].name
    if sep:
        gid = _as_id(group_part)
        if gid is None:
            groups = _group_entries(rootfs)
            gmatch = [g for g in groups or [] if g.name == group_part]
            if not gmatch:
                raise BadInputError(f"group {group_part!r} is not in the image's /etc/group")
            gid = gmatch[0].gid
    if gid is None or username is None:
        if passwd is None:
            passwd = _passwd_entries(rootfs)
        byuid = [p for p in passwd or [] if p.uid == uid]
        if byuid:
            username = byuid[0].name
            if gid is None:
                gid = byuid[0].gid
    if gid is None:
        gid = 0
    additional = [gid]
    if username is not None:
        for g in _group_entries(rootfs) or []:
            if username in g.members and g.gid not in additional:
                additional.append(g.gid)
    return {"uid": uid, "gid": gid, "additionalGids": additional}


# --------------------------------------------------------------------------------------
# Image config and spec


def _config_section(image_config: dict[str, Any]) -> dict[str, Any]:
    """Accept either the whole OCI image config document or its "config" object."""
    inner = image_config.get("config")
    if isinstance(inner, dict):
        return inner
    if "rootfs" in image_config or "architecture" in image_config:
        return {}  # a full document whose "config" is null
    return image_config


def parse_signal(text: str) -> int:
    """A signal given as "SIGTERM", "TERM", "15" or "SIGRTMIN+3" → its number."""
    s = text.strip()
    if s.isdigit():
        n = int(s)
        if 0 < n < signal.NSIG:
            return n
        raise BadInputError(f"invalid stop signal {text!r}")
    name = s.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    base, plus, off = name.partition("+")
    base2, minus, off2 = name.partition("-")
    try:
        if plus and base == "SIGRTMIN" and off.isdigit():
            n = signal.SIGRTMIN + int(off)
        elif minus and base2 == "SIGRTMAX" and off2.isdigit():
            n = signal.SIGRTMAX - int(off2)
        else:
            n = int(signal.Signals[name])
    except KeyError:
        raise BadInputError(f"invalid stop signal {text!r}") from None
    if not 0 < n < signal.NSIG:
        raise BadInputError(f"invalid stop signal {text!r}")
    return n


def stop_signal(image_config: dict[str, Any], default: str = "SIGKILL") -> int:
    """The signal that ends the sample container: the image's StopSignal, else `default`.

    ctr-remote uses `WithImageStopSignal(img, "SIGKILL")`, hence SIGKILL by default; pass
    default="SIGTERM" for containerd's usual default.
    """
    value = _config_section(image_config).get("StopSignal") or ""
    return parse_signal(value or default)


def process_args(image_config: dict[str, Any], opts: SamplerOptions) -> list[str]:
    """(--entrypoint or Entrypoint) + (--args or Cmd). --entrypoint does not clear Cmd."""
    cfg = _config_section(image_config)
    entrypoint = parse_json_array("--entrypoint", opts.entrypoint)
    if entrypoint is None:
        entrypoint = list(cfg.get("Entrypoint") or [])
    cmd = parse_json_array("--args", opts.args)
    if cmd is None:
        cmd = list(cfg.get("Cmd") or [])
    return entrypoint + cmd


def build_spec(
    image_config: dict[str, Any],
    opts: SamplerOptions,
    rootfs: str,
    hostname: str,
    *,
    etc_dir: str | None = None,
    mount_ns_path: str | None = None,
    netns_path: str | None = None,
    container_id: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    files_root: str | None = None,
    gpu_hook: str | None = None,
) -> dict[str, Any]:
    """The OCI runtime spec (a JSON-ready dict) for the sample container.

    rootfs: the absolute path of the mounted snapshot.
    etc_dir: the directory holding the generated `resolv.conf` and `hosts`
        (from resolv_conf/hosts_file); they are bind-mounted onto /etc. With
        --net-host the host's files are bound read-only instead.
    mount_ns_path: /proc/<pid>/ns/mnt of the fanotify monitor, for the container to join.
    netns_path: the CNI network namespace to join (--cni).
    container_id/namespace: give the cgroups path /<namespace>/<id> as containerd does.
    files_root: where this process can read the rootfs's /etc/passwd and /etc/group, when
        `rootfs` is mounted only in another mount namespace (default: `rootfs`).
    gpu_hook: the NVIDIA container runtime hook, needed for --gpus (see find_gpu_hook).
    """
    opts.validate()
    if not os.path.isabs(rootfs):
        raise BadInputError(f"rootfs {rootfs!r} must be an absolute path")
    cfg = _config_section(image_config)
    files = files_root or rootfs

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
    resources_devices: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
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
        resources_devices.append(
            {"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"}
        )
    resources_devices += [
        {"allow": True, "type": "c", "major": 136, "access": "rwm"},  # /dev/pts/*
        {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},  # /dev/ptmx
        {"allow": True, "type": "c", "major": 10, "minor": 200, "access": "rwm"},  # tun
    ]
    namespaces: list[dict[str, Any]] = [{"type": t} for t in NAMESPACES]
    linux: dict[str, Any] = {
        "resources": {"devices": resources_devices},
        "namespaces": namespaces,
        "devices": devices,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if container_id:
        linux["cgroupsPath"] = f"/{namespace}/{container_id}"
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": rootfs},
        "mounts": _default_mounts(),
        "linux": linux,
    }
    if hostname:
        spec["hostname"] = hostname

    # Image config (WithImageConfig): env, args, cwd, user.
    process["env"] = merge_env(list(cfg.get("Env") or [DEFAULT_PATH_ENV]), [])
    process["cwd"] = cfg.get("WorkingDir") or "/"
    process["user"] = resolve_user(files, cfg.get("User") or "")

    # --env
    process["env"] = merge_env(process["env"], opts.env)
    # --mount
    spec["mounts"] += [parse_mount(m) for m in opts.mounts]
    # resolv.conf and hosts: generated files, or the host's with --net-host.
    if opts.net_host:
        for f in ("/etc/hosts", "/etc/resolv.conf"):
            spec["mounts"].append(
                {"destination": f, "type": "bind", "source": f, "options": ["rbind", "ro"]}
            )
    elif etc_dir is not None:
        for name in ("resolv.conf", "hosts"):
            spec["mounts"].append(
                {
                    "destination": f"/etc/{name}",
                    "type": "bind",
                    "source": os.path.join(etc_dir, name),
                    "options": ["bind"],
                }
            )
    # entrypoint and args
    args = process_args(image_config, opts)
    if not args:
        raise BadInputError(
            "the image has no Entrypoint or Cmd; give one with --entrypoint or --args"
        )
    process["args"] = args
    # --env-file (after --env, so it wins for the same key, as upstream)
    if opts.env_file:
        process["env"] = merge_env(process["env"], read_env_file(opts.env_file))
    if opts.user:
        process["user"] = resolve_user(files, opts.user)
    if opts.cwd:
        process["cwd"] = opts.cwd
    if opts.terminal:
        process["terminal"] = True
        process["env"] = [*process["env"], "TERM=xterm"]
    # Networking: CNI netns, or the host's network namespace.
    if opts.net_host:
        linux["namespaces"] = [ns for ns in namespaces if ns["type"] != "network"]
    elif netns_path is not None:
        for ns in namespaces:
            if ns["type"] == "network":
                ns["path"] = netns_path
    # GPUs: the NVIDIA Container Toolkit's prestart hook injects the devices and the
    # driver libraries the NVIDIA_* variables ask for (what `--gpus` does in docker).
    if opts.gpus:
        gpus = parse_gpus(opts.gpus)
        if gpu_hook is None:
            raise BadInputError(
                "--gpus needs the NVIDIA Container Toolkit (nvidia-container-runtime-hook "
                "was not found on PATH)"
            )
        visible = ",".join(d.split("=", 1)[1] for d in gpus)
        process["env"] = merge_env(
            process["env"],
            [f"NVIDIA_VISIBLE_DEVICES={visible}", "NVIDIA_DRIVER_CAPABILITIES=all"],
        )
        spec["hooks"] = {
            "prestart": [{"path": gpu_hook, "args": [os.path.basename(gpu_hook), "prestart"]}]
        }
    # The monitor's mount namespace comes last, as the analyzer appends it.
    if mount_ns_path is not None:
        for ns in linux["namespaces"]:
            if ns["type"] == "mount":
                ns["path"] = mount_ns_path
    return spec
