"""Can this host run a foreign platform's workload? Through qemu-user's binfmt_misc entries.

A foreign binary runs in a container only when the kernel's binfmt_misc entry for its
architecture has the F (fix-binary) flag: the interpreter is opened at registration, so
it need not exist inside the container's root filesystem (and so never enters the
record). Debian's qemu-user-static ships those entries as systemd-binfmt files; where
they are not registered and we are root, we register them ourselves, as systemd-binfmt
would at boot.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from estargz_opt import platforms
from estargz_opt.descriptor import Platform
from estargz_opt.errors import EmulationUnavailableError, MountError
from estargz_opt.workload.mounts import _mount

log = logging.getLogger("estargz_opt")

BINFMT_MISC = Path("/proc/sys/fs/binfmt_misc")
#: where Debian's qemu-user-static puts its systemd-binfmt entries (one line each)
BINFMT_D = Path("/usr/lib/binfmt.d")
PACKAGE = "qemu-user-static"

#: OCI architecture -> qemu's name for it (the binfmt entry is qemu-<name>)
_QEMU_ARCH = {
    "arm64": "aarch64",
    "arm": "arm",
    "386": "i386",
    "amd64": "x86_64",
    "ppc64le": "ppc64le",
    "ppc64": "ppc64",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "mips64le": "mips64el",
    "mips64": "mips64",
    "mipsle": "mipsel",
    "mips": "mips",
    "loong64": "loongarch64",
}


@dataclass(frozen=True, slots=True)
class Emulation:
    """How a platform's workload runs here: natively (`entry` None) or under `entry`."""

    platform: Platform
    entry: str | None = None
    interpreter: str | None = None

    def describe(self) -> str:
        if self.entry is None:
            return f"{self.platform} (native)"
        return f"{self.platform} (emulated by {self.interpreter})"


@dataclass(frozen=True, slots=True)
class BinfmtEntry:
    """One registered binfmt_misc entry, as the kernel shows it."""

    name: str
    enabled: bool
    interpreter: str
    flags: str

    @classmethod
    def read(cls, path: Path) -> BinfmtEntry | None:
        try:
            text = path.read_text()
        except OSError:
            return None
        fields: dict[str, str] = {}
        enabled = False
        for line in text.splitlines():
            if line == "enabled":
                enabled = True
            key, _, value = line.partition(" ")
            fields[key.rstrip(":")] = value.strip()
        return cls(path.name, enabled, fields.get("interpreter", ""), fields.get("flags", ""))


def is_native(p: Platform) -> bool:
    """The host runs `p` without emulation (same architecture; amd64 hosts also run 386)."""
    _, arch, variant = platforms.normalize(p)
    _, host_arch, host_variant = platforms.normalize(platforms.host())
    if arch == host_arch:
        return variant == host_variant or not variant
    return (host_arch, arch) == ("amd64", "386")


def qemu_name(p: Platform) -> str | None:
    return _QEMU_ARCH.get(platforms.normalize(p)[1])


def find(p: Platform, binfmt: Path = BINFMT_MISC, binfmt_d: Path = BINFMT_D) -> Emulation:
    """How `p`'s workload runs here, registering Debian's qemu entry if we may.

    Raises EmulationUnavailableError (one line naming the package) when it cannot run.
    """
    if is_native(p):
        return Emulation(p)
    name = qemu_name(p)
    if name is None:
        raise EmulationUnavailableError(f"no emulator is known for platform {p}")
    entry_name = f"qemu-{name}"
    entry = BinfmtEntry.read(binfmt / entry_name)
    if entry is None:
        _register(entry_name, binfmt, binfmt_d)
        entry = BinfmtEntry.read(binfmt / entry_name)
    where = f"the {p} workload cannot run on this {platforms.host()} host"
    if entry is None:
        raise EmulationUnavailableError(
            f"{where}: no binfmt_misc entry {entry_name} "
            f"(apt-get install {PACKAGE}, and mount binfmt_misc at {binfmt} as root)"
        )
    if not entry.enabled:
        raise EmulationUnavailableError(f"{where}: the binfmt_misc entry {entry_name} is disabled")
    if "F" not in entry.flags:
        raise EmulationUnavailableError(
            f"{where}: the binfmt_misc entry {entry_name} lacks the F (fix-binary) flag, so "
            f"its interpreter {entry.interpreter} is not found in the container "
            f"(use the entries of Debian's {PACKAGE})"
        )
    return Emulation(p, entry_name, entry.interpreter)


def _register(entry_name: str, binfmt: Path, binfmt_d: Path) -> None:
    """Register Debian's entry for `entry_name` as systemd-binfmt would: only as root, only
    from the installed package's file, mounting binfmt_misc if it is not. Failing quietly:
    the caller's refusal says what is missing."""
    conf = binfmt_d / f"{entry_name}.conf"
    if os.geteuid() != 0 or not conf.is_file():
        return
    try:
        if not (binfmt / "register").exists():
            _mount("binfmt_misc", str(binfmt), "binfmt_misc", 0, "")
        line = next(x for x in conf.read_text().splitlines() if x.startswith(f":{entry_name}:"))
        (binfmt / "register").write_text(line)
    except (OSError, MountError, StopIteration) as exc:
        log.debug("could not register %s from %s: %s", entry_name, conf, exc)
        return
    log.info("registered the binfmt_misc entry %s from %s", entry_name, conf)
