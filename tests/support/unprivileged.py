"""Run estargz-opt as an unprivileged user with no capabilities, from a root test.

`setpriv` drops to a uid/gid that has no passwd entry, no supplementary groups, and an
empty inheritable and bounding capability set: what a GitLab runner without privileges
gives. That user must be able to run our Python and read the project; when the test's
interpreter is not readable by it (e.g. a pyenv under /root), a venv without pip is made
from the system's python3 of the same minor version, whose site-packages point at the
test venv's packages and the project source. Files the user reads or writes live under
`Unprivileged.home`, which it owns.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import estargz_opt

#: This process's own: tests count and kill the uid's processes, and several test
#: sessions (or a benchmark) run at once on one machine.
UID = GID = 65536 + os.getpid() % 100000
#: by its path: a test may give the user a PATH without it
SETPRIV = shutil.which("setpriv") or "setpriv"


def setpriv(uid: int = UID, gid: int = GID, *, setuid_helpers: bool = False) -> list[str]:
    """setpriv's command line to run as `uid`: no capabilities, and (unless
    `setuid_helpers`, for newuidmap) an empty bounding set, so that no setuid binary can
    gain any either."""
    bounding = [] if setuid_helpers else ["--bounding-set=-all"]
    return [SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            "--inh-caps=-all", *bounding, "--"]


def _runs_as(python: str, uid: int) -> bool:
    """Whether `uid` can run `python` and import the project, also from inside a user
    namespace of its own (where the rootless helper imports what it needs)."""
    res = subprocess.run([*setpriv(uid, uid), "unshare", "--user", "--map-root-user",
                          python, "-c", "import estargz_opt, grpc"],
                         capture_output=True, check=False)
    return res.returncode == 0


def _python_for(uid: int, where: Path) -> str:
    if _runs_as(sys.executable, uid):
        return sys.executable
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}",
                          path="/usr/bin:/bin")
    assert system, "no system python of this minor version for the unprivileged user"
    venv = where / "venv"
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True)
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", code],
                               check=True, capture_output=True, text=True).stdout.strip())
    src = Path(estargz_opt.__file__).resolve().parents[1]
    (site / "estargz-opt-test.pth").write_text(f"{sysconfig.get_path('purelib')}\n{src}\n")
    python = str(venv / "bin" / "python")
    assert _runs_as(python, uid), "the unprivileged user cannot import estargz_opt"
    return python


@dataclass
class Unprivileged:
    uid: int
    gid: int
    home: Path
    python: str

    @property
    def tmpdir(self) -> Path:
        return self.home / "tmp"

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": str(self.home), "TMPDIR": str(self.tmpdir), "LANG": "C.UTF-8",
               "ESTARGZ_OPT_CACHE_DIR": str(self.home / "cache")}
        env.update(extra)
        return env

    def argv(self, *args: str | Path, setuid_helpers: bool = False) -> list[str]:
        return [*setpriv(self.uid, self.gid, setuid_helpers=setuid_helpers), self.python,
                "-m", "estargz_opt", *map(str, args)]

    def run(self, *args: str | Path, env: dict[str, str] | None = None,
            timeout: float = 180, setuid_helpers: bool = False
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args, setuid_helpers=setuid_helpers),
                              env=env or self.env(), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              check=False)

    def with_subids(self, argv: list[str], start: int = 200000, count: int = 65536
                    ) -> list[str]:
        """`argv` (from `argv(..., setuid_helpers=True)`) run where the user has a name and
        an /etc/subuid and /etc/subgid range: the host's files with the user's lines,
        bound over them in a private mount namespace (the host's stay as they are)."""
        name = "estargz-test"
        files = {}
        for etc, line in (("passwd", f"{name}:x:{self.uid}:{self.gid}::/nonexistent:/bin/sh"),
                          ("subuid", f"{name}:{start}:{count}"),
                          ("subgid", f"{name}:{start}:{count}")):
            path = self.home / f"etc-{etc}"
            host = Path("/etc", etc)
            path.write_text((host.read_text() if host.exists() else "") + line + "\n")
            path.chmod(0o644)
            files[f"/etc/{etc}"] = path
        binds = " && ".join(f"mount --bind {src} {dst}" for dst, src in files.items())
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'{binds} && exec "$@"', "sh", *argv]

    def remove(self) -> None:
        """Remove the home and everything the user made there."""
        shutil.rmtree(self.home, ignore_errors=True)

    def give(self, path: Path) -> Path:
        """Make `path` (a tree under home) the user's own."""
        subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", str(path)], check=True)
        return path


def make_unprivileged(uid: int = UID, gid: int = GID) -> Unprivileged:
    """A home for the user (0755 on the way, so it can reach it), and a Python it runs."""
    home = Path(tempfile.mkdtemp(prefix="estargz-opt-unpriv-", dir="/tmp"))
    home.chmod(0o755)
    python = _python_for(uid, home)
    for d in ("tmp", "cache"):
        (home / d).mkdir()
    os.chown(home, uid, gid)
    for d in ("tmp", "cache"):
        os.chown(home / d, uid, gid)
    return Unprivileged(uid, gid, home, python)
