"""Debian trixie's podman 5 and skopeo 1.18, the real consumers of containers-flavour
zstd:chunked, in a root built once per machine by scripts/trixie-root.sh (debootstrap;
storage.conf with enable_partial_images) and entered in a private namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "trixie-root.sh"
ROOT = Path(os.environ.get("TRIXIE_ROOT", "/var/tmp/trixie-root"))


class TrixieUnavailable(Exception):
    pass


def ensure_root() -> Path:
    """The trixie root, built now (minutes, once per machine) when it is missing."""
    if (ROOT / ".done").exists():
        return ROOT
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        raise TrixieUnavailable("building the trixie root needs root and debootstrap")
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=1800)
    if res.returncode != 0 or not (ROOT / ".done").exists():
        log = Path(f"{ROOT}.debootstrap.log")
        tail = log.read_text(errors="replace")[-400:] if log.exists() else res.stderr[-400:]
        raise TrixieUnavailable(f"trixie root build failed: {tail.strip()}")
    return ROOT


def run(cmd: str, share: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a bash command line in the root (host network), with share bound at /share."""
    env = {**os.environ, "TRIXIE_SHARE": str(share), "TRIXIE_ROOT": str(ROOT)}
    return subprocess.run(
        ["bash", str(SCRIPT), "run", f"export PODMAN_IGNORE_CGROUPSV1_WARNING=1; {cmd}"],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )


def podman(store: str) -> str:
    """podman with its own storage under /share (tests never share the root's store)."""
    return f"podman --root /share/{store}/root --runroot /share/{store}/run"
