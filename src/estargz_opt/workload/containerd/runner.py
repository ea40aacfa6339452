"""The containerd runner: the sample container as ctr-remote's analyzer makes it.

The image is unpacked into snapshots (`unpack`), a snapshot on its top chain ID is the
rootfs, and the container runs through containerd's container and task services (runc
under containerd's shim), joined to the monitor's mount namespace. Everything it makes
is under a lease and labelled with its owner process, so that a run killed with SIGKILL
leaves nothing the next run cannot find and remove.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

from estargz_opt.descriptor import Descriptor
from estargz_opt.errors import RunnerError, SampleError, WorkloadStartError
from estargz_opt.mount import Mount
from estargz_opt.stores.containerd.client import Client
from estargz_opt.stores.containerd.errors import ContainerdError
from estargz_opt.stores.containerd.model import Container
from estargz_opt.stores.containerd.store import ContainerdStore
from estargz_opt.stores.containerd.transport import socket_path
from estargz_opt.stores.owner import OWNER_LABEL, is_dead, this_process
from estargz_opt.workload.cgroups import RUNTIME_WRAPPERS, remove_cgroup, wrapped_runtime
from estargz_opt.workload.containerd.unpack import unpack
from estargz_opt.workload.monitor import Monitor
from estargz_opt.workload.options import DEFAULT_RUNTIME
from estargz_opt.workload.runner import (
    KILL_WAIT,
    RunDir,
    SampleImage,
    StdioPaths,
    find_runtime,
    quietly,
)
from estargz_opt.workload.spec import Spec

log = logging.getLogger("estargz_opt")

#: Label on every container this runner creates, so leftovers of a killed run are findable.
SAMPLE_LABEL = "estargz-opt/sample"

__all__ = ["OWNER_LABEL", "SAMPLE_LABEL", "ContainerdRunner", "ContainerdTask"]


class ContainerdRunner:
    """Runs the sample container in the containerd that holds the image (a `Runner`)."""

    def __init__(self, store: ContainerdStore, runtime: str = DEFAULT_RUNTIME) -> None:
        self._store = store
        # The containerd services the Store interface does not cover (see store.client).
        self._client: Client = store.client
        self.namespace = self._client.namespace
        #: the OCI runtime containerd's runc shim runs (its BinaryName option)
        self._runtime = runtime

    def check(self) -> None:
        """Fail early, in one line, when the runtime containerd's shim calls is missing."""
        find_runtime(self._runtime)

    def _runtime_binary(self) -> str:
        """The shim's BinaryName: "" (the shim's own runc) by default, as before
        --runtime; else the runtime, wrapped as this host's cgroups need (crun on a
        hybrid host: `cgroups.wrapped_runtime`)."""
        if self._runtime == DEFAULT_RUNTIME:
            return ""
        return wrapped_runtime(find_runtime(self._runtime), Path(RUNTIME_WRAPPERS))

    def reap_stale(self) -> None:
        """Remove the sample containers (and their tasks and snapshots) of dead runs.

        Only containers whose owner process was on this host and is gone are touched: a
        concurrent run's container is left alone. Their leases carry the same owner, and
        ContainerdStore deletes dead owners' leases.
        """
        client = self._client
        try:
            stale = client.containers.list(f'labels."{SAMPLE_LABEL}"')
        except ContainerdError as exc:
            log.debug("cannot list sample containers: %s", exc)
            return
        for c in stale:
            if not is_dead(c.labels.get(OWNER_LABEL, "")):
                continue
            log.warning("removing sample container %s, left by a run that was killed", c.id)
            _end_task(client, c.id)
            _stop_orphan_shims(client, c.id)
            quietly("delete container", client.containers.delete, c.id, missing_ok=True)
            quietly("remove snapshot", client.snapshots().remove, c.id, missing_ok=True)

    def layer_chunks(self, layer: Descriptor) -> Iterable[bytes]:
        """Streamed from containerd: no temporary copy while the workload competes for CPU."""
        return self._store.stream(layer, f"layer {layer.digest}")

    @contextlib.contextmanager
    def rootfs(self, run: RunDir, image: SampleImage) -> Iterator[list[Mount]]:
        """The layers as committed snapshots, and an active snapshot named `run.id` on top,
        all under a lease that goes when the run ends."""
        client = self._client
        labels = {SAMPLE_LABEL: run.id, OWNER_LABEL: this_process()}
        with client.leases.hold(labels=labels, sync=True) as lease:
            top = unpack(client, image.layers, image.diff_ids, lease=lease)
            snapshots = client.snapshots()
            mounts = snapshots.prepare(run.id, top, lease=lease)
            try:
                yield mounts
            finally:
                quietly("remove snapshot", snapshots.remove, run.id, missing_ok=True)

    def monitor(
        self, run: RunDir, image: SampleImage, mounts: list[Mount], log_path: str
    ) -> Monitor:
        """The privileged monitor, which mounts the snapshot in its namespace."""
        return Monitor(mounts, run.rootfs, log_path)

    @contextlib.contextmanager
    def container(
        self, run: RunDir, image: SampleImage, spec: Spec, stdio: StdioPaths
    ) -> Iterator[ContainerdTask]:
        """The container `run.id` and its task, created but not started."""
        client = self._client
        client.containers.create(
            Container(
                id=run.id,
                spec=json.dumps(spec).encode(),
                image=image.name,
                labels={SAMPLE_LABEL: "1", OWNER_LABEL: this_process()},
            )
        )
        try:
            try:
                client.tasks.create(
                    run.id,
                    stdin=stdio.stdin,
                    stdout=stdio.stdout,
                    stderr=stdio.stderr,
                    terminal=stdio.terminal,
                    runtime_binary=self._runtime_binary(),
                )
            except ContainerdError as exc:
                if "executable file not found in $PATH" in str(exc) and (
                    f'"{self._runtime}"' in str(exc)
                ):
                    raise SampleError(f"containerd cannot find {self._runtime}: {exc}") from None
                raise WorkloadStartError(str(exc)) from None
            try:
                yield ContainerdTask(client, run.id)
            finally:
                _end_task(client, run.id)
        finally:
            quietly("delete container", client.containers.delete, run.id, missing_ok=True)
            # what a runtime that failed at create left (its delete knows no container)
            remove_cgroup(str(spec.get("linux", {}).get("cgroupsPath", "")))


class ContainerdTask:
    """The sample container's task in containerd (a `Task`)."""

    def __init__(self, client: Client, container_id: str) -> None:
        self._client = client
        self._id = container_id

    def start(self) -> None:
        try:
            self._client.tasks.start(self._id)
        except ContainerdError as exc:
            raise WorkloadStartError(str(exc)) from None

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self._client.tasks.wait(self._id, timeout=timeout).exit_status
        except ContainerdError as exc:
            raise RunnerError(str(exc)) from None

    def kill(self, signo: int) -> None:
        try:
            self._client.tasks.kill(self._id, signo, all=True)
        except ContainerdError as exc:
            raise RunnerError(str(exc)) from None

    def delete(self) -> int | None:
        gone = self._client.tasks.delete(self._id, missing_ok=True)
        return None if gone is None else gone.exit_status

    def resize(self, cols: int, rows: int) -> None:
        with contextlib.suppress(ContainerdError):
            self._client.tasks.resize_pty(self._id, cols, rows)

    def close_stdin(self) -> None:
        with contextlib.suppress(ContainerdError):
            self._client.tasks.close_stdin(self._id)


def _stop_orphan_shims(client: Client, cid: str) -> None:
    """Stop the shim of a sample task that containerd does not know.

    A run killed while containerd creates its task can leave the task's shim (and the
    half-made container in it) running although containerd dropped the task, so no task
    call reaches it. It is found by its command line (namespace, id, our containerd's
    socket) and cleaned up the way containerd cleans up after a shim: `SHIM ... delete`
    in its bundle, which force-deletes the container with runc; then the shim is killed.
    """
    address = socket_path(client.address)
    for pid in _shim_pids(client.namespace, cid, address):
        try:
            exe, bundle = os.readlink(f"/proc/{pid}/exe"), os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        log.warning(
            "stopping shim %d of sample container %s, left by a run that was killed", pid, cid
        )
        argv = [
            exe,
            "-namespace",
            client.namespace,
            "-address",
            address,
            "-id",
            cid,
            "-bundle",
            bundle,
            "delete",
        ]
        try:
            subprocess.run(
                argv,
                cwd=bundle,
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=KILL_WAIT * 6,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("cleanup: could not delete the container of shim %d: %s", pid, exc)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _shim_pids(namespace: str, cid: str, address: str) -> list[int]:
    """Processes of a containerd shim (v2) serving container `cid` for that containerd."""
    want = {"-namespace": namespace, "-id": cid, "-address": address}
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not os.path.basename(argv[0]).startswith("containerd-shim"):
            continue
        flags = {a: b for a, b in itertools.pairwise(argv) if a in want}
        if flags == want:
            found.append(int(entry.name))
    return found


def _end_task(client: Client, cid: str) -> None:
    """Cleanup: a task still there (error paths) is killed and deleted."""
    try:
        state = client.tasks.get(cid)
    except ContainerdError:
        return
    if state.status not in ("stopped", "created"):
        quietly("kill task", client.tasks.kill, cid, signal.SIGKILL, all=True)
        quietly("wait task", client.tasks.wait, cid, timeout=KILL_WAIT)
    quietly("delete task", client.tasks.delete, cid, missing_ok=True)
