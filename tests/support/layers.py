"""Build docker-style layer tarballs for tests.

Two layers are used by the interop tests:

* the busybox-static layer: Debian's busybox-static .deb unpacked with
  ``dpkg -x`` and written as a layer in which every parent directory has its
  own entry (``bin/``, ``bin/busybox``, ...), plus a few applet symlinks
  (``bin/sh -> busybox``);
* a synthetic layer made with :mod:`tarfile` that exercises chunking (a 9 MiB
  file, i.e. three chunks at the default 4 MiB), small and empty files,
  directories, a symlink, a hardlink, a PAX xattr and a name longer than 100
  bytes.

Both are deterministic, so the same input gives the same tar bytes.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import tarfile
import tempfile
from pathlib import Path

CACHE_DIR = Path(os.environ.get("ESTARGZ_OPT_CACHE", "/var/cache/estargz-opt"))
DEB_CACHE = CACHE_DIR / "debs"

MIB = 1 << 20
# Fixed mtime for synthetic entries: 2023-11-14T22:13:20Z.
SYNTHETIC_MTIME = 1_700_000_000
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo")

# Paths used as --prioritized-files for the synthetic layer. links/hard is a
# hardlink, so its target data/small1.txt moves up with it.
SYNTHETIC_PRIORITIZED = ("data/small2.txt", "links/hard", "data/big.bin")
BUSYBOX_PRIORITIZED = ("bin/busybox",)

LONG_DIR = "long/" + "d" * 60 + "/"
LONG_NAME = LONG_DIR + "f" * 80 + ".txt"  # > 100 bytes: needs a PAX path record
BIG_SIZE = 9 * MIB  # 3 chunks at 4 MiB: 4 + 4 + 1


class LayerBuildError(RuntimeError):
    """A test layer could not be built (e.g. the .deb could not be fetched)."""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def busybox_deb(cache: Path = DEB_CACHE) -> Path:
    """Return Debian's busybox-static .deb, downloading it into *cache* once."""
    found = sorted(cache.glob("busybox-static_*.deb"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    # Without package lists (a fresh machine) the download fails: update once.
    for attempt in ("download", "update-then-download"):
        if attempt == "update-then-download":
            try:
                _run(["apt-get", "-q", "update"])
            except (OSError, subprocess.CalledProcessError) as e:
                errors.append(f"apt-get update: {getattr(e, 'stderr', e)}")
                break
        try:
            _run(["apt-get", "-q", "download", "busybox-static"], cwd=cache)
        except (OSError, subprocess.CalledProcessError) as e:
            errors.append(f"apt-get download busybox-static: {getattr(e, 'stderr', e)}")
            continue
        found = sorted(cache.glob("busybox-static_*.deb"))
        if found:
            return found[-1]
    raise LayerBuildError("cannot fetch busybox-static .deb: " + "; ".join(errors))


def _add_tree(tar: tarfile.TarFile, root: Path) -> None:
    """Add everything under *root* (not root itself), each directory before
    its contents, names relative to root and sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir + "/"
        if prefix:
            _add_path(tar, Path(dirpath), rel_dir)
        # Symlinks to directories are listed in dirnames but not walked.
        links = [n for n in dirnames if Path(dirpath, n).is_symlink()]
        dirnames[:] = sorted(n for n in dirnames if n not in links)
        for name in sorted(filenames + links):
            _add_path(tar, Path(dirpath, name), prefix + name)


def _add_path(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    info = tar.gettarinfo(str(path), arcname)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = int(info.mtime)  # whole seconds: no PAX mtime record
    if info.isreg():
        with open(path, "rb") as f:
            tar.addfile(info, f)
    else:
        tar.addfile(info)


def build_busybox_layer(out: Path, deb: Path | None = None) -> Path:
    """Write the busybox-static layer tar to *out* and return it."""
    deb = deb or busybox_deb()
    with tempfile.TemporaryDirectory(prefix="busybox-rootfs-") as tmp:
        root = Path(tmp)
        _run(["dpkg", "-x", str(deb), str(root)])
        if not (root / "bin" / "busybox").is_file():
            raise LayerBuildError(f"{deb} has no bin/busybox")
        bin_mtime = int((root / "bin" / "busybox").stat().st_mtime)
        for applet in BUSYBOX_APPLETS:
            link = root / "bin" / applet
            link.symlink_to("busybox")
            os.utime(link, (bin_mtime, bin_mtime), follow_symlinks=False)
        # bin/ got new entries: keep its original mtime for determinism.
        os.utime(root / "bin", (bin_mtime, bin_mtime))
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_tree(tar, root)
    return out


def _info(name: str, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = SYNTHETIC_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = 0o644
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def build_synthetic_layer(out: Path, seed: int = 20231114) -> Path:
    """Write the synthetic layer tar to *out* and return it."""
    rnd = random.Random(seed)
    files: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def d(name: str, **kw) -> None:
        files.append((_info(name, type=tarfile.DIRTYPE, mode=0o755, **kw), None))

    def f(name: str, data: bytes, **kw) -> None:
        files.append((_info(name, size=len(data), **kw), data))

    d("data")
    f("data/big.bin", rnd.randbytes(BIG_SIZE))
    f("data/small1.txt", b"hello, small file one\n")
    f("data/small2.txt", b"small file two\n" * 100)
    f("data/empty", b"")
    f("data/xattr.txt", b"file with an extended attribute\n",
      pax_headers={"SCHILY.xattr.user.foo": "bar"})
    d("data/sub")
    f("data/sub/nested.txt", bytes(rnd.randrange(256) for _ in range(3000)),
      uid=1000, gid=1000, uname="alice", gname="alice", mode=0o600)
    d("links")
    files.append((_info("links/sym", type=tarfile.SYMTYPE, linkname="../data/small1.txt",
                        mode=0o777), None))
    files.append((_info("links/hard", type=tarfile.LNKTYPE, linkname="data/small1.txt"),
                  None))
    d("long")
    d(LONG_DIR.rstrip("/"))
    f(LONG_NAME, b"a file whose name is longer than 100 bytes\n")
    assert len(LONG_NAME) > 100

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in files:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def write_list(path: Path, names: tuple[str, ...] | list[str]) -> Path:
    """Write a --prioritized-files list, one path per line."""
    path.write_text("".join(n + "\n" for n in names))
    return path
