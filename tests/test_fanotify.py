"""The fanotify monitor records exactly the files another process touches on one mount.

The profile drives which files are prefetched, so it must be exact (first access wins,
no duplicates) and must never name a host file outside the rootfs, whatever symlinks a
hostile image ships. Tests that need a real mount and fanotify run only as root.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from estargz_opt.errors import EstargzOptError
from estargz_opt.workload import fanotify
from estargz_opt.workload.fanotify import (
    FanotifyError,
    FanotifyMonitor,
    FanotifyPermissionError,
    FanotifyUnavailableError,
    paths_under,
)

_ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and fanotify need root")


def needs_root(test: Callable[..., None]) -> Callable[..., None]:
    """In the root layer, and skipped elsewhere (a developer's non-root run)."""
    return pytest.mark.root(_ROOT_ONLY(test))


@pytest.fixture
def mnt(tmp_path: Path):
    """A fresh tmpfs mount on a temp dir, always unmounted afterwards."""
    if shutil.which("mount") is None:
        pytest.skip("mount(8) is not installed")
    target = tmp_path / "mnt"
    target.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        try:
            FanotifyMonitor(target).close()
        except FanotifyUnavailableError as exc:
            pytest.skip(str(exc))
        yield target
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], check=True)


def _read_in_child(*paths: Path) -> None:
    """Read files from another process, as the sample container would."""
    code = "import sys\nfor p in sys.argv[1:]:\n    open(p, 'rb').read()\n"
    subprocess.run([sys.executable, "-c", code, *map(str, paths)], check=True)


def _write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.unit
def test_paths_under_keeps_only_paths_inside_root() -> None:
    got = paths_under(
        [
            "/r/usr/bin/app",
            "/r/etc/os-release",
            "/r/usr/bin/app",  # a second access: first one wins
            "/etc/shadow",  # a symlink target outside the rootfs
            "/r/../etc/shadow",
            "/rootfs-sibling/x",  # shares the prefix string, not the directory
            "/r",
            "anon_inode:[eventfd]",
            "pipe:[1234]",
            "/r/lib/x.so",
        ],
        "/r/",
    )
    assert got == ["usr/bin/app", "etc/os-release", "lib/x.so"]
    assert paths_under(["/a/b", "/c"], "/") == ["a/b", "c"]


@needs_root
def test_records_files_read_by_another_process_in_first_access_order(mnt: Path) -> None:
    a = _write(mnt / "a")
    c = _write(mnt / "b" / "c")
    d = _write(mnt / "d")
    _write(mnt / "never-read")
    with FanotifyMonitor(mnt) as mon:
        _read_in_child(d, a, d, c, a)
        raw = mon.drain(timeout=2.0)
        assert mon.paths_under() == ["d", "a", "b/c"]
        assert mon.overflows == 0
    assert paths_under(raw, str(mnt)) == ["d", "a", "b/c"]
    assert mon.fileno() == -1


@needs_root
def test_symlinks_out_of_the_rootfs_are_dropped(mnt: Path) -> None:
    # The marked mount is larger than the rootfs, as when the host / is marked: a
    # link's target on the same mount is reported, under its real path.
    rootfs = mnt / "rootfs"
    secret = _write(mnt / "secret")
    ok = _write(rootfs / "usr" / "ok")
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "shadow").symlink_to(secret)  # absolute link
    (rootfs / "dotdot").symlink_to("../secret")  # relative link climbing out
    (rootfs / "host").symlink_to("/etc/passwd")  # another mount: no event at all
    (rootfs / "inside").symlink_to("usr/ok")
    with FanotifyMonitor(mnt) as mon:
        _read_in_child(rootfs / "etc" / "shadow", rootfs / "dotdot", rootfs / "host")
        _read_in_child(rootfs / "inside", ok)
        raw = mon.drain(timeout=2.0)
        assert str(secret) in raw  # the event did happen, resolved to the target
        assert mon.paths_under(rootfs) == ["usr/ok"]


@needs_root
def test_without_cap_sys_admin_the_error_names_the_daemonless_path(mnt: Path) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv(1) is not installed")
    code = (
        "import sys\n"
        "from estargz_opt.workload.fanotify import FanotifyMonitor, FanotifyPermissionError\n"
        "try:\n"
        "    FanotifyMonitor(sys.argv[1])\n"
        "except FanotifyPermissionError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    drop = [setpriv, "--inh-caps=-all", "--bounding-set=-sys_admin"]
    res = subprocess.run(
        [*drop, sys.executable, "-c", code, str(mnt)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert res.returncode == 3, res.stderr
    msg = res.stdout
    assert "CAP_SYS_ADMIN" in msg and "root" in msg
    assert "--record-in" in msg and "--prefetch-list" in msg


class _FakeLibc:
    def __init__(self, init_errno: int = 0, mark_errno: int = 0) -> None:
        self.init_errno, self.mark_errno = init_errno, mark_errno

    def fanotify_init(self, flags: int, event_flags: int) -> int:
        if self.init_errno:
            ctypes.set_errno(self.init_errno)
            return -1
        return os.open(os.devnull, os.O_RDONLY)

    def fanotify_mark(self, *args: object) -> int:
        ctypes.set_errno(self.mark_errno)
        return -1


@pytest.mark.unit
@pytest.mark.parametrize(
    ("fake", "kind", "words"),
    [
        (_FakeLibc(init_errno=errno.ENOSYS), FanotifyUnavailableError, "unavailable"),
        (_FakeLibc(init_errno=errno.EINVAL), FanotifyUnavailableError, "unavailable"),
        (_FakeLibc(init_errno=errno.EPERM), FanotifyPermissionError, "CAP_SYS_ADMIN"),
        (_FakeLibc(mark_errno=errno.EPERM), FanotifyPermissionError, "CAP_SYS_ADMIN"),
        (_FakeLibc(mark_errno=errno.ENOENT), FanotifyError, "/nowhere"),
    ],
)
def test_setup_errors_are_clear(
    monkeypatch: pytest.MonkeyPatch, fake: _FakeLibc, kind: type, words: str
) -> None:
    monkeypatch.setattr(fanotify, "_libc", lambda: fake)
    with pytest.raises(kind) as info:
        FanotifyMonitor("/nowhere")
    assert isinstance(info.value, EstargzOptError)
    assert words in str(info.value)
    if kind is not FanotifyError:
        assert "--record-in" in str(info.value) and "--prefetch-list" in str(info.value)


def _bare_monitor() -> FanotifyMonitor:
    mon = FanotifyMonitor.__new__(FanotifyMonitor)
    mon.mount_path, mon.overflows, mon._seen, mon._fd = "/", 0, {}, -1
    return mon


@pytest.mark.unit
def test_queue_overflow_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    meta = fanotify._METADATA
    buf = meta.pack(meta.size, 3, 0, meta.size, fanotify.FAN_Q_OVERFLOW, -1, 0) * 2
    mon = _bare_monitor()
    with caplog.at_level(logging.WARNING, logger="estargz_opt"):
        assert list(mon._parse(buf)) == []
    assert mon.overflows == 2
    assert "overflow" in caplog.text


@pytest.mark.unit
def test_unknown_metadata_version_is_refused() -> None:
    meta = fanotify._METADATA
    buf = meta.pack(meta.size, 4, 0, meta.size, fanotify.FAN_OPEN, -1, 0)
    with pytest.raises(FanotifyError, match="version 4"):
        list(_bare_monitor()._parse(buf))
