"""A private containerd and the reference ctr-remote, for interop tests.

The daemon is started and stopped by scripts/containerd-up.sh and
scripts/containerd-down.sh, so tests, the demo and people at a shell all use
the same set-up. Everything it writes lives in one directory. Below the daemon: our CLI
against it (`optimize`) and what a test reads back (images, leases, ingests in progress).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from support.cli import run_cli
from support.imagefactory import archive_for_ctr

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
CONTAINERD = "/usr/bin/containerd"
CTR_REMOTE_DEFAULT = Path("/opt/estargz-opt/ctr-remote/usr/bin/ctr-remote")
NAMESPACE = "default"
# Keep content alive whatever the daemon's GC settings (ctr ingest takes no lease).
GC_ROOT_LABEL = "containerd.io/gc.root"


class Unavailable(RuntimeError):
    """A prerequisite is missing; the message says which and why."""


def _fmt_failure(e: subprocess.CalledProcessError) -> str:
    out = (e.stdout or "") if isinstance(e.stdout, str) else ""
    err = (e.stderr or "") if isinstance(e.stderr, str) else ""
    return f"{e.cmd!r} exited {e.returncode}\nstdout:\n{out}\nstderr:\n{err}"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def containerd_unavailable_reason() -> str | None:
    """Why a private containerd cannot be started here, or None if it can."""
    if os.geteuid() != 0:
        return "a private containerd needs root"
    if not os.access(CONTAINERD, os.X_OK):
        return f"{CONTAINERD} is not installed (apt-get install containerd)"
    if shutil.which("ctr") is None:
        return "ctr is not installed (apt-get install containerd)"
    return None


@dataclass
class Containerd:
    """A running private containerd (see scripts/containerd-up.sh)."""

    dir: Path
    address: str = field(init=False)
    root: Path = field(init=False)
    _refs: itertools.count = field(default_factory=itertools.count, repr=False)

    def __post_init__(self) -> None:
        self.address = str(self.dir / "containerd.sock")
        self.root = self.dir / "root"

    @classmethod
    def start(cls, directory: Path) -> Containerd:
        reason = containerd_unavailable_reason()
        if reason:
            raise Unavailable(reason)
        try:
            subprocess.run(
                ["bash", str(SCRIPTS / "containerd-up.sh"), str(directory)],
                check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                timeout=90,
            )
        except subprocess.CalledProcessError as e:
            # Leave nothing behind, then report the daemon's own words.
            log = directory / "containerd.log"
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            subprocess.run(["bash", str(SCRIPTS / "containerd-down.sh"), str(directory)],
                           capture_output=True, stdin=subprocess.DEVNULL)
            raise RuntimeError(f"containerd-up.sh failed: {_fmt_failure(e)}\nlog:\n{tail}") from e
        return cls(directory)

    def stop(self) -> None:
        subprocess.run(
            ["bash", str(SCRIPTS / "containerd-down.sh"), str(self.dir)],
            check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=90,
        )

    def ctr(self, *args: str, input: bytes | str | None = None,
            stdin=None) -> subprocess.CompletedProcess:
        """Run ``ctr -a SOCK -n default ARGS...`` (check=True).

        Output is text when *input* is a str or absent, bytes when it is bytes.
        """
        text = not isinstance(input, bytes)
        cmd = ["ctr", "-a", self.address, "-n", NAMESPACE, *args]
        kw = {"input": input} if input is not None else {
            "stdin": stdin if stdin is not None else subprocess.DEVNULL}
        try:
            return subprocess.run(cmd, check=True, capture_output=True, text=text,
                                  timeout=300, **kw)
        except subprocess.CalledProcessError as e:
            raise AssertionError(_fmt_failure(e)) from e

    def ingest(self, blob_path: Path | str) -> str:
        """Put a blob into the content store; return its digest."""
        blob_path = Path(blob_path)
        digest = file_digest(blob_path)
        size = blob_path.stat().st_size
        ref = f"estargz-opt-test-{next(self._refs)}-{digest[7:19]}"
        with open(blob_path, "rb") as f:
            self.ctr("content", "ingest", "--expected-digest", digest,
                     "--expected-size", str(size), ref, stdin=f)
        self.ctr("content", "label", digest, f"{GC_ROOT_LABEL}=estargz-opt-test")
        return digest


def find_ctr_remote() -> Path | None:
    env = os.environ.get("ESTARGZ_OPT_CTR_REMOTE")
    for cand in ([Path(env)] if env else []) + [CTR_REMOTE_DEFAULT]:
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def ensure_ctr_remote() -> Path:
    """Path of ctr-remote 0.14.3; install it with scripts/install-ctr-remote.sh
    if it is missing. Raises Unavailable with the reason if that fails."""
    found = find_ctr_remote()
    if found:
        return found
    if os.geteuid() != 0:
        raise Unavailable("ctr-remote is not installed and installing it needs root "
                          "(run scripts/install-ctr-remote.sh as root)")
    try:
        res = subprocess.run(
            ["bash", str(SCRIPTS / "install-ctr-remote.sh")],
            check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
        )
    except subprocess.CalledProcessError as e:
        raise Unavailable(f"scripts/install-ctr-remote.sh failed:\n{e.stderr[-3000:]}") from e
    except subprocess.TimeoutExpired as e:
        raise Unavailable("scripts/install-ctr-remote.sh timed out") from e
    lines = res.stdout.strip().splitlines()
    path = Path(lines[-1]) if lines else None
    if path is None or not path.is_file():
        raise Unavailable(f"install-ctr-remote.sh printed no binary path: {res.stdout!r}")
    return path


def optimize(c: Containerd, *args: str | Path, **kw) -> subprocess.CompletedProcess:
    """`estargz-opt -a SOCKET optimize ARGS` against *c*, as a child process."""
    return run_cli("-a", c.address, "optimize", *args, **kw)


def images(c: Containerd) -> set[str]:
    """The image names in *c*'s default namespace."""
    return set(c.ctr("images", "ls", "-q").stdout.split())


def leases(c: Containerd, namespace: str = "default") -> list[tuple[str, str]]:
    """(id, labels) of estargz-opt's leases, from ``ctr leases ls``."""
    res = subprocess.run(["ctr", "-a", c.address, "-n", namespace, "leases", "ls"],
                         capture_output=True, text=True, check=True, timeout=60)
    rows = [line.split() for line in res.stdout.splitlines()[1:] if line.strip()]
    return [(row[0], row[-1]) for row in rows if "estargz-opt" in " ".join(row)]


_SIZE = re.compile(r"([\d.]+)\s*([kMGT]?B)")
_UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def active(c: Containerd) -> dict[str, float]:
    """Ingests in progress or left behind: ref -> bytes held (``ctr content active``)."""
    out = {}
    for line in c.ctr("content", "active").stdout.splitlines()[1:]:
        cols = [x for x in line.split("\t") if x]
        if cols:
            m = _SIZE.fullmatch(cols[1].strip()) if len(cols) > 1 else None
            out[cols[0]] = float(m[1]) * _UNITS[m[2]] if m else 0.0
    return out


def ctr_run(c: Containerd, image: str) -> str:
    """``ctr run --rm`` the image under a fresh container id; its stdout."""
    cid = f"esgzcd-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    return c.ctr("run", "--rm", image, cid).stdout


def import_layout(c: Containerd, layout: Path, tag: str, name: str, archive: Path,
                  all_platforms: bool = True) -> None:
    """Import the layout's TAG into *c* as NAME (through an archive, as ctr needs)."""
    archive_for_ctr(layout, tag, name, archive)
    c.ctr("images", "import", "--no-unpack",
          *(["--all-platforms"] if all_platforms else []), str(archive))
