"""Shared helpers for the benchmark scripts in bench/ (not part of the package).

Everything here is plain standard library so that the benchmarks run with nothing
but ``python3`` and the tools they measure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = Path(os.environ.get("ESTARGZ_OPT_BENCH_CACHE", "/var/cache/estargz-opt/bench"))
# Conversion benchmarks measure the conversion: estargz-opt's layer cache would turn a
# repeat into a copy (bench_cache.py measures the cache itself).
NO_CACHE = ["--no-cache"]

MiB = 1024 * 1024


def log(msg: str) -> None:
    """Progress output goes to stderr so stdout stays the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- signals


class Interrupted(SystemExit):
    pass


def _raise_on_signal(signum: int, _frame: object) -> None:
    # Turn SIGTERM/SIGHUP/SIGINT into an exception so every ``finally`` and
    # context manager (containerd shutdown, temp dirs, mounts) still runs.
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not abort the cleanup
    raise Interrupted(128 + signum)


def install_signal_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_on_signal)


# --------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Measurement:
    cmd: list[str]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_kib: int
    stdout: str
    stderr: str

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def maxrss_mib(self) -> float:
        return self.maxrss_kib / 1024

    def check(self) -> Measurement:
        if self.returncode != 0:
            tail = "\n".join(self.stderr.strip().splitlines()[-20:])
            raise RuntimeError(
                f"command failed with exit code {self.returncode}: {' '.join(self.cmd)}\n{tail}"
            )
        return self

    def as_dict(self) -> dict:
        return {
            "cmd": self.cmd,
            "returncode": self.returncode,
            "wall_s": round(self.wall_s, 3),
            "user_s": round(self.user_s, 3),
            "sys_s": round(self.sys_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "maxrss_mib": round(self.maxrss_mib, 1),
        }


def run_measured(
    cmd: Sequence[str], *, cwd: str | os.PathLike | None = None, env: dict | None = None
) -> Measurement:
    """Run ``cmd`` and measure wall time, user/sys CPU and peak RSS of it.

    The rusage comes from wait4() on the child itself, so it covers that process
    and every descendant it waited for, and nothing else of ours.  Output goes to
    temporary files (no pipes to drain while we block in wait4).
    """
    cmd = [str(c) for c in cmd]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd,
                                env=env)
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measurement(
            cmd=cmd,
            returncode=proc.returncode,
            wall_s=wall,
            user_s=ru.ru_utime,
            sys_s=ru.ru_stime,
            maxrss_kib=ru.ru_maxrss,  # KiB on Linux
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )


def run(cmd: Sequence[str], *, check: bool = True, capture: bool = True,
        **kw) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    res = subprocess.run(cmd, text=True, capture_output=capture, stdin=subprocess.DEVNULL, **kw)
    if check and res.returncode != 0:
        detail = (res.stderr or "").strip() if capture else ""
        raise RuntimeError(f"command failed ({res.returncode}): {' '.join(cmd)}\n{detail}")
    return res


# --------------------------------------------------------------------------- files


def sha256_file(path: str | os.PathLike, bufsize: int = 4 * MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def write_json_atomic(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def temp_dir(prefix: str, base: str | os.PathLike | None = None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- our CLI


def estargz_opt_cmd() -> list[str]:
    exe = shutil.which("estargz-opt")
    if exe:
        return [exe]
    return [sys.executable, "-m", "estargz_opt"]


def wait_for(what: str, probe: Callable[[], bool], timeout_s: float, every_s: float = 15) -> bool:
    """Poll ``probe`` until it is true or ``timeout_s`` passed (0 = try once)."""
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        if probe():
            return True
        if time.monotonic() >= deadline:
            return False
        if not announced:
            log(f"waiting up to {timeout_s:.0f} s for {what} ...")
            announced = True
        time.sleep(every_s)


def cli_layer_convert_ready() -> bool:
    res = subprocess.run([*estargz_opt_cmd(), "layer", "convert", "--help"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return res.returncode == 0 and "--format" in res.stdout


# --------------------------------------------------------------------------- tables


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:,.1f} MB"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)
