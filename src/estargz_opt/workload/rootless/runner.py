"""The rootless runner: the workload under rootless runc or crun, with no privilege at all.

For when estargz-opt is not root (or with --rootless / --runner rootless). Everything
lives in one user namespace that the caller owns (see `rootless.monitor`): the rootfs is
the image unpacked onto a tmpfs there (so it is held in memory: a tmpfs the size of the
image), watched by fanotify in FID mode. The runtime is started in that namespace
(`nsenter --user`, which needs no privilege on a namespace one owns) with the spec from
the same steps as every runner's, adjusted by `rootless.spec` (no cgroups); the
container joins the monitor's mount namespace and, by default, gets its own network
namespace with only a loopback (net_host shares the host's; cni needs root).

No setuid helper and no capability is used on the host. The one exception, taken only
when it is there and configured: an image's several ids come from Debian's
newuidmap/newgidmap (setuid root, from the uidmap package, as every rootless container
tool uses) within the caller's /etc/subuid and /etc/subgid ranges. Without them (no
range, no uidmap, capabilities dropped or no_new_privs, as in a restricted Kubernetes
pod) only the caller's own id is mapped, as root of the namespace: every file is
unpacked as that id (podman's ignore_chown_errors; ownership does not change which
files the workload opens) and the workload runs as root there. Only a workload whose
user or group is not root is refused then (`rootless.spec`): no such id exists in the
namespace.

Cleanup is killing every process of that user namespace (`rootless.userns`): the kernel
then frees the mount namespace, the tmpfs and the network namespace. The namespace's
identity is written into the run directory, so a run after one killed with SIGKILL
finds and kills what the dead run left, before the run directories are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

from estargz_opt.errors import RootlessUnavailableError, SampleError
from estargz_opt.mount import Mount
from estargz_opt.stores import Store
from estargz_opt.stores.owner import is_dead
from estargz_opt.workload.cgroups import runtime_prefix
from estargz_opt.workload.options import SamplerOptions
from estargz_opt.workload.rootless import checks
from estargz_opt.workload.rootless.checks import IdMapping
from estargz_opt.workload.rootless.monitor import RootlessMonitor, RootlessSetup
from estargz_opt.workload.rootless.spec import rootless_spec
from estargz_opt.workload.rootless.userns import kill_all, ns_id, signal_pid_namespace
from estargz_opt.workload.runc.runner import RuncRunner, RuncTask
from estargz_opt.workload.runc.runtime import RuntimeCLI
from estargz_opt.workload.runner import SAMPLE_PREFIX, RunDir, SampleImage, StdioPaths, find_runtime
from estargz_opt.workload.spec import Spec

log = logging.getLogger("estargz_opt")

#: The file in a run directory naming the run's user namespace (`userns.ns_id`).
USERNS_FILE = "userns"

#: The refusal of the cni option: a template over the terms `cni` and `net_host`.
CNI_NEEDS_ROOT = (
    "{cni} needs root (its plugins configure the host's network); a rootless run has a "
    "private network with only a loopback, or the host's with {net_host}; run as root "
    "for {cni}"
)


class RootlessTask(RuncTask):
    """The runc runner's task, signalled without the runtime: `kill --all` finds the
    processes through the container's cgroup, which a rootless container does not have,
    and signals none (see `userns.signal_pid_namespace`)."""

    def kill(self, signo: int) -> None:
        if self._pid and not self._exited.is_set():
            signal_pid_namespace(self._pid, signo)


class RootlessRunner(RuncRunner):
    """Runs the sample container rootless (a `Runner`; see the module docstring): the
    runc runner's container and task, with its own rootfs, monitor, checks and reaping."""

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
        super().__init__(store, runtime)
        self._opts = opts
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
            raise SampleError.with_terms(CNI_NEEDS_ROOT, cni="cni", net_host="net_host")
        checks.check_kernel(self._release)
        checks.check_userns(self._proc_sys)
        find_runtime(self._runtime)
        if shutil.which("nsenter") is None:
            raise SampleError(
                f"nsenter is not installed (apt-get install util-linux): the rootless "
                f"runner needs it; {checks.WAYS_OUT}"
            )
        if self.mapping.several:
            log.info("rootless run: %d ids from /etc/subuid", self.mapping.size)
        else:
            log.info(
                "rootless run with only your own id (%s): %s",
                checks.one_id_reason(self.mapping),
                checks.ONE_ID,
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

    def new_task(self, cli: RuntimeCLI, cid: str) -> RuncTask:
        return RootlessTask(cli, cid)

    def _require_monitor(self) -> RootlessMonitor:
        if self._monitor is None:
            raise RootlessUnavailableError("the rootless container needs its monitor first")
        return self._monitor

    def runtime_cli(self, run: RunDir) -> RuntimeCLI:
        """The runtime entered into the monitor's user namespace (root there, nothing on
        the host), its state in the run directory; crun without cgroups."""
        monitor = self._require_monitor()
        root = os.path.join(run.path, "runtime")
        os.makedirs(root, 0o700, exist_ok=True)
        binary = find_runtime(self._runtime)
        flags = ("--cgroup-manager=disabled",) if "crun" in os.path.basename(binary) else ()
        prefix = (
            "nsenter",
            f"--user={monitor.user_ns_path}",
            "--preserve-credentials",
            *runtime_prefix(binary, rootless=True),  # crun on a hybrid cgroup host
        )
        return RuntimeCLI(binary, root, prefix, flags)

    @contextlib.contextmanager
    def container(
        self, run: RunDir, image: SampleImage, spec: Spec, stdio: StdioPaths
    ) -> Iterator[RuncTask]:
        """As the runc runner's, from the spec without what the namespace cannot have."""
        with super().container(run, image, rootless_spec(spec, self.mapping), stdio) as task:
            yield task
