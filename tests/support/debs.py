"""Layers made of real Debian packages, with the owners Debian gives their files.

`dpkg-deb --fsys-tarfile` of a package is its data tar exactly as dpkg unpacks it:
passwd ships /usr/bin/chage as root:shadow (0:42), lighttpd /var/cache/lighttpd as
www-data (33:33). An image of such layers has files of several owners, as every
distribution image has. The .debs are fetched once with `apt-get download` into the
tests' .deb cache.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

from support.layers import DEB_CACHE, LayerBuildError


def deb(package: str, cache: Path = DEB_CACHE) -> Path:
    """Debian's .deb of `package` (this machine's release), downloaded once."""
    found = sorted(cache.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["apt-get", "-q", "download", package], cwd=cache,
                         capture_output=True, text=True, check=False)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        raise LayerBuildError(f"cannot fetch the {package} .deb: {res.stderr.strip()}")
    return found[-1]


def deb_layer(package: str) -> bytes:
    """The package's data tar, as a layer tar (uncompressed)."""
    return subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb(package))],
                          capture_output=True, check=True).stdout


def owners(layer: bytes) -> set[tuple[int, int]]:
    """The (uid, gid) pairs of a layer tar's entries."""
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        return {(m.uid, m.gid) for m in tar.getmembers()}
