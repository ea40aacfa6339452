"""OCI runtimes for `--runtime PATH`: runc behind a script that fails on purpose."""

from __future__ import annotations

import json
from pathlib import Path

#: what Debian's crun 1.8 says on a hybrid host whose cgroup v2 hierarchy has controllers
CRUN_HYBRID = "cgroups in hybrid mode not supported, drop all controllers from cgroupv2"


def refusing_runtime(path: Path, message: str = "") -> Path:
    """A runtime whose `create` exits 1, as runc and crun do when they refuse: with
    `message` as the error entry of the JSON log it was given (`--log`, which both our
    runner and containerd's shim read the cause from), or with no word at all. Every
    other command (state, delete, ...) is runc's."""
    entry = json.dumps({"level": "error", "msg": message}) if message else ""
    path.write_text(
        "#!/bin/sh\n"
        'log=""; prev=""; create=""\n'
        'for a in "$@"; do\n'
        '  if [ "$prev" = "--log" ]; then log="$a"; fi\n'
        '  if [ "$a" = "create" ]; then create=1; fi\n'
        '  prev="$a"\n'
        "done\n"
        'if [ -n "$create" ]; then\n'
        + (f"  [ -n \"$log\" ] && echo '{entry}' >> \"$log\"\n" if entry else "")
        + "  exit 1\n"
        "fi\n"
        'exec runc "$@"\n'
    )
    path.chmod(0o755)
    return path
