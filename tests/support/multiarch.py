"""A two-platform (linux/amd64 + linux/arm64) busybox image from Debian's busybox-static
.debs, whose workload reads a different file set per platform (chosen by `uname -m`,
which qemu-user reports as the emulated machine)."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

from support import imagefactory as f

#: where the .debs are kept between runs (downloaded once per machine)
DEB_CACHE = Path("/var/cache/estargz-opt/multiarch")  # as scripts/install-deps.sh
MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}
RUN_SH = b'#!/bin/sh\necho "arch=$(uname -m)"\ncat /data/$(uname -m)/*\n'
#: the files each platform's workload reads, besides the shell and the script
DATA = {m: {f"data/{m}/{n}.txt": f"{n}-{m}\n".encode() for n in ("one", "two")}
        for m in MACHINE.values()}


def without_qemu(argv: list[str]) -> list[str]:
    """`argv` run in a private mount namespace whose binfmt_misc (and Debian's binfmt.d)
    is an empty tmpfs: no qemu entry, and none can be registered (root only)."""
    script = ("mount -t tmpfs none /proc/sys/fs/binfmt_misc && "
              'mount -t tmpfs none /usr/lib/binfmt.d && exec "$@"')
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]


def busybox_deb(arch: str) -> Path:
    """Debian's busybox-static for `arch`, downloaded (with dpkg's foreign arch) if absent."""
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(DEB_CACHE.glob(f"busybox-static_*_{arch}.deb"))
    if not found:
        if arch not in subprocess.run(["dpkg", "--print-foreign-architectures"],
                                      capture_output=True, text=True, check=True).stdout:
            subprocess.run(["dpkg", "--add-architecture", arch], check=True)
            subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "download", f"busybox-static:{arch}"], cwd=DEB_CACHE,
                       check=True, capture_output=True)
        found = sorted(DEB_CACHE.glob(f"busybox-static_*_{arch}.deb"))
    return found[-1]


def _layer(busybox: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
        add("bin/busybox", busybox, 0o755)
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(link)
        add("app/run.sh", RUN_SH, 0o755)
        for files in DATA.values():
            for name, data in files.items():
                add(name, data)
    return buf.getvalue()


def write_two_platform_image(layout: Path, tag: str, tmp: Path) -> dict[str, str]:
    """Write the index under `tag`; return platform ("linux/arm64") -> manifest digest."""
    out: dict[str, str] = {}
    manifests = []
    for arch in MACHINE:
        root = tmp / arch
        root.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(busybox_deb(arch)), str(root)], check=True)
        layer = _layer((root / "bin" / "busybox").read_bytes())
        info = f.put_image_manifest(layout, [layer],
                                    {"config": {"Cmd": ["/bin/sh", "/app/run.sh"]}},
                                    platform=("linux", arch))
        manifests.append(info.descriptor)
        out[f"linux/{arch}"] = info.descriptor["digest"]
    f.tag_descriptor(layout, tag, f.put_index(layout, manifests))
    return out
