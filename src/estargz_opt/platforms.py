"""Platform strings and matching, with containerd's normalisation and strict host default."""

from __future__ import annotations

import platform as _platform
from collections.abc import Sequence
from dataclasses import dataclass

from estargz_opt.descriptor import Platform
from estargz_opt.errors import EstargzOptError

_OS = frozenset(
    {
        "linux",
        "windows",
        "darwin",
        "freebsd",
        "netbsd",
        "openbsd",
        "solaris",
        "illumos",
        "aix",
        "android",
        "dragonfly",
        "ios",
        "js",
        "plan9",
        "wasip1",
    }
)
_ARCH = {
    "amd64": ("amd64", ""),
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "386": ("386", ""),
    "i386": ("386", ""),
    "arm64": ("arm64", ""),
    "aarch64": ("arm64", ""),
    "arm": ("arm", "v7"),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "ppc64le": ("ppc64le", ""),
    "ppc64": ("ppc64", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "mips64le": ("mips64le", ""),
    "mips64": ("mips64", ""),
    "mipsle": ("mipsle", ""),
    "mips": ("mips", ""),
    "loong64": ("loong64", ""),
    "wasm": ("wasm", ""),
}


def normalize(p: Platform) -> tuple[str, str, str]:
    os_ = p.os.lower()
    arch, default_variant = _ARCH.get(p.architecture.lower(), (p.architecture.lower(), ""))
    variant = p.variant.lower() or default_variant
    if arch == "arm64" and variant == "v8":
        variant = ""
    if arch == "amd64" and variant == "v1":
        variant = ""
    return os_, arch, variant


def parse(spec: str) -> Platform:
    """`os/arch[/variant]` (or just `arch`), refusing names containerd would not know."""
    parts = spec.strip().split("/")
    if len(parts) == 1:
        parts = ["linux", parts[0]]
    if len(parts) not in (2, 3) or not all(parts):
        raise EstargzOptError(f"invalid platform {spec!r}: expected os/arch[/variant]")
    os_, arch = parts[0].lower(), parts[1].lower()
    if os_ not in _OS or arch not in _ARCH:
        raise EstargzOptError(
            f"unknown platform {spec!r}: unknown operating system or architecture"
        )
    return Platform(os=os_, architecture=arch, variant=parts[2] if len(parts) == 3 else "")


def host() -> Platform:
    arch, variant = _ARCH.get(_platform.machine().lower(), (_platform.machine().lower(), ""))
    return Platform(os="linux", architecture=arch, variant=variant)


@dataclass(frozen=True, slots=True)
class Matcher:
    """Which platform images to convert: all, or those equal to one of `wanted`.

    Equal after normalisation, variant included: containerd's strict matching
    (`platforms.DefaultStrict()` for the host, `platforms.Ordered` for --platform), which
    ctr-remote applies; so an arm64 host does not take an arm/v7 image for its own.
    """

    wanted: tuple[Platform, ...]
    all: bool = False
    #: no --platform or --all-platforms was given: `wanted` is the host alone
    host_default: bool = False

    def matches(self, p: Platform | None) -> bool:
        if self.all or p is None:
            return True
        key = normalize(p)
        return any(normalize(w) == key for w in self.wanted)

    def describe(self) -> str:
        if self.all:
            return "all platforms"
        return ", ".join(str(w) for w in self.wanted) + (" (the host)" if self.host_default else "")


def matcher(specs: Sequence[str], all_platforms: bool) -> Matcher:
    if all_platforms:
        return Matcher((), all=True)
    if specs:
        return Matcher(tuple(parse(s) for s in specs))
    return Matcher((host(),), host_default=True)
