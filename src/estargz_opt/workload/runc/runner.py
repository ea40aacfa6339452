"""The runc runner: the sample container without containerd, through the runtime's CLI.

For an image in any `Store` (an OCI layout, an archive, a registry): the host
platform's layers are unpacked into one tree in the run directory (`workload.unpack`),
which the monitor binds as the rootfs in its namespace; the spec comes from the same
steps as the containerd runner's; and the container is made with `runc create` (or
crun, or any runtime with runc's CLI: `--runtime`) from a bundle in the run
directory, joined to the monitor's mount namespace, then `start`ed, `kill`ed and
`delete`d through the same CLI.

What containerd's shim does for the containerd runner, this runner does itself: it
connects the workload's stdio to the FIFOs (or, with -t, relays the terminal the
runtime hands over on its console socket: `console`), and it waits for the container's
init process as its parent (`subreaper`). The runtime's command line is `runtime`.

The runtime's state lives under a private root (`STATE_ROOT`), and every container
carries its owner process in an annotation, so that after a SIGKILL the next run kills
and deletes the dead run's containers (never a live run's); the rest of a run is in
its run directory, which the sampler reaps, or in the monitor's namespace, which dies
with the container. No host mount is ever made.

Imports no grpc and no containerd client: it runs on hosts without containerd.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from estargz_opt.descriptor import Descriptor
from estargz_opt.errors import RunnerError, SampleError, WorkloadStartError
from estargz_opt.mount import Mount
from estargz_opt.stores import Store
from estargz_opt.stores.owner import is_dead, this_process
from estargz_opt.workload.cgroups import remove_cgroup, runtime_prefix
from estargz_opt.workload.monitor import Monitor
from estargz_opt.workload.options import DEFAULT_RUNTIME
from estargz_opt.workload.runc.console import Console, relay, stdio_fds
from estargz_opt.workload.runc.layers import UnpackedLayers
from estargz_opt.workload.runc.runtime import COMMAND_TIMEOUT, RuntimeCLI, runtime_error
from estargz_opt.workload.runc.subreaper import become_subreaper, wait_orphan
from estargz_opt.workload.runner import (
    KILL_WAIT,
    SAMPLE_PREFIX,
    FileMonitor,
    RunDir,
    SampleImage,
    StdioPaths,
    find_runtime,
    quietly,
)
from estargz_opt.workload.spec import Spec
from estargz_opt.workload.unpack import UnpackOptions, image_layers, unpack_layers

log = logging.getLogger("estargz_opt")

#: The runtime's --root for sample containers: private to estargz-opt, shared by its runs.
STATE_ROOT = "/run/estargz-opt/runc"
#: Annotation naming the owner process of a sample container (host/pid/start time).
OWNER_ANNOTATION = "estargz-opt.owner"
#: The cgroups path of a sample container is /<this>/<run id>.
CGROUP_PARENT = "estargz-opt"
#: overlayfs takes its options in one page; leave room for upperdir and workdir
_MAX_LOWERDIR = 3000


class RuncRunner:
    """Runs the sample container with runc (or `--runtime`) directly (a `Runner`)."""

    namespace = CGROUP_PARENT

    def __init__(
        self,
        store: Store,
        runtime: str = DEFAULT_RUNTIME,
        *,
        state_root: str = STATE_ROOT,
        layer_cache: Path | None = None,
        unpack_options: UnpackOptions | None = None,
    ) -> None:
        self._store = store
        self._runtime = runtime
        self._state_root = state_root
        #: where unpacked layers are kept between runs (None: unpack every run, flat)
        self._layer_cache = layer_cache
        self._unpack = unpack_options or UnpackOptions()
        self._runtime_cli: RuntimeCLI | None = None

    def check(self) -> None:
        """Fail early, in one line: this runner needs root and the runtime."""
        find_runtime(self._runtime)
        if os.geteuid() != 0:
            raise SampleError(
                "the runc runner needs root (it mounts the image's root filesystem and "
                "watches it with fanotify); run as root, or convert without running the "
                "workload: --record-in FILE, --prefetch-list FILE or --no-optimize"
            )

    def _cli(self) -> RuntimeCLI:
        """The runtime on the private state root, run as this host's cgroups need
        (`cgroups.runtime_prefix`: crun on a hybrid host), worked out once."""
        if self._runtime_cli is None:
            binary = find_runtime(self._runtime)
            self._runtime_cli = RuntimeCLI(binary, self._state_root, runtime_prefix(binary))
        return self._runtime_cli

    def runtime_cli(self, run: RunDir) -> RuntimeCLI:
        """How the runtime is run for the container of `run` (a subclass may run it
        elsewhere, e.g. in a user namespace)."""
        return self._cli()

    def new_task(self, cli: RuntimeCLI, cid: str) -> RuncTask:
        """The handle on the container `cid` (a subclass may signal it another way)."""
        return RuncTask(cli, cid)

    def reap_stale(self) -> None:
        """Kill and delete the sample containers of dead runs (by their owner annotation;
        a live run's are left alone)."""
        cli = self._cli()
        for c in cli.containers():
            cid = str(c.get("id", ""))
            if not cid.startswith(SAMPLE_PREFIX):
                continue
            annotations = c.get("annotations")
            if not isinstance(annotations, dict):
                state = cli.state(cid) or {}
                annotations = state.get("annotations")
            owner = annotations.get(OWNER_ANNOTATION, "") if isinstance(annotations, dict) else ""
            if not owner or not is_dead(str(owner)):
                continue
            log.warning("removing sample container %s, left by a run that was killed", cid)
            cli.remove(cid)

    def layer_chunks(self, layer: Descriptor) -> Iterable[bytes]:
        return self._store.stream(layer, f"layer {layer.digest}")

    @contextlib.contextmanager
    def rootfs(self, run: RunDir, image: SampleImage) -> Iterator[list[Mount]]:
        """The image's layers stacked with overlayfs (`layers.UnpackedLayers`, kept
        between runs like containerd's snapshots) under an upper directory in the run
        directory; or, where overlayfs cannot take them (lowerdir too long for one
        mount), all unpacked into `<run>/tree`. The monitor mounts either in its own
        namespace only; what the run wrote goes with the run directory."""
        layers = image_layers(image.layers, image.diff_ids, self.layer_chunks)
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            dirs: list[str] = []
            cache = UnpackedLayers(self._layer_cache) if self._layer_cache else None
            if cache is not None and _fits_overlay(cache.paths(layers)):
                try:
                    dirs = stack.enter_context(cache.hold(layers, self._unpack))
                except OSError as exc:  # e.g. a read-only cache: unpack for this run only
                    log.warning(
                        "cannot keep unpacked layers in %s (%s): unpacking for this run only",
                        cache.dir,
                        exc.strerror or exc,
                    )
                    layers = image_layers(image.layers, image.diff_ids, self.layer_chunks)
            if dirs:
                upper, work = os.path.join(run.path, "upper"), os.path.join(run.path, "work")
                os.mkdir(upper, 0o755)
                os.mkdir(work, 0o700)
                lower = ":".join(reversed(dirs))
                options = [f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}"]
                mounts = [Mount("overlay", "overlay", options=options)]
            else:
                tree = os.path.join(run.path, "tree")
                os.mkdir(tree, 0o755)
                stats = unpack_layers(tree, layers, self._unpack)
                log.debug(
                    "unpacked %d entries (%d MB) into %s",
                    stats.entries,
                    stats.plain_bytes >> 20,
                    tree,
                )
                mounts = [Mount("bind", tree, options=["rbind"])]
            log.debug("rootfs of %d layers ready in %.1fs", len(layers), time.monotonic() - started)
            yield mounts

    def monitor(
        self, run: RunDir, image: SampleImage, mounts: list[Mount], log_path: str
    ) -> AbstractContextManager[FileMonitor]:
        """The privileged monitor, which binds the tree in its namespace."""
        return Monitor(mounts, run.rootfs, log_path)

    @contextlib.contextmanager
    def container(
        self, run: RunDir, image: SampleImage, spec: Spec, stdio: StdioPaths
    ) -> Iterator[RuncTask]:
        """The container `run.id`, created (its init waits for `start`)."""
        cli = self.runtime_cli(run)
        os.makedirs(cli.root, 0o700, exist_ok=True)
        bundle = os.path.join(run.path, "bundle")
        os.mkdir(bundle, 0o700)
        spec = {
            **spec,
            "annotations": {**spec.get("annotations", {}), OWNER_ANNOTATION: this_process()},
        }
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(spec, f)
        become_subreaper()
        with contextlib.ExitStack() as stack:
            # last: what a failed create left (the task's cleanup deletes the rest)
            stack.callback(remove_cgroup, str(spec.get("linux", {}).get("cgroupsPath", "")))
            task = stack.enter_context(self.new_task(cli, run.id))
            stack.callback(task.cleanup)
            console = stack.enter_context(Console(run.path)) if stdio.terminal else None
            fds = stack.enter_context(stdio_fds(stdio))
            args = ["create", "--bundle", bundle, "--pid-file", os.path.join(run.path, "pid")]
            if console is not None:
                args += ["--console-socket", console.address]
            log_path = os.path.join(run.path, "runtime.log")
            try:
                res = subprocess.run(
                    cli.argv("--log", log_path, "--log-format", "json", *args, run.id),
                    stdin=fds[0],
                    stdout=fds[1],
                    stderr=fds[2],
                    pass_fds=console.pass_fds if console else (),
                    timeout=COMMAND_TIMEOUT,
                    check=False,
                    process_group=0,  # as `run`: out of reach of a terminal's Ctrl-C
                )
            except subprocess.TimeoutExpired:
                raise WorkloadStartError(
                    f"{cli.binary} create did not finish in {COMMAND_TIMEOUT:g}s"
                ) from None
            if res.returncode != 0:
                raise WorkloadStartError(runtime_error(log_path, cli.binary, res.returncode))
            fds.close()  # the workload holds its ends now
            with open(os.path.join(run.path, "pid")) as f:
                task.created(int(f.read().strip()))
            if console is not None:
                task.attach_console(console.receive(), stdio)
            yield task


class RuncTask:
    """The sample container's init process, driven through the runtime's CLI (a `Task`)."""

    def __init__(self, cli: RuntimeCLI, cid: str) -> None:
        self._cli = cli
        self._id = cid
        self._pid = 0
        self._exited = threading.Event()
        self._status: int | None = None
        self._master = -1
        self._relays: list[threading.Thread] = []
        self._gone = False

    def __enter__(self) -> RuncTask:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._master >= 0:
            os.close(self._master)
            self._master = -1

    def created(self, pid: int) -> None:
        """The init process exists (as our child, we being a subreaper): wait for it."""
        self._pid = pid
        threading.Thread(target=self._reap, name="sample-reap", daemon=True).start()

    def _reap(self) -> None:
        self._status = wait_orphan(self._pid)
        self._exited.set()

    def attach_console(self, master: int, stdio: StdioPaths) -> None:
        """-t: relay the terminal to the stdout FIFO and the stdin FIFO to it."""
        self._master = master
        out = os.open(stdio.stdout, os.O_WRONLY | os.O_CLOEXEC)
        self._relays.append(relay(master, out, "sample-tty-out", close_dst=True))
        if stdio.stdin:
            src = os.open(stdio.stdin, os.O_RDONLY | os.O_CLOEXEC)
            self._relays.append(
                relay(src, os.dup(master), "sample-tty-in", close_src=True, close_dst=True)
            )

    def start(self) -> None:
        res = self._cli.run("start", self._id)
        if res.returncode != 0:
            raise WorkloadStartError(f"{self._cli.binary} start: {res.stderr.strip()}")

    def wait(self, timeout: float | None = None) -> int | None:
        if not self._exited.wait(timeout):
            raise RunnerError(f"the sample container did not exit within {timeout:g}s")
        return self._status

    def kill(self, signo: int) -> None:
        if self._exited.is_set():
            return
        res = self._cli.run("kill", "--all", self._id, str(signo))
        if res.returncode != 0 and not self._exited.is_set():
            raise RunnerError(f"{self._cli.binary} kill: {res.stderr.strip()}")

    def delete(self) -> int | None:
        quietly("delete the sample container", self._delete)
        return self._status

    def _delete(self) -> None:
        if self._gone:
            return
        res = self._cli.run("delete", "--force", self._id)
        if res.returncode != 0 and self._cli.state(self._id) is not None:
            raise RunnerError(res.stderr.strip())
        self._gone = True

    def cleanup(self) -> None:
        """Whatever happened: no process, no container, no relay left."""
        if not self._gone:
            if self._pid and not self._exited.is_set():
                with contextlib.suppress(RunnerError, OSError, subprocess.SubprocessError):
                    self.kill(signal.SIGKILL)
                self._exited.wait(KILL_WAIT)
            quietly("delete the sample container", self._delete)
        for t in self._relays:
            t.join(timeout=1)

    def resize(self, cols: int, rows: int) -> None:
        if self._master >= 0:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close_stdin(self) -> None:
        """Nothing to do: the workload's stdin is the FIFO, which reads EOF once the
        sampler closed its end (with -t the relay ends there too)."""


def _fits_overlay(lower: list[str]) -> bool:
    """Whether these lowerdirs go into one overlayfs mount: its options fit in a page,
    and no path holds a separator of overlayfs's options (',' ':' and the escape)."""
    return sum(len(p) + 1 for p in lower) < _MAX_LOWERDIR and not any(
        c in p for p in lower for c in ",:\\"
    )
