"""The rootless runner's parts, run for real as an unprivileged uid with no capabilities.

The monitor helper in its own user and mount namespace: the image unpacked onto its
tmpfs, fanotify in FID mode reporting what a process in the namespace reads, mapped back
to paths; an owner the namespace cannot map left as the caller's; an image larger than the tmpfs
refused in one line. The host checks, each made true: user namespaces turned off with
the real sysctl inside a test user namespace, and (for what this host has no knob for)
the same files in a given /proc/sys, and a given kernel release. The namespace helpers
that stop and clean up: every process of a PID namespace signalled, zombies left out.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import analyzeimages as ai, imagefactory as f
from support.unprivileged import Unprivileged, make_unprivileged

from estargz_opt.workload.rootless import checks, userns

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def user() -> Iterator[Unprivileged]:
    made = make_unprivileged()
    yield made
    made.remove()


DRIVER = textwrap.dedent("""
    import json, os, subprocess, sys
    from estargz_opt.workload.rootless.checks import IdMapping
    from estargz_opt.workload.rootless.monitor import RootlessMonitor, RootlessSetup
    args = json.loads(sys.argv[1])
    run = args["run"]
    os.mkdir(run + "/rootfs")
    layers = [open(p, "rb").read() for p in args["layers"]]
    setup = RootlessSetup(run + "/rootfs", args["limit"], IdMapping(os.getuid(), os.getgid()),
                          args["layers"], args["diff_ids"])
    try:
        m = RootlessMonitor(setup, [[x] for x in layers], run + "/monitor.log")
    except Exception as exc:
        print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
        sys.exit(0)
    with m:
        m.begin()
        enter = ["nsenter", "--user=" + m.user_ns_path, "--mount=" + m.ns_path,
                 "--preserve-credentials"]
        for path in args["read"]:
            subprocess.run([*enter, "cat", run + "/rootfs/" + path], check=True,
                           stdout=subprocess.DEVNULL)
        subprocess.run([*enter, "sh", "-c", "echo new > %s/rootfs/made && cat %s/rootfs/made"
                        % (run, run)], check=True, stdout=subprocess.DEVNULL)
        paths = m.stop()
        print(json.dumps({"paths": paths, "bytes": m.unpacked}))
""")


def drive(user: Unprivileged, tmp: Path, layers: list[bytes], read: list[str],
          limit: int = 256 << 20) -> dict:
    files = []
    for i, data in enumerate(layers):
        p = tmp / f"layer{i}.tar"
        p.write_bytes(data)
        files.append(str(p))
    run = tmp / "run"
    run.mkdir()
    user.give(tmp)
    args = {"run": str(run), "layers": files, "limit": limit, "read": read,
            "diff_ids": ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]}
    res = subprocess.run([*user.argv()[:-2], "-c", DRIVER, json.dumps(args)],
                         capture_output=True, text=True, env=user.env(), timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


@pytest.fixture
def scratch(user: Unprivileged) -> Path:
    d = user.home / f"scratch-{len(list(user.home.iterdir()))}"
    d.mkdir()
    return d


def test_fid_monitor_reports_reads_by_path(user: Unprivileged, scratch: Path) -> None:
    lower = ai.layer([ai.file("a/b.txt", "bee\n"), ai.file("a/c.txt", "sea\n"),
                      ai.file("etc/gone", "x\n"), ai.file("d/old", "old\n")])
    upper = ai.layer([ai.whiteout("etc/gone"), ai.file("d/old", "new\n"),
                      ai.symlink("a/link", "c.txt"), ai.file("unread", "u\n")])
    out = drive(user, scratch, [lower, upper], ["a/b.txt", "d/old", "a/link", "a/b.txt"])
    # in first-access order; the symlink's target is the file read; the file the
    # process made is in no layer and is not reported
    assert "paths" in out, out
    assert list(dict.fromkeys(out["paths"])) == ["/a/b.txt", "/d/old", "/a/c.txt"]
    assert out["bytes"] > 0


def test_owner_outside_the_namespace_becomes_the_callers(user: Unprivileged,
                                                         scratch: Path) -> None:
    # uid 1000 cannot be mapped with only the caller's id: the file is the caller's
    # (podman's ignore_chown_errors), and its reads are seen as any other's
    layer = ai.layer([ai.file("srv/data", "d\n", mode=0o600, owner=1000)])
    out = drive(user, scratch, [layer], ["srv/data"])
    assert set(out.get("paths", ())) == {"/srv/data"}, out  # open and read: repeats


def test_image_larger_than_the_tmpfs_is_refused(user: Unprivileged, scratch: Path) -> None:
    import os
    big = ai.layer([ai.file("blob", os.urandom(3 << 20))])
    out = drive(user, scratch, [big], [], limit=1 << 20)
    assert out["type"] == "ImageTooBigError", out
    assert "does not fit in memory" in out["error"] and "MemAvailable" in out["error"], out
    assert "\n" not in out["error"]


# ------------------------------------------------------------ host checks, made true


def test_old_kernel_is_refused() -> None:
    with pytest.raises(checks.RootlessUnavailableError) as err:
        checks.check_kernel("6.15.9-generic")
    msg = str(err.value)
    assert "Linux 6.15.9-generic is older than 6.16" in msg and "--prefetch-list" in msg
    checks.check_kernel("6.16.0")
    checks.check_kernel(__import__("os").uname().release)  # this host's passes


@pytest.mark.parametrize(("name", "words"), [
    ("kernel/unprivileged_userns_clone", "kernel.unprivileged_userns_clone=0"),
    ("user/max_user_namespaces", "user.max_user_namespaces=0"),
    ("kernel/apparmor_restrict_unprivileged_userns",
     "kernel.apparmor_restrict_unprivileged_userns=1"),
])
def test_userns_sysctls_are_named(tmp_path: Path, name: str, words: str) -> None:
    f = tmp_path / name
    f.parent.mkdir(parents=True)
    f.write_text("1\n" if "apparmor" in name else "0\n")
    with pytest.raises(checks.RootlessUnavailableError) as err:
        checks.check_userns(str(tmp_path))
    assert words in str(err.value) and "run as root" in str(err.value)


def test_max_user_namespaces_zero_for_real(user: Unprivileged, tmp_path: Path) -> None:
    """Inside a user namespace whose user.max_user_namespaces is 0, the CLI refuses at
    once, naming the sysctl (the sysctl is per user namespace: the host keeps its own)."""
    layout = user.home / "tiny"
    f.write_layout(layout, "v1", [ai.layer([ai.file("x", "x\n")])], ai.config(["/x"]))
    script = (f"echo 0 > /proc/sys/user/max_user_namespaces && exec {user.python} -m "
              f"estargz_opt analyze --rootless --record-out {tmp_path}/r.jsonl oci:{layout}:v1")
    res = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("estargz-opt: error: cannot run the workload rootless: user "
                               "namespaces are disabled (user.max_user_namespaces=0)"), lines
    assert "--record-in" in lines[0]


def test_namespace_members_leave_out_zombies() -> None:
    """A zombie (exited, not yet waited for: the monitor helper between its kill and our
    wait) is no member to kill: the cleanup would wait for it until its timeout."""
    ns = userns.ns_id("/proc/self/ns/user")
    child = subprocess.Popen(["sleep", "0.2"])
    assert child.pid in userns.members(ns)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert child.pid not in userns.members(ns)
    child.wait()


def test_signal_pid_namespace_reaches_every_process() -> None:
    """Every process of a PID namespace gets the signal, its init and the others (what
    `runc kill --all` does through a cgroup, which a rootless container lacks)."""
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sh", "-c",
                             "sleep 1000 & sleep 1000 & echo up; wait"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        [init] = map(int, Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
                     .split())
        ns = userns.ns_id(f"/proc/{init}/ns/pid")
        inside = userns.members(ns, "pid")
        assert init in inside and len(inside) == 3, inside
        assert userns.signal_pid_namespace(init, signal.SIGKILL) == 3
        proc.wait(timeout=10)  # init may exit itself once its children are gone
        assert userns.members(ns, "pid") == []
    finally:
        proc.kill()
        proc.wait()
