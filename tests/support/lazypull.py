"""Lazy pulling end to end: a stargz snapshotter, a loopback registry and a
containerd that uses the snapshotter, for tests/test_lazy_pull.py and
bench/bench_time_to_ready.py.

* :func:`build_snapshotter` builds tests/e2e/snapshotter/main.go (a small daemon
  around Debian's stargz-snapshotter 0.12 Go library) with Debian's Go in GOPATH
  mode, cached under /var/cache/estargz-opt/e2e/ by the hash of its inputs.
* :class:`Registry`: Debian's docker-registry on 127.0.0.1, a free port, storage in
  a temporary directory.
* :class:`Proxy`: tests/support/throttle_proxy.py in front of the registry; it logs every
  request (and can emulate a slow link).
* :class:`LazyDaemons`: a fresh snapshotter plus a fresh containerd whose
  ``proxy_plugins.stargz`` is that snapshotter, all state in one directory.

Every ``stop()`` is safe to call twice and leaves nothing behind: processes are
ended by pid (and get SIGTERM if the Python process dies first), mounts under the
state directory (FUSE layers, overlays, rootfs) are unmounted, directories removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SNAPSHOTTER_SRC = REPO / "tests" / "e2e" / "snapshotter" / "main.go"
PROXY_SCRIPT = Path(__file__).resolve().parent / "throttle_proxy.py"
CACHE = Path(os.environ.get("ESTARGZ_OPT_CACHE", "/var/cache/estargz-opt")) / "e2e"
GOCODE = Path("/usr/share/gocode")
STARGZ_LIB = GOCODE / "src" / "github.com" / "containerd" / "stargz-snapshotter"
STARGZ_LIB_PKG = "golang-github-containerd-stargz-snapshotter-dev"
GO = Path("/usr/bin/go")
REGISTRY_BIN = Path("/usr/bin/docker-registry")
CONTAINERD_BIN = Path("/usr/bin/containerd")
CTR_REMOTE_DEFAULT = Path("/opt/estargz-opt/ctr-remote/usr/bin/ctr-remote")
NAMESPACE = "default"
# The marker scripts/containerd-down.sh (and .ci/run's crash clean-up) look for.
CONTAINERD_MARKER = ".estargz-opt-containerd"

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies,
    so a killed test run leaves no daemon behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


class Unavailable(RuntimeError):
    """A prerequisite of lazy pulling is missing here; the message says which."""


def unavailable_reason() -> str | None:
    """Why lazy pulling cannot be tested on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "lazy pulling needs root (FUSE mounts, containerd, runc)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel or container)"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return f"/dev/fuse cannot be opened: {e}"
    for path, pkg in ((GO, "golang-go"), (STARGZ_LIB / "fs" / "fs.go", STARGZ_LIB_PKG),
                      (REGISTRY_BIN, "docker-registry"), (CONTAINERD_BIN, "containerd")):
        if not path.exists():
            return f"{path} is missing (scripts/install-e2e-deps.sh installs {pkg})"
    if shutil.which("ctr") is None:
        return "ctr is missing (apt-get install containerd)"
    return None


def stargz_lib_has_external_toc() -> bool:
    """External TOCs (estargz/externaltoc) came with stargz-snapshotter 0.13."""
    return (STARGZ_LIB / "estargz" / "externaltoc").is_dir()


# --------------------------------------------------------------------------- processes


def _wait_gone(proc: subprocess.Popen, timeout: float) -> bool:
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _stop_proc(proc: subprocess.Popen | None, term_timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    if not _wait_gone(proc, term_timeout):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        _wait_gone(proc, 10)


def _pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _stop_pid(pid: int, timeout: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def mounts_under(directory: Path) -> list[tuple[str, str]]:
    """``(mount point, fstype)`` of every mount at or below *directory*, deepest first."""
    d = str(directory)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            mp = parts[4].encode().decode("unicode_escape")  # \040 etc.
            if mp == d or mp.startswith(d + "/"):
                out.append((mp, parts[sep + 1]))
    return sorted(set(out), key=lambda m: m[0], reverse=True)


def unmount_all_under(directory: Path) -> list[str]:
    """Unmount everything under *directory*; return what could not be unmounted."""
    failed = []
    for _ in range(3):
        left = mounts_under(directory)
        if not left:
            return []
        failed = []
        for mp, _fstype in left:
            if subprocess.run(["umount", mp], capture_output=True).returncode != 0 and \
               subprocess.run(["umount", "-l", mp], capture_output=True).returncode != 0:
                failed.append(mp)
    return failed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(what: str, probe, timeout: float, proc: subprocess.Popen | None = None,
                log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: not ready within {timeout:.0f} s\n{tail}")
        time.sleep(0.05)


def _short_dir(parent: Path | None, prefix: str) -> Path:
    """A new directory for daemon state whose socket paths fit the 107-byte limit."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
        d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        if len(str(d)) + 32 <= 107:
            return d
        d.rmdir()
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# --------------------------------------------------------------------------- the snapshotter binary


def _dpkg_version(pkg: str) -> str:
    res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                         text=True)
    return res.stdout.strip() if res.returncode == 0 else "?"


def build_snapshotter(cache: Path = CACHE) -> Path:
    """The snapshotter binary, built if the cache has none for these inputs.

    Keyed by main.go, the Go version and the library package's version. Built
    with ``GO111MODULE=off GOPATH=<cache>/gopath:/usr/share/gocode`` (no network)."""
    reason = unavailable_reason()
    if reason:
        raise Unavailable(reason)
    src = SNAPSHOTTER_SRC.read_bytes()
    go_version = subprocess.run([str(GO), "version"], capture_output=True, text=True,
                                check=True).stdout.strip()
    key = hashlib.sha256(src + go_version.encode() + _dpkg_version(STARGZ_LIB_PKG).encode()
                         ).hexdigest()[:16]
    out = cache / f"stargz-snapshotter-{key}"
    if out.is_file() and os.access(out, os.X_OK):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file():
            return out
        env = {**os.environ, "GO111MODULE": "off", "GOFLAGS": "", "CGO_ENABLED": "0",
               "GOPATH": f"{cache / 'gopath'}:{GOCODE}", "GOCACHE": str(cache / "gocache"),
               "GOPROXY": "off", "HOME": str(cache)}
        with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
            work = Path(tmp) / "src" / "estargz-opt-e2e-snapshotter"
            work.mkdir(parents=True)
            (work / "main.go").write_bytes(src)
            tmp_out = Path(tmp) / "bin"
            res = subprocess.run([str(GO), "build", "-o", str(tmp_out), "."], cwd=work, env=env,
                                 capture_output=True, text=True, timeout=900)
            if res.returncode != 0:
                raise RuntimeError(f"go build of {SNAPSHOTTER_SRC} failed:\n{res.stderr[-4000:]}")
            os.replace(tmp_out, out)
        # Older builds of other versions of main.go are of no use any more.
        for old in cache.glob("stargz-snapshotter-*"):
            if old != out:
                with contextlib.suppress(OSError):
                    old.unlink()
    return out


# --------------------------------------------------------------------------- registry


#: A request in distribution's access log: "METHOD PATH HTTP/x.y" STATUS
ACCESS_LINE = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3}) ')


@dataclass(frozen=True)
class RegistryConfig:
    """What a test registry adds to the plain-HTTP default (tests/support/registries.py builds
    these): TLS with a server certificate, and an ``auth:`` section."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: the CA that signed tls_cert, for the readiness probe
    ca: Path | None = None
    #: the body of the top-level ``auth:`` section, each line indented by two spaces
    auth: str = ""
    #: ``tls.clientcas``: the registry then requires a client certificate signed by it
    client_ca: Path | None = None
    #: the certificate and key the readiness probe presents to such a registry
    probe_cert: tuple[Path, Path] | None = None


@dataclass
class Registry:
    """docker-registry serving on 127.0.0.1:<port>, storage under ``dir``."""

    dir: Path
    port: int
    proc: subprocess.Popen | None = field(default=None, repr=False)
    config: RegistryConfig = field(default_factory=RegistryConfig)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls_cert else "http"

    @classmethod
    def start(cls, parent: Path | None = None, config: RegistryConfig | None = None
              ) -> Registry:
        if not REGISTRY_BIN.exists():
            raise Unavailable(f"{REGISTRY_BIN} is missing (apt-get install docker-registry)")
        d = _short_dir(parent, "reg.")
        reg = cls(d, _free_port(), config=config or RegistryConfig())
        (d / "storage").mkdir()
        tls = (f"  tls:\n    certificate: {reg.config.tls_cert}\n    key: {reg.config.tls_key}\n"
               if reg.config.tls_cert else "")
        if reg.config.client_ca is not None:
            tls += f"    clientcas:\n      - {reg.config.client_ca}\n"
        auth = f"auth:\n{reg.config.auth}" if reg.config.auth else ""
        (d / "config.yml").write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {d / 'storage'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{reg.port}\n{tls}{auth}"
        )
        log = d / "registry.log"
        try:
            with open(log, "wb") as logf:
                reg.proc = subprocess.Popen(
                    [str(REGISTRY_BIN), "serve", str(d / "config.yml")], stdin=subprocess.DEVNULL,
                    stdout=logf, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            _wait_until("docker-registry", reg._answers, 30, reg.proc, log)
        except BaseException:
            reg.stop()
            raise
        return reg

    def _answers(self) -> bool:
        """Any HTTP answer from /v2/ (a registry with auth answers 401)."""
        ctx = None
        if self.config.ca is not None:
            ctx = ssl.create_default_context(cafile=str(self.config.ca))
            if self.config.probe_cert is not None:
                ctx.load_cert_chain(*self.config.probe_cert)
        try:
            with urllib.request.urlopen(f"{self.scheme}://{self.host}/v2/", timeout=2,
                                        context=ctx) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            return e.code == 401
        except (urllib.error.URLError, OSError):
            return False

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of each request served so far, from the access log
        (Apache combined format) in registry.log."""
        log = self.dir / "registry.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return [(m[1], m[2], int(m[3])) for m in ACCESS_LINE.finditer(text)]

    def blob_data(self, digest: str) -> Path:
        """Where the registry's filesystem driver keeps the blob's bytes."""
        algo, hexd = digest.split(":", 1)
        return (self.dir / "storage" / "docker" / "registry" / "v2" / "blobs" / algo / hexd[:2]
                / hexd / "data")

    def stop(self) -> None:
        _stop_proc(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- proxy


@dataclass
class Proxy:
    """tests/support/throttle_proxy.py in front of *upstream*; every request logged."""

    log: Path
    host: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @classmethod
    def start(cls, upstream: str, log: Path, rtt_ms: float = 0, mbit: float = 0,
              extra: Sequence[str] = ()) -> Proxy:
        """extra: more throttle_proxy.py flags (e.g. --too-many N)."""
        proxy = cls(log)
        proxy.proc = subprocess.Popen(
            [sys.executable, str(PROXY_SCRIPT), "--upstream", upstream, "--log", str(log),
             "--rtt-ms", str(rtt_ms), "--mbit", str(mbit), *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=_die_with_parent)
        line = proxy.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            err = proxy.proc.stderr.read() if proxy.proc.poll() is not None else ""
            proxy.stop()
            raise RuntimeError(f"throttle_proxy.py did not start: {line!r} {err}")
        proxy.host = line.removeprefix("listening on ")
        return proxy

    def requests(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def clear(self) -> None:
        with open(self.log, "w"):
            pass

    def stop(self) -> None:
        _stop_proc(self.proc, 5)
        if self.proc is not None:
            for s in (self.proc.stdout, self.proc.stderr):
                if s is not None:
                    s.close()


def parse_range(header: str | None) -> list[tuple[int, int]]:
    """``bytes=a-b,c-d`` -> ``[(a, b), (c, d)]`` (inclusive); [] for none/suffix ranges."""
    if not header or not header.startswith("bytes="):
        return []
    out = []
    for part in header[len("bytes="):].split(","):
        a, _, b = part.strip().partition("-")
        if a and b:
            out.append((int(a), int(b)))
    return out


# --------------------------------------------------------------------------- daemons


CONTAINERD_TOML = """\
# Generated by estargz-opt tests/support/lazypull.py (the shape of scripts/containerd-up.sh,
# plus the stargz snapshotter as a proxy plugin).
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.ttrpc.sock"

[debug]
  address = "{d}/debug.sock"
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "{d}/sn/snapshotter.sock"
"""


@dataclass
class LazyDaemons:
    """A fresh stargz snapshotter and a fresh containerd using it (``stargz``).

    State: DIR/sn (snapshotter root and socket, FUSE layers under
    DIR/sn/snapshotter/snapshots/*/fs), DIR/root, DIR/state (containerd)."""

    dir: Path
    ctr_remote: Path = CTR_REMOTE_DEFAULT
    snapshotter: subprocess.Popen | None = field(default=None, repr=False)
    containerd: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return str(self.dir / "containerd.sock")

    @property
    def snapshotter_root(self) -> Path:
        return self.dir / "sn"

    @property
    def snapshotter_log(self) -> Path:
        return self.dir / "snapshotter.log"

    @classmethod
    def start(cls, binary: Path, parent: Path | None = None, *,
              ctr_remote: Path = CTR_REMOTE_DEFAULT, no_background_fetch: bool = False,
              log_level: str = "info") -> LazyDaemons:
        d = _short_dir(parent, "e2e.")
        daemons = cls(d, ctr_remote)
        try:
            daemons._start(binary, no_background_fetch, log_level)
        except BaseException:
            daemons.stop()
            raise
        return daemons

    def _start(self, binary: Path, no_background_fetch: bool, log_level: str) -> None:
        d = self.dir
        (d / CONTAINERD_MARKER).touch()
        for sub in ("root", "state", "opt", "sn"):
            (d / sub).mkdir(exist_ok=True)
        sock = self.snapshotter_root / "snapshotter.sock"
        cmd = [str(binary), "-root", str(self.snapshotter_root), "-address", str(sock),
               "-log-level", log_level]
        if no_background_fetch:
            cmd.append("-no-background-fetch")
        with open(self.snapshotter_log, "wb") as logf:
            self.snapshotter = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                                stderr=subprocess.STDOUT,
                                                preexec_fn=_die_with_parent)
        (d / "snapshotter.pid").write_text(str(self.snapshotter.pid))

        def sock_answers() -> bool:
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(sock))
                    return True
                except OSError:
                    return False
        _wait_until("stargz snapshotter", sock_answers, 30, self.snapshotter,
                    self.snapshotter_log)

        conf = d / "containerd.toml"
        conf.write_text(CONTAINERD_TOML.format(d=d))
        log = d / "containerd.log"
        with open(log, "wb") as logf:
            self.containerd = subprocess.Popen(
                [str(CONTAINERD_BIN), "--config", str(conf)], stdin=subprocess.DEVNULL,
                stdout=logf, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        (d / "containerd.pid").write_text(str(self.containerd.pid))

        def ctr_answers() -> bool:
            return subprocess.run(["ctr", "-a", self.address, "version"], capture_output=True,
                                  stdin=subprocess.DEVNULL).returncode == 0
        _wait_until("containerd", ctr_answers, 30, self.containerd, log)

    # -- commands

    def ctr(self, *args: str, check: bool = True, timeout: float = 300
            ) -> subprocess.CompletedProcess:
        return _run(["ctr", "-a", self.address, "-n", NAMESPACE, *args], check, timeout)

    def ctr_remote_cmd(self, *args: str, check: bool = True, timeout: float = 300
                       ) -> subprocess.CompletedProcess:
        return _run([str(self.ctr_remote), "-a", self.address, "-n", NAMESPACE, *args], check,
                    timeout)

    def fuse_mounts(self) -> list[str]:
        """FUSE mount points under the snapshotter's root (one per lazily mounted layer)."""
        return [mp for mp, fstype in mounts_under(self.snapshotter_root)
                if fstype == "fuse" or fstype.startswith("fuse.")]

    def snapshotter_log_text(self) -> str:
        return self.snapshotter_log.read_text(errors="replace") \
            if self.snapshotter_log.exists() else ""

    # -- teardown

    def stop(self) -> None:
        """Stop containerd, its shims and the snapshotter; unmount; remove the directory."""
        _stop_proc(self.containerd, 20)
        sock = self.address
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                cmd = _pid_cmdline(int(p.name))
                if "containerd-shim" in cmd and sock in cmd:
                    _stop_pid(int(p.name))
        # The snapshotter unmounts its FUSE layers when it shuts down (Close).
        _stop_proc(self.snapshotter, 20)
        failed = unmount_all_under(self.dir)
        if failed:
            raise RuntimeError(f"could not unmount {failed}")
        shutil.rmtree(self.dir, ignore_errors=True)


def _run(cmd: Sequence[str], check: bool, timeout: float) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\nstdout:\n{res.stdout}\n"
                             f"stderr:\n{res.stderr}")
    return res


@contextlib.contextmanager
def lazy_daemons(binary: Path, parent: Path | None = None, **kw) -> Iterator[LazyDaemons]:
    daemons = LazyDaemons.start(binary, parent, **kw)
    try:
        yield daemons
    finally:
        daemons.stop()


def run_until_line(cmd: Sequence[str], ready: str, timeout: float = 120
                   ) -> tuple[float | None, int, str, str]:
    """Run *cmd*; return (seconds until a stdout line equal to *ready* appeared or None,
    exit status, stdout, stderr). The process is always waited for."""
    t0 = time.monotonic()
    seen = None
    out_lines = []
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err)
        try:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                out_lines.append(line)
                if seen is None and line.strip() == ready:
                    seen = time.monotonic() - t0
                if time.monotonic() - t0 > timeout:
                    break
            rc = proc.wait(max(1, timeout - (time.monotonic() - t0)))
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        err.seek(0)
        return seen, rc, "\n".join(out_lines), err.read().decode(errors="replace")
