"""`-t -i`: the workload gets a terminal, and what is typed on ours reaches it.

estargz-opt runs on a pseudo-terminal here, as it would in an interactive shell. The
workload prints its tty's name, reads one line and echoes it, then prints the
--wait-on-line text; the record holds the files it opened.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest
from support.cli import cli_argv, cli_env
from support.imagefactory import archive_for_ctr, write_busybox_image
from support.tarfactory import build_tar, dir_, reg

SCRIPT = b"#!/bin/sh\ntty\nread x\necho got:$x\necho READY\nsleep 30\n"


@pytest.fixture(scope="module")
def image(containerd, busybox_layer: Path, tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("tty")
    app = build_tar([dir_("app/"), reg("app/run.sh", SCRIPT, mode=0o755)])
    write_busybox_image(base / "layout", "v1", busybox_layer, extra_layers=[app],
                        cmd=["/bin/sh", "/app/run.sh"])
    archive_for_ctr(base / "layout", "v1", "localhost/tty:1", base / "img.tar")
    containerd.ctr("images", "import", "--no-unpack", str(base / "img.tar"))
    return "localhost/tty:1"


def test_terminal_and_stdin_reach_the_workload(containerd, image: str, tmp_path: Path) -> None:
    record = tmp_path / "rec.jsonl"
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*cli_argv(), "-a", containerd.address, "optimize", "--oci",
         "-t", "-i", "--period", "20", "--wait-on-line", "READY", "--record-out", str(record),
         image, "localhost/tty:out"],
        stdin=slave, stdout=subprocess.PIPE, stderr=slave, env=cli_env(),
    )
    os.close(slave)
    seen = b""
    typed = False
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
            if not typed and b"/dev/pts/" in seen:
                os.write(master, b"hello-tty\r")
                typed = True
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        os.close(master)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "/dev/pts/" in text, text  # the workload's stdin is a terminal
    assert "got:hello-tty" in text, text
    assert "--wait-on-line text was printed" in text, text
    assert out.strip().startswith("sha256:")
    paths = {json.loads(line)["path"] for line in record.read_text().splitlines()}
    assert {"bin/busybox", "app/run.sh"} <= paths
