"""The runner interface: what one way of running the sample container must provide.

A runner does three things for `sample.run_sample`:
1. prepare the rootfs (`Runner.rootfs`): make the image's root filesystem and describe
   it as mounts, which the file-access monitor mounts inside its own namespace;
2. run under the monitor (`Runner.container`): create the container from the spec that
   `spec.build_spec` made, joined to the monitor's mount namespace, and hand back a
   `Task` to start, wait for, signal and delete;
3. clean up: both are context managers that undo what they made, in reverse order,
   whatever happens (success, error, timeout, Ctrl-C).

Everything else is shared by all runners and lives outside them: the spec steps, the
monitor, the stdio, the end conditions (exit, --wait-on-line, --wait-on-signal,
--period) and the recorder; each runner starts the file-access monitor (`Runner.monitor`:
the privileged `monitor.Monitor`, or the rootless runner's own). The runners are
`containerd.runner.ContainerdRunner`, `runc.runner.RuncRunner` (no containerd) and
`rootless.runner.RootlessRunner` (a RuncRunner inside a user namespace, no privilege);
`analyzer.runner_for` picks one.
It imports only the standard library, `descriptor`, `errors`, `mount` and the spec type.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from estargz_opt.descriptor import Descriptor
from estargz_opt.errors import SampleError
from estargz_opt.mount import Mount
from estargz_opt.workload.spec import Spec

log = logging.getLogger("estargz_opt")

#: Names of sample containers, snapshots and run directories start with this.
SAMPLE_PREFIX = "estargz-opt-sample-"
#: How long a runner waits for the workload to exit after a signal.
KILL_WAIT = 5.0


@dataclass(frozen=True, slots=True)
class SampleImage:
    """What the sample container is made from: the host manifest's parts."""

    name: str
    config: dict[str, Any]
    layers: list[Descriptor]
    diff_ids: list[str]


@dataclass(frozen=True, slots=True)
class RunDir:
    """The private directory of one run: its id names everything the run makes."""

    id: str
    path: str

    @property
    def rootfs(self) -> str:
        """Where the monitor mounts the rootfs (in its own mount namespace only)."""
        return os.path.join(self.path, "rootfs")


@dataclass(frozen=True, slots=True)
class StdioPaths:
    """The FIFOs the workload's stdio is connected to ("" for one it does not get)."""

    stdin: str
    stdout: str
    stderr: str
    terminal: bool


class Task(Protocol):
    """The created, not yet started, workload of one run."""

    def start(self) -> None:
        """Start it; WorkloadStartError if the runtime cannot."""
        ...

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit status once it has exited; RunnerError if it did not within `timeout`."""
        ...

    def kill(self, signo: int) -> None:
        """Send `signo` to every process of the workload; RunnerError if that failed."""
        ...

    def delete(self) -> int | None:
        """Remove the exited task; its exit status if the runtime still knew it."""
        ...

    def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size (-t); a task that is gone is not an error."""
        ...

    def close_stdin(self) -> None:
        """Close the workload's stdin (-i, at the end of ours); a task that is gone is
        not an error."""
        ...


class FileMonitor(Protocol):
    """The file-access monitor whose mount namespace the container joins (`monitor.Monitor`
    for runners that run as root; the rootless runner brings its own)."""

    paths: list[str]
    overflows: int

    @property
    def ns_path(self) -> str: ...

    @property
    def rootfs_view(self) -> str: ...

    def begin(self) -> None: ...

    def stop(self) -> list[str]: ...


class Runner(Protocol):
    """One way of running the sample container (see the module docstring)."""

    #: the cgroups path of the container is /<namespace>/<run id>, as containerd makes it
    namespace: str

    def check(self) -> None:
        """Fail early, in one line, when this runner cannot work on this host."""
        ...

    def reap_stale(self) -> None:
        """Remove what runs killed with SIGKILL left behind (never a live run's objects)."""
        ...

    def layer_chunks(self, layer: Descriptor) -> Iterable[bytes]:
        """A layer blob as a stream: the recorder's layer index reads it during the run."""
        ...

    def rootfs(self, run: RunDir, image: SampleImage) -> AbstractContextManager[list[Mount]]:
        """Make the image's root filesystem; the mounts that put it on `run.rootfs`."""
        ...

    def monitor(
        self, run: RunDir, image: SampleImage, mounts: list[Mount], log_path: str
    ) -> AbstractContextManager[FileMonitor]:
        """Start the file-access monitor that mounts `mounts` on `run.rootfs` in its own
        mount namespace (the privileged `monitor.Monitor`, unless the runner needs another)."""
        ...

    def container(
        self, run: RunDir, image: SampleImage, spec: Spec, stdio: StdioPaths
    ) -> AbstractContextManager[Task]:
        """Create the container of `image` from `spec`, connected to `stdio`;
        WorkloadStartError when the workload cannot start. On exit the task and the
        container are gone."""
        ...


def find_runtime(runtime: str) -> str:
    """The OCI runtime binary `--runtime` names (runc, crun or a path); SampleError, in
    one line with the ways out, when there is none."""
    found = shutil.which(runtime)
    if found is None:
        what = "is not an executable file" if "/" in runtime else "is not installed"
        hint = f" (apt-get install {runtime})" if runtime in ("runc", "crun") else ""
        raise SampleError(
            f"the OCI runtime {runtime} {what}{hint}: it runs the sample container; pick "
            "another with --runtime runc|crun|PATH, or convert without running the "
            "workload: --record-in FILE, --prefetch-list FILE or --no-optimize"
        )
    return found


def quietly(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run one cleanup step; log a failure instead of hiding the error that got us here."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        log.warning("cleanup: could not %s: %s", what, exc)
