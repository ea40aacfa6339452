#!/usr/bin/env python3
"""Build the 3-layer Debian test image the layer benchmark converts.

Layers (docker-style: every parent directory of every entry has its own entry):
  0  ``debootstrap --variant=minbase bookworm`` root filesystem
  1  the diff after ``apt-get install -y --no-install-recommends python3`` in a chroot
     (new and changed files, ``.wh.<name>`` whiteouts for deleted ones)
  2  a tiny app, /app/main.py, which prints "ready" after importing some stdlib modules

Each layer tar is written deterministically from its tree (depth-first, names sorted,
numeric owners, integer mtimes, no user/group names) and compressed with ``gzip -n``.
The result is an OCI image layout plus a tarball of it that ``ctr images import``
accepts.  Everything is cached under /var/cache/estargz-opt/bench/image and only
rebuilt when missing (or with --force).  Needs root (debootstrap, chroot, mounts).

Usage: python3 bench/build_image.py [--force] [--mirror URI] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from benchlib import CACHE_DIR, log, run, sha256_file

IMAGE_DIR = CACHE_DIR / "image"
IMAGE_BASE_NAME = "docker.io/library/estargz-opt-bench"
IMAGE_TAG = "latest"
IMAGE_REF = f"{IMAGE_BASE_NAME}:{IMAGE_TAG}"
SUITE = "bookworm"
# Fixed timestamp for everything we invent (layer 2, config) so it is reproducible.
EPOCH = 1704067200  # 2024-01-01T00:00:00Z
EPOCH_RFC3339 = "2024-01-01T00:00:00Z"

# Kernel/virtual filesystems: the directory itself is part of the image, its
# contents (device nodes made by debootstrap, mounts) are not, as in Docker images.
EMPTY_DIRS = {"dev", "proc", "sys"}

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

APP_MAIN = b'''\
"""Benchmark workload: import a few stdlib modules, then say we are ready."""
import argparse
import collections
import datetime
import decimal
import email.parser
import hashlib
import http.client
import json
import logging
import sqlite3
import urllib.request

print("ready", flush=True)
'''


# --------------------------------------------------------------------------- mirror


def debian_mirror(sources: Path = Path("/etc/apt/sources.list.d/debian.sources")) -> str:
    """The first URI of the deb822 stanza that serves the main bookworm suite."""
    if sources.exists():
        for stanza in sources.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and SUITE in fields.get(
                    "suites", "").split() and fields.get("uris"):
                return fields["uris"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and SUITE in parts[2:3]:
                return parts[1]
    raise SystemExit("no Debian bookworm mirror found in the apt sources; pass --mirror URI")


# --------------------------------------------------------------------------- tar writing


def _sorted_names(path: Path) -> list[str]:
    return sorted(os.listdir(path), key=os.fsencode)


class LayerWriter:
    """Writes one deterministic layer tar (uncompressed) from files on disk."""

    def __init__(self, path: Path):
        self.path = path
        self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.inodes: dict[tuple[int, int], str] = {}
        self.entries = 0
        self.files = 0

    def _header(self, name: str, st: os.stat_result | None) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.uname = ti.gname = ""
        if st is not None:
            ti.mode = stat.S_IMODE(st.st_mode)
            ti.uid, ti.gid = st.st_uid, st.st_gid
            ti.mtime = int(st.st_mtime)
        return ti

    def add(self, root: Path, rel: str, st: os.stat_result) -> None:
        ti = self._header(rel, st)
        src = root / rel
        fileobj = None
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            ti.type = tarfile.DIRTYPE
        elif stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.inodes:
                ti.type = tarfile.LNKTYPE
                ti.linkname = self.inodes[key]
            else:
                if st.st_nlink > 1:
                    self.inodes[key] = rel
                ti.type = tarfile.REGTYPE
                ti.size = st.st_size
                fileobj = open(src, "rb")  # noqa: SIM115 - closed below
                self.files += 1
        elif stat.S_ISLNK(mode):
            ti.type = tarfile.SYMTYPE
            ti.linkname = os.readlink(src)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            ti.type = tarfile.FIFOTYPE
        else:  # sockets cannot be stored in a tar
            return
        try:
            self.tar.addfile(ti, fileobj)
        finally:
            if fileobj is not None:
                fileobj.close()
        self.entries += 1

    def add_bytes(self, rel: str, data: bytes, mode: int, mtime: int) -> None:
        ti = self._header(rel, None)
        ti.mode, ti.mtime, ti.size = mode, mtime, len(data)
        self.tar.addfile(ti, io.BytesIO(data))
        self.entries += 1
        self.files += 1

    def add_dir(self, rel: str, mode: int, mtime: int) -> None:
        ti = self._header(rel, None)
        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, mtime
        self.tar.addfile(ti)
        self.entries += 1

    def add_whiteout(self, rel: str, mtime: int) -> None:
        ti = self._header(rel, None)
        ti.mode, ti.mtime = 0o644, mtime
        self.tar.addfile(ti)
        self.entries += 1

    def close(self) -> None:
        self.tar.close()


def _walk(root: Path, rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """Depth-first, names sorted by bytes, parents before children; skips EMPTY_DIRS content."""
    for name in _sorted_names(root / rel if rel else root):
        p = f"{rel}/{name}" if rel else name
        st = os.lstat(root / p)
        yield p, st
        if stat.S_ISDIR(st.st_mode) and p not in EMPTY_DIRS:
            yield from _walk(root, p)


def write_full_layer(root: Path, out: Path) -> LayerWriter:
    w = LayerWriter(out)
    try:
        for rel, st in _walk(root):
            w.add(root, rel, st)
    finally:
        w.close()
    return w


def _changed(old: Path, new: Path, st0: os.stat_result | None, st1: os.stat_result) -> bool:
    if st0 is None or stat.S_IFMT(st0.st_mode) != stat.S_IFMT(st1.st_mode):
        return True
    if (st0.st_mode, st0.st_uid, st0.st_gid) != (st1.st_mode, st1.st_uid, st1.st_gid):
        return True
    if int(st0.st_mtime) != int(st1.st_mtime):
        return True
    if stat.S_ISLNK(st1.st_mode):
        return os.readlink(old) != os.readlink(new)
    if stat.S_ISREG(st1.st_mode):
        return st0.st_size != st1.st_size or not filecmp.cmp(old, new, shallow=False)
    if stat.S_ISCHR(st1.st_mode) or stat.S_ISBLK(st1.st_mode):
        return st0.st_rdev != st1.st_rdev
    return False


def write_diff_layer(lower: Path, upper: Path, out: Path) -> tuple[LayerWriter, int]:
    """Docker-style diff of ``upper`` against ``lower``: changed/new entries, whiteouts."""
    w = LayerWriter(out)
    emitted: set[str] = set()
    whiteouts = 0

    def emit_parents(rel: str) -> None:
        if not rel:
            return
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p not in emitted:
                w.add(upper, p, os.lstat(upper / p))
                emitted.add(p)

    def visit(rel: str, lower_is_dir: bool) -> None:
        nonlocal whiteouts
        up_dir = upper / rel if rel else upper
        lo_dir = lower / rel if rel else lower
        names1 = _sorted_names(up_dir)
        names0 = set(os.listdir(lo_dir)) if lower_is_dir else set()
        items = [(n, False) for n in names1]
        items += [(".wh." + n, True) for n in names0.difference(names1)]
        items.sort(key=lambda it: os.fsencode(it[0]))
        for name, is_whiteout in items:
            p = f"{rel}/{name}" if rel else name
            if is_whiteout:
                emit_parents(rel)
                w.add_whiteout(p, int(os.lstat(up_dir).st_mtime))
                whiteouts += 1
                continue
            st1 = os.lstat(upper / p)
            st0 = None
            if lower_is_dir:
                with contextlib.suppress(FileNotFoundError):
                    st0 = os.lstat(lower / p)
            if _changed(lower / p, upper / p, st0, st1):
                emit_parents(rel)
                w.add(upper, p, st1)
                emitted.add(p)
            if stat.S_ISDIR(st1.st_mode) and p not in EMPTY_DIRS:
                visit(p, st0 is not None and stat.S_ISDIR(st0.st_mode))

    try:
        visit("", True)
    finally:
        w.close()
    return w, whiteouts


# --------------------------------------------------------------------------- rootfs


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    mounted: list[Path] = []
    try:
        run(["mount", "-t", "proc", "proc", root / "proc"])
        mounted.append(root / "proc")
        # A private tmpfs with the few device nodes apt and python need, rather than a
        # bind mount of the host's /dev that a failed cleanup could delete through.
        run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=1m", "benchdev", root / "dev"])
        mounted.append(root / "dev")
        for name, minor in (("null", 3), ("zero", 5), ("full", 7), ("random", 8),
                            ("urandom", 9)):
            os.mknod(root / "dev" / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
            os.chmod(root / "dev" / name, 0o666)
        yield
    finally:
        for m in reversed(mounted):
            if run(["umount", m], check=False).returncode != 0:
                run(["umount", "-l", m], check=False)


def make_rootfs(work: Path, mirror: str) -> tuple[Path, Path]:
    base, app = work / "rootfs0", work / "rootfs1"
    log(f"debootstrap --variant=minbase {SUITE} (mirror from the apt sources) ...")
    t0 = time.monotonic()
    res = run(["debootstrap", "--variant=minbase", SUITE, base, mirror], check=False)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"debootstrap failed:\n{tail}")
    log(f"debootstrap done in {time.monotonic() - t0:.0f} s")
    # debootstrap copies the host's resolv.conf/hostname in; the image should not carry them.
    for name, content in (("etc/resolv.conf", ""), ("etc/hostname", "localhost\n")):
        p = base / name
        if p.exists() or p.is_symlink():
            p.unlink()
        p.write_text(content)
        os.utime(p, (EPOCH, EPOCH))
    # debootstrap leaves the .debs it installed in /var/cache/apt/archives; base images
    # ship without them (its package lists stay, like an `apt-get update`d image).
    run(["chroot", base, "apt-get", "clean"], env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    for d in EMPTY_DIRS:  # device nodes etc. are not image content
        for child in (base / d).iterdir() if (base / d).is_dir() else []:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    log("copying the base tree for the python3 layer ...")
    run(["cp", "-a", base, app])
    resolv = app / "etc/resolv.conf"
    policy = app / "usr/sbin/policy-rc.d"
    shutil.copyfile("/etc/resolv.conf", resolv)
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C", "HOME": "/root"}
    # The mirror may serve a dated snapshot: do not reject its Release file as expired.
    apt_opts = ["-o", "Acquire::Check-Valid-Until=false", "-o", "Acquire::Check-Date=false"]
    log("chroot apt-get install -y --no-install-recommends python3 ...")
    t0 = time.monotonic()
    with chroot_mounts(app):
        run(["chroot", app, "apt-get", *apt_opts, "update"], env=env)
        run(["chroot", app, "apt-get", *apt_opts, "install", "-y", "--no-install-recommends",
             "python3"], env=env)
        run(["chroot", app, "apt-get", "clean"], env=env)
    log(f"apt-get done in {time.monotonic() - t0:.0f} s")
    policy.unlink()
    shutil.copy2(base / "etc/resolv.conf", resolv)  # back to the base layer's file
    return base, app


# --------------------------------------------------------------------------- OCI layout


def _canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _put_blob(blobs: Path, data: bytes) -> dict:
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.split(":", 1)[1]).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def host_architecture() -> str:
    try:
        return run(["dpkg", "--print-architecture"]).stdout.strip()
    except (RuntimeError, FileNotFoundError):
        machine = os.uname().machine
        return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def write_oci_layout(out: Path, layers: list[dict], arch: str) -> dict:
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layer_descs = []
    for layer in layers:
        gz = Path(layer["path"])
        target = blobs / layer["digest"].split(":", 1)[1]
        os.replace(gz, target)
        layer["path"] = str(target)
        layer_descs.append({"mediaType": MT_LAYER_GZIP, "digest": layer["digest"],
                            "size": layer["size"]})
    config = {
        "created": EPOCH_RFC3339,
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["python3", "/app/main.py"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [la["diffID"] for la in layers]},
        "history": [{"created": EPOCH_RFC3339, "created_by": la["created_by"]} for la in layers],
    }
    cfg = _put_blob(blobs, _canonical_json(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, **cfg},
        "layers": layer_descs,
    }
    man = _put_blob(blobs, _canonical_json(manifest))
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [{
            "mediaType": MT_MANIFEST, **man,
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": IMAGE_TAG},
        }],
    }
    (out / "index.json").write_bytes(_canonical_json(index))
    return {"manifest": man, "config": cfg}


def tar_dir(src: Path, out: Path) -> None:
    """Plain deterministic tar of a directory tree (the OCI layout -> ctr import)."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel, st in _walk(src):
            ti = tarfile.TarInfo(rel)
            ti.mtime, ti.uname, ti.gname = EPOCH, "", ""
            if stat.S_ISDIR(st.st_mode):
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            else:
                ti.mode, ti.size = 0o644, st.st_size
                with open(src / rel, "rb") as f:
                    tar.addfile(ti, f)


# --------------------------------------------------------------------------- main


def gzip_layer(tar_path: Path) -> dict:
    diff_id = sha256_file(tar_path)
    gz = tar_path.with_name(tar_path.name + ".gz")
    with open(gz, "wb") as f:
        subprocess.run(["gzip", "-n", "-c", str(tar_path)], stdout=f, check=True)
    info = {"diffID": diff_id, "uncompressedSize": tar_path.stat().st_size,
            "digest": sha256_file(gz), "size": gz.stat().st_size, "path": str(gz)}
    tar_path.unlink()
    return info


def image_info() -> dict | None:
    meta = IMAGE_DIR / "image.json"
    if not meta.exists():
        return None
    info = json.loads(meta.read_text())
    if all(Path(la["path"]).exists() for la in info["layers"]) and Path(info["oci_tar"]).exists():
        return info
    return None


def _remove_stale_builds() -> None:
    """Leftovers of a build that was SIGKILLed (its pid gone): unmount, then delete."""
    for d in list(CACHE_DIR.glob("image.tmp-*")) + list(CACHE_DIR.glob("work-*")):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue
        mounts = [d / "rootfs1" / m for m in ("dev", "proc")]
        for m in mounts:
            if os.path.ismount(m):
                run(["umount", "-l", m], check=False)
        if any(os.path.ismount(m) for m in mounts):
            log(f"warning: stale {d} still has mounts; left in place")
            continue
        log(f"removing stale {d}")
        shutil.rmtree(d, ignore_errors=True)


def build(mirror: str) -> dict:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds()
    staging = CACHE_DIR / f"image.tmp-{os.getpid()}"
    work = CACHE_DIR / f"work-{os.getpid()}"
    try:
        staging.mkdir()
        work.mkdir()
        t_start = time.monotonic()
        base, app = make_rootfs(work, mirror)
        layers = []

        log("writing layer 0 (base rootfs) ...")
        w0 = write_full_layer(base, staging / "layer0.tar")
        l0 = gzip_layer(staging / "layer0.tar")
        l0.update(entries=w0.entries, files=w0.files, whiteouts=0,
                  created_by=f"debootstrap --variant=minbase {SUITE}")
        layers.append(l0)

        log("writing layer 1 (diff after installing python3) ...")
        w1, wh = write_diff_layer(base, app, staging / "layer1.tar")
        l1 = gzip_layer(staging / "layer1.tar")
        l1.update(entries=w1.entries, files=w1.files, whiteouts=wh,
                  created_by="apt-get install -y --no-install-recommends python3")
        layers.append(l1)
        shutil.rmtree(work)

        log("writing layer 2 (app) ...")
        w2 = LayerWriter(staging / "layer2.tar")
        w2.add_dir("app", 0o755, EPOCH)
        w2.add_bytes("app/main.py", APP_MAIN, 0o644, EPOCH)
        w2.close()
        l2 = gzip_layer(staging / "layer2.tar")
        l2.update(entries=w2.entries, files=w2.files, whiteouts=0,
                  created_by="COPY main.py /app/main.py")
        layers.append(l2)

        arch = host_architecture()
        oci = write_oci_layout(staging / "oci", layers, arch)
        tar_dir(staging / "oci", staging / "image-oci.tar")
        # Stable, human-friendly names for the layer blobs (hard links into the layout).
        for i, la in enumerate(layers):
            os.link(la["path"], staging / f"layer{i}.tar.gz")

        if IMAGE_DIR.exists():
            shutil.rmtree(IMAGE_DIR)
        os.replace(staging, IMAGE_DIR)
        # Paths point into the final directory, recorded last so a half-built cache never
        # looks complete.
        for i, la in enumerate(layers):
            la["path"] = str(IMAGE_DIR / f"layer{i}.tar.gz")
        info = {
            "ref": IMAGE_REF,
            "base_name": IMAGE_BASE_NAME,
            "tag": IMAGE_TAG,
            "architecture": arch,
            "suite": SUITE,
            "oci_layout": str(IMAGE_DIR / "oci"),
            "oci_tar": str(IMAGE_DIR / "image-oci.tar"),
            "manifest_digest": oci["manifest"]["digest"],
            "config_digest": oci["config"]["digest"],
            "layers": layers,
            "total_size": sum(la["size"] for la in layers),
            "total_uncompressed_size": sum(la["uncompressedSize"] for la in layers),
            "total_files": sum(la["files"] for la in layers),
            "build_seconds": round(time.monotonic() - t_start, 1),
        }
        benchlib.write_json_atomic(IMAGE_DIR / "image.json", info)
        return info
    finally:
        for d in (work, staging):
            live = [d / m for m in ("rootfs1/dev", "rootfs1/proc") if os.path.ismount(d / m)]
            for m in live:
                run(["umount", "-l", m], check=False)
            if any(os.path.ismount(m) for m in live):  # never rmtree through a live mount
                log(f"warning: {d} still has mounts; left in place")
                continue
            shutil.rmtree(d, ignore_errors=True)


def ensure_image(force: bool = False, mirror: str | None = None) -> dict:
    info = None if force else image_info()
    if info is not None:
        return info
    if os.geteuid() != 0:
        raise SystemExit("building the test image needs root (debootstrap, chroot, mount)")
    for tool in ("debootstrap", "chroot", "gzip"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (apt-get install debootstrap)")
    return build(mirror or debian_mirror())


def summary(info: dict) -> str:
    lines = [f"image {info['ref']} ({info['architecture']}), {IMAGE_DIR}"]
    for i, la in enumerate(info["layers"]):
        lines.append(
            f"  layer {i}: {la['size'] / 1e6:7.1f} MB gzip, {la['uncompressedSize'] / 1e6:7.1f} MB"
            f" tar, {la['entries']:5d} entries, {la['files']:5d} files, {la['whiteouts']} whiteouts"
            f"  {la['digest'][:19]}")
    lines.append(f"  total  : {info['total_size'] / 1e6:7.1f} MB gzip,"
                 f" {info['total_uncompressed_size'] / 1e6:7.1f} MB tar,"
                 f" {info['total_files']} files")
    lines.append(f"  OCI layout tarball for `ctr images import --base-name {info['base_name']}`:"
                 f" {info['oci_tar']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--mirror", help="Debian mirror URI (default: from the apt sources)")
    ap.add_argument("--json", action="store_true", help="print the image metadata as JSON")
    args = ap.parse_args(argv)
    benchlib.install_signal_handlers()
    info = ensure_image(force=args.force, mirror=args.mirror)
    print(json.dumps(info, indent=2) if args.json else summary(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
