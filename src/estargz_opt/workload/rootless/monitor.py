"""The rootless file-access monitor: a helper in its own user and mount namespace that
holds the rootfs on a tmpfs and watches it with fanotify in FID mode.

Nothing privileged runs on the host (newuidmap/newgidmap aside, for an image that needs
several ids); the order is what the kernel needs:
1. The helper unshares a user namespace and says `unshared`. The parent, which owns it,
   writes its id maps: its own uid/gid as 0 (and, with newuidmap/newgidmap and an
   /etc/subuid range, 1..N as that range), then says `mapped`.
2. The helper, now root in that namespace only, unshares a mount namespace, mounts a
   tmpfs on the target (sized to what memory holds; shrunk to the unpacked image plus
   room for the workload's writes afterwards), and unpacks the layers into it as the
   parent streams them through a pipe. A full tmpfs is the one-line memory refusal.
3. It walks the tree once for the handle → path map, creates the FID fanotify group and
   says `ready`. The container (rootless runc, in the same user namespace) joins the
   mount namespace, as with the privileged monitor; from here on it is `monitor.serve`.

When the helper dies, the namespace (and with it the tmpfs and every mount) goes as soon
as the last process in it has gone; the runner kills the container's processes first.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import signal
import struct
import subprocess
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any, ClassVar

from estargz_opt.errors import (
    EstargzOptError,
    ImageTooBigError,
    NeedsIdsError,
    RootlessUnavailableError,
    UnmappedOwnerError,
    UnpackError,
)
from estargz_opt.mount import Mount
from estargz_opt.workload import monitor as base
from estargz_opt.workload.fanotify_fid import FidMonitor, HandleMap
from estargz_opt.workload.mounts import make_rslave, mount_all, remount
from estargz_opt.workload.rootless.checks import (
    IdMapping,
    memory_refusal,
    refuse,
    several_ids_refusal,
)
from estargz_opt.workload.unpack import Layer, UnpackOptions, unpack_layers

log = logging.getLogger("estargz_opt")

CLONE_NEWUSER = 0x10000000
#: Room left on the tmpfs for what the workload writes, beyond the unpacked image.
WRITE_ROOM = 64 << 20
#: How long unpacking may take before the parent gives up waiting for `ready`.
UNPACK_TIMEOUT = 1800.0
_FRAME = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class RootlessSetup:
    """What the helper is told on its command line."""

    target: str
    #: the tmpfs size while unpacking: what memory holds
    limit: int
    mapping: IdMapping
    #: the layers' digests (for messages) and diff IDs, bottom first
    layer_names: list[str]
    diff_ids: list[str]


class RootlessMonitor(base.Monitor):
    """The parent's handle on the rootless helper (see the module docstring)."""

    errors: ClassVar[dict[str, type[EstargzOptError]]] = {
        **base.Monitor.errors,
        "userns": RootlessUnavailableError,
        "memory": ImageTooBigError,
        "ids": NeedsIdsError,
    }

    def __init__(
        self,
        setup: RootlessSetup,
        layers: Sequence[Iterable[bytes]],
        log_path: str,
    ) -> None:
        read_end, write_end = os.pipe()
        self.mapping = setup.mapping
        try:
            self._launch(
                "estargz_opt.workload.rootless.monitor",
                json.dumps(asdict(setup)),
                setup.target,
                log_path,
                pass_fds=(read_end,),
            )
        finally:
            os.close(read_end)
        self._feeder = threading.Thread(
            target=_feed, args=(write_end, layers), name="rootless-layers", daemon=True
        )
        try:
            self._expect("unshared")
            write_id_maps(self.pid, setup.mapping)
            self._send(f"mapped {read_end}")
            self._feeder.start()
            try:
                reply = self._expect("ready", timeout=UNPACK_TIMEOUT)
            except NeedsIdsError as exc:
                # the ways to more ids are the host's to tell, not the namespace's
                raise several_ids_refusal(setup.mapping, str(exc)) from None
            self.unpacked = int(reply.get("bytes", 0))
        except BaseException:
            if self._feeder.ident is None:  # never started: the write end is still ours
                os.close(write_end)
            self.close()
            raise

    @property
    def user_ns_path(self) -> str:
        """The user namespace the runtime must enter to create the container."""
        return f"/proc/{self.pid}/ns/user"

    def close(self) -> None:
        super().close()
        if self._feeder.is_alive():
            self._feeder.join(timeout=5)


def _feed(fd: int, layers: Sequence[Iterable[bytes]]) -> None:
    """Stream each layer blob to the helper: length-prefixed chunks, 0 ends a layer."""
    try:
        with os.fdopen(fd, "wb") as pipe:
            for layer in layers:
                for chunk in layer:
                    if chunk:
                        pipe.write(_FRAME.pack(len(chunk)))
                        pipe.write(chunk)
                pipe.write(_FRAME.pack(0))
    except (BrokenPipeError, OSError) as exc:
        log.debug("streaming layers to the rootless monitor: %s", exc)
    except EstargzOptError as exc:  # the store failed; the helper reports the cut stream
        log.error("reading a layer for the rootless run: %s", exc)


def write_id_maps(pid: int, mapping: IdMapping) -> None:
    """Map the helper's user namespace: ourselves as 0, plus the subordinate range."""
    if mapping.sub_uids is None or mapping.sub_gids is None:
        # An unprivileged writer may map only itself, and only after denying setgroups.
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(f"0 {mapping.uid} 1\n")
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(f"0 {mapping.gid} 1\n")
        return
    for tool, own, sub in (
        ("newuidmap", mapping.uid, mapping.sub_uids),
        ("newgidmap", mapping.gid, mapping.sub_gids),
    ):
        argv = [tool, str(pid), "0", str(own), "1", "1", str(sub.start), str(sub.count)]
        res = subprocess.run(argv, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise refuse(f"{' '.join(argv)} failed: {res.stderr.strip() or res.returncode}")


# ----------------------------------------------------------------- the helper process


def _layer_chunks(pipe: IO[bytes]) -> Iterator[bytes]:
    while True:
        head = pipe.read(_FRAME.size)
        if len(head) < _FRAME.size:
            raise base._Failure("other", "the layer stream from estargz-opt was cut short")
        (size,) = _FRAME.unpack(head)
        if size == 0:
            return
        data = pipe.read(size)
        if len(data) < size:
            raise base._Failure("other", "the layer stream from estargz-opt was cut short")
        yield data


def _used(target: str) -> int:
    st = os.statvfs(target)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _helper(raw: dict[str, Any], cmd_in: IO[bytes], out: IO[bytes]) -> int:
    mapping = IdMapping.from_json(raw["mapping"])
    target, limit = raw["target"], int(raw["limit"])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(base.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        return 1
    if libc.unshare(CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise base._Failure(
            "userns", str(refuse(f"cannot create a user namespace ({os.strerror(err)})"))
        )
    base.say(out, type="unshared")
    line = cmd_in.readline().decode().split()
    if not line or line[0] != "mapped":
        return 1
    layer_pipe = os.fdopen(int(line[1]), "rb")
    if libc.unshare(base.CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise base._Failure("other", f"cannot create a mount namespace: {os.strerror(err)}")
    make_rslave("/")
    mount_all([Mount("tmpfs", "tmpfs", options=[f"size={limit}", "mode=755"])], target)
    layers = [
        Layer(_layer_chunks(layer_pipe), diff_id, name)
        for name, diff_id in zip(raw["layer_names"], raw["diff_ids"], strict=True)
    ]
    try:
        # With one id, owners the namespace cannot map are left as the caller's (a
        # refused chown is skipped without privileges); with a range, one beyond it is
        # refused rather than given a wrong owner.
        ids = mapping.size if mapping.several else None
        unpack_layers(target, layers, UnpackOptions(privileged=False, ids=ids))
    except UnmappedOwnerError as exc:
        raise base._Failure("ids", f"the image needs several ids ({exc})") from None
    except UnpackError as exc:
        cause = exc.__context__
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:  # the tmpfs is full
            what = f"the unpacked image (more than {_used(target) >> 20} MiB)"
            raise base._Failure("memory", str(memory_refusal(what, limit))) from None
        raise
    used = _used(target)
    # The tmpfs is the image's size (plus room for the workload's writes) from now on.
    remount(target, f"size={min(limit, used + WRITE_ROOM)}")
    handles = HandleMap(target)
    monitor = FidMonitor(target, handles)
    base.say(out, type="ready", pid=os.getpid(), bytes=used, files=len(handles.paths))
    return base.serve(monitor, cmd_in, out)


if __name__ == "__main__":
    import sys

    sys.exit(base.main(_helper))
