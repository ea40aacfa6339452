"""Commands run where no containerd is reachable: a PATH without its tools, and (as root) a
mount namespace with a fresh /run, so a test proves a conversion needs no daemon.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from support.cli import cli_argv
from support.containerd import find_ctr_remote

CONTAINERD_BINARIES = re.compile(r"^(ctr|ctr-remote|containerd.*|nerdctl|dockerd?|buildkitd)$")

HARNESS_RC = 97


def _q(p: str | Path) -> str:
    return "'" + str(p).replace("'", "'\\''") + "'"


class NoDaemon:
    """Runs commands with no containerd reachable (see the module docstring)."""

    def __init__(self, base: Path) -> None:
        self.bin = base / "bin"
        self.bin.mkdir(parents=True)
        hidden = set()
        for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
            if not d or not os.path.isdir(d):
                continue
            for name in sorted(os.listdir(d)):
                src = os.path.join(d, name)
                if CONTAINERD_BINARIES.match(name):
                    hidden.add(os.path.realpath(src))
                    continue
                dst = self.bin / name
                if not dst.exists() and os.access(src, os.X_OK) and os.path.isfile(src):
                    dst.symlink_to(src)
        ref = find_ctr_remote()
        if ref is not None:
            hidden.add(str(ref))
        self.hidden = sorted(p for p in hidden if os.path.isfile(p))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD")}
        self.env["PATH"] = str(self.bin)
        self.namespaced = _can_unshare()

    def run(self, argv: list[str], ro: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
        if ro and not self.namespaced:
            pytest.skip("a read-only bind mount needs root and unshare(1)")
        if self.namespaced:
            lines = ["mount -t tmpfs tmpfs /run || exit 97"]
            lines += [f"mount --bind /dev/null {_q(p)} || exit 97" for p in self.hidden]
            for p in ro:
                lines += [f"mount --bind {_q(p)} {_q(p)} || exit 97",
                          f"mount -o remount,bind,ro {_q(p)} || exit 97"]
            lines.append('exec "$@"')
            argv = ["/usr/bin/unshare", "--mount", "--propagation", "private",
                    "/bin/sh", "-c", "\n".join(lines), "sh", *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env,
                              stdin=subprocess.DEVNULL, timeout=300)
        assert proc.returncode != HARNESS_RC, f"sandbox set-up failed: {proc.stderr}"
        return proc

    def optimize(self, *args: str | Path, ro: tuple[Path, ...] = ()
                 ) -> subprocess.CompletedProcess:
        return self.run([*cli_argv(), "optimize", *map(str, args)],
                        ro=ro)




def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /run"], capture_output=True)
    return probe.returncode == 0
