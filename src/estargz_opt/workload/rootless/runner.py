"""The rootless runner: the workload under rootless runc or crun, with no privilege at all.

For when estargz-opt is not root (or with --rootless / --runner rootless). Everything
lives in one user namespace that the caller owns (see `rootless.monitor`): the rootfs is
the image unpacked onto a tmpfs there (so it is held in memory: a tmpfs the size of the
image), watched by fanotify in FID mode. The runtime is started in that namespace
(`nsenter --user`, which needs no privilege on a namespace one owns) with the spec from
the same steps as every runner's, adjusted by `rootless.spec` (no cgroups); the
container joins the monitor's mount namespace and, by default, gets its own network
namespace with only a loopback (--net-host shares the host's; --cni needs root).

No setuid helper and no capability is used on the host. The one exception, taken only
when it is there and configured: an image that needs several ids gets them from Debian's
newuidmap/newgidmap (setuid root, from the uidmap package, as every rootless container
tool uses) within the caller's /etc/subuid and /etc/subgid ranges; without them, such an
image is refused up front.

Cleanup is killing every process of that user namespace (`rootless.userns`): the kernel
then frees the mount namespace, the tmpfs and the network namespace. The namespace's
identity is written into the run directory, so a run after one killed with SIGKILL
finds and kills what the dead run left, before the run directories are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator

from estargz_opt.descriptor import Descriptor
from estargz_opt.mount import Mount
from estargz_opt.stores import Store
from estargz_opt.stores.owner import is_dead
from estargz_opt.workload.options import SamplerOptions
from estargz_opt.workload.rootless import checks
from estargz_opt.workload.rootless.checks import IdMapping, RootlessUnavailableError
from estargz_opt.workload.rootless.monitor import RootlessMonitor, RootlessSetup
from estargz_opt.workload.rootless.spec import rootless_spec
from estargz_opt.workload.rootless.userns import kill_all, ns_id
from estargz_opt.workload.runner import (
    SAMPLE_PREFIX,
    RunDir,
    RunnerError,
    SampleError,
    SampleImage,
    StdioPaths,
    WorkloadStartError,
    quietly,
)
from estargz_opt.workload.spec import Spec

log = logging.getLogger("estargz_opt")

#: The file in a run directory naming the run's user namespace (`userns.ns_id`).
USERNS_FILE = "userns"

CNI_NEEDS_ROOT = (
    "--cni needs root (its plugins configure the host's network); a rootless run has a "
    "private network with only a loopback, or the host's with --net-host; run as root "
    "for --cni"
)


class RootlessRunner:
    """Runs the sample container rootless (a `Runner`; see the module docstring)."""

    namespace = "estargz-opt"

    def __init__(
        self,
        store: Store,
        opts: SamplerOptions,
        runtime: str = "runc",
        *,
        release: str | None = None,
        proc_sys: str = "/proc/sys",
    ) -> None:
        """release, proc_sys: the kernel release and /proc/sys to check (the host's by
        default; a test gives others to make a refusal true)."""
        self._store = store
        self._opts = opts
        self._runtime = runtime
        self._release = release if release is not None else os.uname().release
        self._proc_sys = proc_sys
        self._mapping: IdMapping | None = None
        self._monitor: RootlessMonitor | None = None

    @property
    def mapping(self) -> IdMapping:
        if self._mapping is None:
            self._mapping = checks.plan_ids(os.getuid(), os.getgid())
        return self._mapping

    def check(self) -> None:
        """Everything that can be known before anything is made, in one line each."""
        if self._opts.cni:
            raise SampleError(CNI_NEEDS_ROOT)
        checks.check_kernel(self._release)
        checks.check_userns(self._proc_sys)
        for tool, package in ((self._runtime, self._runtime), ("nsenter", "util-linux")):
            if shutil.which(tool) is None:
                raise SampleError(
                    f"{tool} is not installed (apt-get install {package}): the rootless "
                    f"runner needs it; {checks.WAYS_OUT}"
                )
        log.info(
            "rootless run: %s",
            f"{self.mapping.size} ids from /etc/subuid"
            if self.mapping.several
            else "only your own id is mapped (root in the namespace)",
        )

    def reap_stale(self) -> None:
        """Kill the processes of the user namespaces of runs killed with SIGKILL.

        Only run directories whose owner process was on this host and is gone are
        looked at, and a namespace a live run names is never touched (namespace inodes
        are reused once freed). The run directories themselves go afterwards, with
        every runner's (`sample.reap_stale_dirs`)."""
        tmp = tempfile.gettempdir()
        dead: set[str] = set()
        live: set[str] = set()
        with contextlib.suppress(OSError):
            for name in os.listdir(tmp):
                if not name.startswith(SAMPLE_PREFIX):
                    continue
                try:
                    with open(os.path.join(tmp, name, "owner")) as f:
                        owner = f.read()
                    with open(os.path.join(tmp, name, USERNS_FILE)) as f:
                        ns = f.read().strip()
                except OSError:
                    continue
                (dead if is_dead(owner) else live).add(ns)
        for ns in dead - live:
            killed = kill_all(ns)
            if killed:
                log.warning(
                    "killed %d processes of a rootless sample container left by a run that "
                    "was killed",
                    len(killed),
                )

    def layer_chunks(self, layer: Descriptor) -> Iterable[bytes]:
        return self._store.stream(layer, f"layer {layer.digest}")

    @contextlib.contextmanager
    def rootfs(self, run: RunDir, image: SampleImage) -> Iterator[list[Mount]]:
        """Nothing to mount from outside: the monitor unpacks onto its own tmpfs. The
        compressed layers alone not fitting in memory is refused here, before any work."""
        available = checks.mem_available()
        packed = sum(layer.size for layer in image.layers)
        if packed > available:
            what = f"the image (its layers alone {packed >> 20} MiB)"
            raise checks.memory_refusal(what, available)
        yield []

    @contextlib.contextmanager
    def monitor(
        self, run: RunDir, image: SampleImage, mounts: list[Mount], log_path: str
    ) -> Iterator[RootlessMonitor]:
        """The rootless monitor, with the image unpacked; on exit every process of its
        user namespace is killed, which frees everything the run made there."""
        setup = RootlessSetup(
            target=run.rootfs,
            limit=checks.mem_available(),
            mapping=self.mapping,
            layer_names=[layer.digest for layer in image.layers],
            diff_ids=list(image.diff_ids),
        )
        streams = [self.layer_chunks(layer) for layer in image.layers]
        monitor = RootlessMonitor(setup, streams, log_path)
        ns = ""
        try:
            ns = ns_id(monitor.user_ns_path)
            with open(os.path.join(run.path, USERNS_FILE), "w") as f:
                f.write(ns)
            log.info(
                "rootless: the image's rootfs takes %d MiB of memory (tmpfs)",
                monitor.unpacked >> 20,
            )
            self._monitor = monitor
            yield monitor
        finally:
            self._monitor = None
            if ns:
                kill_all(ns)
            monitor.close()

    def _require_monitor(self) -> RootlessMonitor:
        if self._monitor is None:
            raise RootlessUnavailableError("the rootless container needs its monitor first")
        return self._monitor

    def runtime_argv(self, monitor: RootlessMonitor, state: str) -> list[str]:
        """The runtime's command line up to its subcommand: entered into the monitor's
        user namespace (root there, nothing on the host), its state in the run dir."""
        argv = ["nsenter", f"--user={monitor.user_ns_path}", "--preserve-credentials"]
        argv += [self._runtime, "--root", state]
        if os.path.basename(self._runtime).startswith("crun"):
            argv.append("--cgroup-manager=disabled")
        return argv

    @contextlib.contextmanager
    def container(
        self, run: RunDir, image: SampleImage, spec: Spec, stdio: StdioPaths
    ) -> Iterator[RuntimeTask]:
        """The bundle of the container `run.id`; the runtime runs it on `start`."""
        if stdio.terminal:
            raise SampleError("-t is not supported by the rootless runner yet")
        monitor = self._require_monitor()
        bundle = os.path.join(run.path, "bundle")
        os.mkdir(bundle, 0o700)
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(rootless_spec(spec, self.mapping), f)
        state = os.path.join(run.path, "runtime")
        os.mkdir(state, 0o700)
        task = RuntimeTask(self.runtime_argv(monitor, state), run.id, bundle, stdio)
        try:
            yield task
        finally:
            task.close()


class RuntimeTask:
    """The container under the runtime's `run` (a `Task`): `run` stays our child for as
    long as the container runs, and exits with its status."""

    def __init__(self, argv: list[str], cid: str, bundle: str, stdio: StdioPaths) -> None:
        self._argv, self._id, self._bundle, self._stdio = argv, cid, bundle, stdio
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        def fifo(path: str, flags: int) -> int:
            return os.open(path, flags | os.O_CLOEXEC) if path else os.open(os.devnull, flags)

        fds = [
            fifo(self._stdio.stdin, os.O_RDONLY),
            fifo(self._stdio.stdout, os.O_WRONLY),
            fifo(self._stdio.stderr, os.O_WRONLY),
        ]
        try:
            self._proc = subprocess.Popen(
                [*self._argv, "run", "--bundle", self._bundle, self._id],
                stdin=fds[0],
                stdout=fds[1],
                stderr=fds[2],
                cwd=self._bundle,
                start_new_session=True,
            )
        except OSError as exc:
            raise WorkloadStartError(f"cannot start the runtime: {exc}") from None
        finally:
            for fd in fds:
                os.close(fd)

    def wait(self, timeout: float | None = None) -> int | None:
        if self._proc is None:
            raise RunnerError("the rootless container was not started")
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RunnerError(f"the workload did not exit within {timeout}s") from None

    def kill(self, signo: int) -> None:
        res = subprocess.run(
            [*self._argv, "kill", "--all", self._id, str(signo)],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0 and self._proc is not None and self._proc.poll() is None:
            raise RunnerError(res.stderr.strip() or f"kill exited {res.returncode}")

    def delete(self) -> int | None:
        status = self._proc.poll() if self._proc is not None else None
        subprocess.run(
            [*self._argv, "delete", "--force", self._id], capture_output=True, check=False
        )
        return status

    def resize(self, cols: int, rows: int) -> None:
        return None

    def close_stdin(self) -> None:
        return None

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            quietly("kill the runtime", self._proc.kill)
            self._proc.wait()
