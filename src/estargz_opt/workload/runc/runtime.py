"""An OCI runtime driven through runc's command line (runc, crun, or any runtime with
the same CLI), on a private state root: the commands, their timeout, their errors."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from dataclasses import dataclass

log = logging.getLogger("estargz_opt")

#: How long one runtime command may take (create sets up namespaces and mounts).
COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class RuntimeCLI:
    """One OCI runtime with runc's command line, on one private state root.

    prefix: what runs the runtime (the rootless runner's `nsenter --user=…`); flags: the
    runtime's own global flags after --root."""

    binary: str
    root: str
    prefix: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()

    def argv(self, *args: str) -> list[str]:
        return [*self.prefix, self.binary, "--root", self.root, *self.flags, *args]

    def run(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
            # Not in our process group: a terminal's Ctrl-C must not kill a `delete`
            # that the cleanup after that Ctrl-C runs (it would leave the container).
            process_group=0,
        )

    def containers(self) -> list[dict[str, object]]:
        """`list --format json`: every container under the root ([] when there is none)."""
        if not os.path.isdir(self.root):
            return []
        res = self.run("list", "--format", "json")
        if res.returncode != 0:
            log.debug("cannot list sample containers: %s", res.stderr.strip())
            return []
        try:
            found = json.loads(res.stdout or "[]")
        except ValueError:
            return []
        return [c for c in found or [] if isinstance(c, dict)]

    def state(self, cid: str) -> dict[str, object] | None:
        res = self.run("state", cid)
        if res.returncode != 0:
            return None
        try:
            state = json.loads(res.stdout)
        except ValueError:
            return None
        return state if isinstance(state, dict) else None

    def remove(self, cid: str) -> None:
        """Kill every process of the container and delete it (cleanup; never raises)."""
        for args in (("kill", "--all", cid, "KILL"), ("delete", "--force", cid)):
            try:
                res = self.run(*args)
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("cleanup: %s %s: %s", args[0], cid, exc)
                continue
            if res.returncode != 0 and args[0] == "delete" and self.state(cid) is not None:
                log.warning("cleanup: could not delete %s: %s", cid, res.stderr.strip())


def runtime_error(log_path: str, binary: str, status: int) -> str:
    """The runtime's last error message, from its JSON log (or its exit status)."""
    last = ""
    with contextlib.suppress(OSError), open(log_path, errors="replace") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
                last = str(entry.get("msg", ""))
    return f"{os.path.basename(binary)} create: {last or f'exit status {status}, no message'}"
