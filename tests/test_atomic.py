"""The atomic writer: whole files or nothing, and device nodes are never replaced."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from support.cli import cli_argv

from estargz_opt.atomic import atomic_output


@pytest.mark.unit
def test_replaces_a_regular_file_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out"]
    with atomic_output(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.unit
def test_a_fifo_is_written_in_place(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    with atomic_output(fifo) as f:
        f.write(b"through the pipe")
    reader.join(10)
    assert got == [b"through the pipe"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a character device needs root")
def test_layer_convert_into_a_null_device_keeps_the_device(
    tmp_path: Path, synthetic_layer: Path
) -> None:
    """`layer convert X /dev/null`-style runs must not turn the device into a file."""
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    proc = subprocess.run(
        [*cli_argv(), "layer", "convert", str(synthetic_layer), str(null)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    st = os.stat(null)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(tmp_path)) == ["null"]
