"""The runners without containerd (runc, rootless), on `oci:` images the tests build.

Each test is parametrized over `runnerlib.DAEMONLESS`, so every such runner gets the
same checks (the rootless runner adds its row there):

* workload kinds with containerd's binaries masked and no socket anywhere
  (test_optimize_oci's NoDaemon): one that exits at once, one stopped by --period, one
  with a --wait-on-line text; the record holds exactly what the workload read, the
  converted layers put it first, and the optimized image runs (umoci unpack + runc);
* cleanup after success, failure, Ctrl-C, SIGTERM and a workload killed from outside:
  no container, cgroup, process, mount, netns or temporary file left;
* after a `kill -9` of estargz-opt the next run removes what it left, and a live run's
  container is left alone;
* a hostile image: links to /etc/shadow, absolute and relative links, `..` names, a
  host secret whose atime must not change;
* the sampler flags that the runner itself implements: -i, -t -i, --net-host, --mount.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import analyzeimages as ai, imagefactory as f
from support.analyzeimages import (
    BB,
    KIND_OUTPUT,
    KINDS,
    RUN_SH,
    ended_by,
    expected_prioritized,
    pairs,
    read_record,
)
from support.cli import cli_argv, cli_env, error_message, run_cli
from support.nodaemon import NoDaemon
from support.runnerlib import (
    DAEMONLESS,
    MONITOR,
    RunLeftovers,
    layout_prioritized,
    run_layout_image,
    sample_containers,
)

pytestmark = pytest.mark.root

RUNNERS = list(DAEMONLESS)


@pytest.fixture(scope="module")
def busybox_raw(busybox_layer: Path) -> bytes:
    return busybox_layer.read_bytes()


@pytest.fixture(scope="module")
def kinds_layout(busybox_raw: bytes, tmp_path_factory) -> tuple[Path, str]:
    """test_analyze's `kinds` image, as an OCI layout only (never in containerd)."""
    l1 = ai.layer([ai.script("app/run.sh", RUN_SH), ai.file("app/a.txt", "alpha-lower\n"),
                   ai.file("app/b.txt", "bravo\n")])
    l2 = ai.layer([ai.file("app/a.txt", "alpha-upper\n"), ai.file("app/c.txt", "charlie\n")])
    layout = tmp_path_factory.mktemp("runc-kinds") / "layout"
    manifest = f.write_layout(layout, "v1", [busybox_raw, l1, l2],
                              ai.config(["/bin/sh", "/app/run.sh", "exit"]))
    return layout, manifest


@pytest.fixture(scope="module")
def nodaemon(tmp_path_factory) -> NoDaemon:
    return NoDaemon(tmp_path_factory.mktemp("runc-nodaemon"))


@pytest.fixture
def leftovers(tmp_path: Path) -> RunLeftovers:
    return RunLeftovers(tmp_path / "tmpdir")


def _copy_layout(layout: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(layout), str(dst)], check=True)
    return dst


# --- workload kinds, with no containerd anywhere -------------------------------------------

@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_workload_kinds_without_containerd(
    runner: str, kind: str, kinds_layout: tuple[Path, str], nodaemon: NoDaemon,
    tmp_path: Path, leftovers: RunLeftovers,
) -> None:
    flags, want, period, ending, printed = KINDS[kind]
    layout = _copy_layout(kinds_layout[0], tmp_path / "layout")
    record = tmp_path / "record.jsonl"
    nodaemon.env["TMPDIR"] = str(leftovers.tmpdir)
    try:
        t0 = time.monotonic()
        res = nodaemon.optimize("--oci", "--period", str(period), "--record-out", record,
                                *DAEMONLESS[runner], *flags, f"oci:{layout}:v1",
                                f"oci:{layout}:esgz")
        elapsed = time.monotonic() - t0
    finally:
        del nodaemon.env["TMPDIR"]
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("sha256:")
    assert printed in res.stderr and printed not in res.stdout
    assert ended_by(res.stderr) == ending, res.stderr
    if kind == "exit":
        assert elapsed < period - 2, f"a workload that exits at once took {elapsed:.1f}s"
    elif kind == "period":
        assert period <= elapsed < period + 15, elapsed
    else:
        assert elapsed < 15, f"--wait-on-line READY: the run took {elapsed:.1f}s"
    leftovers.check()

    rec = read_record(record)
    got = pairs(rec)
    assert len(got) == len(set(got)) and set(got) == want, got
    assert {r["manifestDigest"] for r in rec} == {kinds_layout[1]}
    assert got.index(BB) < got.index(("app/run.sh", 1)) < got.index(("app/a.txt", 2))
    assert layout_prioritized(layout, "esgz") == expected_prioritized(rec, 3)
    assert run_layout_image(layout, "esgz", tmp_path) == KIND_OUTPUT
    if kind == "exit":
        # The run converted the layers it spooled during the workload; from the record,
        # they are converted from the blobs: the same image, byte for byte.
        again = nodaemon.optimize("--oci", "--record-in", record, f"oci:{layout}:v1",
                                  f"oci:{layout}:from-record")
        assert again.returncode == 0, again.stderr
        assert again.stdout.split()[-1] == res.stdout.split()[-1]


def test_oci_source_defaults_to_the_runc_runner(
    kinds_layout: tuple[Path, str], tmp_path: Path, leftovers: RunLeftovers
) -> None:
    """No --runner: an oci: image runs with runc; --runner containerd says why it cannot."""
    layout = _copy_layout(kinds_layout[0], tmp_path / "layout")
    env = cli_env(leftovers.tmpdir, CONTAINERD_ADDRESS="/nonexistent/containerd.sock")
    record = tmp_path / "r.jsonl"
    res = run_cli("analyze", "--period", "10", "--record-out", record, f"oci:{layout}:v1",
                  env=env)
    assert res.returncode == 0, res.stderr
    assert ("app/a.txt", 2) in pairs(read_record(record))
    res = run_cli("analyze", "--runner", "containerd", "--period", "10", "--record-out",
                  record, f"oci:{layout}:v1", env=env)
    assert "containerd" in error_message(res)
    leftovers.check()


# --- errors and cleanup ---------------------------------------------------------------------

@pytest.mark.parametrize("runner", RUNNERS)
def test_missing_runtime_and_bad_entrypoint(
    runner: str, kinds_layout: tuple[Path, str], tmp_path: Path, leftovers: RunLeftovers
) -> None:
    layout = _copy_layout(kinds_layout[0], tmp_path / "layout")
    env = cli_env(leftovers.tmpdir)
    res = run_cli("optimize", "--oci", *DAEMONLESS[runner], "--runtime", "/nonexistent/runc",
                  f"oci:{layout}:v1", f"oci:{layout}:x", env=env)
    msg = error_message(res)
    assert "/nonexistent/runc" in msg and "--record-in" in msg, msg
    # an entrypoint that is not in the image: the run fails, nothing is written
    res = run_cli("optimize", "--oci", *DAEMONLESS[runner], "--period", "5", "--entrypoint",
                  '["/no/such/binary"]', f"oci:{layout}:v1", f"oci:{layout}:noentry", env=env)
    msg = error_message(res)
    assert "the workload could not start" in msg and "/no/such/binary" in msg, msg
    assert "noentry" not in (layout / "index.json").read_text()
    res = run_cli("analyze", *DAEMONLESS[runner], "--period", "5", "--entrypoint",
                  '["/no/such/binary"]', "--record-out", tmp_path / "r.jsonl",
                  f"oci:{layout}:v1", env=env)
    assert "could not start" in error_message(res)
    leftovers.check()


def _start(*args: str | Path, env: dict[str, str], err: Path) -> subprocess.Popen:
    with open(err, "wb") as e:
        return subprocess.Popen(cli_argv(*args),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=e,
                                env=env, start_new_session=True)


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, path.read_text(errors="replace")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no {text!r}: {path.read_text(errors='replace')}")


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("how", ["sigint", "sigterm", "workload-killed"])
def test_cleanup_after_interruptions(
    runner: str, how: str, kinds_layout: tuple[Path, str], tmp_path: Path,
    leftovers: RunLeftovers,
) -> None:
    layout = _copy_layout(kinds_layout[0], tmp_path / "layout")
    err = tmp_path / "err"
    proc = _start("optimize", "--oci", *DAEMONLESS[runner], "--period", "120", "--args",
                  '["/bin/sh","/app/run.sh","sleep"]', f"oci:{layout}:v1",
                  f"oci:{layout}:out", env=cli_env(leftovers.tmpdir), err=err)
    try:
        _wait_for(err, "sleeping", proc)
        if how == "sigint":
            os.killpg(proc.pid, signal.SIGINT)
        elif how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            [cid] = sample_containers() - leftovers.containers
            subprocess.run(["runc", "--root", "/run/estargz-opt/runc", "kill", cid, "KILL"],
                           check=True)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = err.read_text()
    if how == "workload-killed":
        # like a workload that exits: the run goes on and converts
        assert proc.returncode == 0, text
        assert "exit status 137" in text, text
    else:
        assert proc.returncode != 0, text
        assert "Traceback" not in text, text
        index = json.loads((layout / "index.json").read_text())
        tags = [m.get("annotations", {}).get("org.opencontainers.image.ref.name")
                for m in index["manifests"]]
        assert "out" not in tags, "an interrupted run left its destination"
    leftovers.check()


def _children(pid: int, needle: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and needle in cmdline:
            out.append(int(entry.name))
    return out


@pytest.mark.parametrize("runner", RUNNERS)
def test_next_run_reaps_what_a_killed_run_left(
    runner: str, kinds_layout: tuple[Path, str], tmp_path: Path, leftovers: RunLeftovers
) -> None:
    layout = _copy_layout(kinds_layout[0], tmp_path / "layout")
    env = cli_env(leftovers.tmpdir)
    err = tmp_path / "err"
    sleeping = ["--args", '["/bin/sh","/app/run.sh","sleep"]']
    killed = _start("optimize", "--oci", *DAEMONLESS[runner], "--period", "120", *sleeping,
                    f"oci:{layout}:v1", f"oci:{layout}:killed", env=env, err=err)
    live_err = tmp_path / "live-err"
    live = None
    try:
        _wait_for(err, "sleeping", killed)
        [cid] = sample_containers() - leftovers.containers
        monitors = _children(killed.pid, MONITOR)
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=30)
        # left: the container (running), its run directory; gone: the monitor
        assert cid in sample_containers()
        assert (leftovers.tmpdir / cid / "owner").is_file()
        deadline = time.monotonic() + 5
        while any(Path(f"/proc/{m}").exists() for m in monitors) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert monitors and not any(Path(f"/proc/{m}").exists() for m in monitors)

        # the next run removes them; it is still running when a third run reaps: its own
        # container must survive that
        live = _start("optimize", "--oci", *DAEMONLESS[runner], "--period", "120", *sleeping,
                      f"oci:{layout}:v1", f"oci:{layout}:live", env=env, err=live_err)
        _wait_for(live_err, "sleeping", live)
        assert f"removing sample container {cid}" in live_err.read_text()
        assert cid not in sample_containers()
        assert not (leftovers.tmpdir / cid).exists()
        [live_cid] = sample_containers() - leftovers.containers

        res = run_cli("optimize", "--oci", *DAEMONLESS[runner], "--period", "2",
                      f"oci:{layout}:v1", f"oci:{layout}:next", env=env)
        assert res.returncode == 0, res.stderr
        assert "removing sample container" not in res.stderr
        assert live_cid in sample_containers()
        assert live.poll() is None, "the live run was disturbed"
    finally:
        if live is not None:
            os.killpg(live.pid, signal.SIGINT)
            live.communicate(timeout=60)
    leftovers.check()


# --- security -------------------------------------------------------------------------------

@pytest.fixture
def host_secret() -> Iterator[tuple[Path, str]]:
    token = f"HOSTSECRET-{secrets.token_hex(8)}"
    path = Path(f"/tmp/estargz-opt-secret-{secrets.token_hex(6)}")
    path.write_text(f"{token}\nsecretuser:x:4242:4242::/:/bin/sh\n")
    old = time.time() - 3600
    os.utime(path, (old, path.stat().st_mtime))
    yield path, token
    path.unlink()


@pytest.mark.parametrize("runner", RUNNERS)
def test_hostile_image(runner: str, busybox_raw: bytes, tmp_path: Path,
                       host_secret: tuple[Path, str], leftovers: RunLeftovers) -> None:
    secret, token = host_secret
    atime = secret.stat().st_atime
    escape = f"estargz-opt-escape-{secrets.token_hex(6)}"
    hostile = ai.layer([
        ai.symlink("app/shadow", "/etc/shadow"),
        ai.symlink("app/abs", "/etc/hostname"),
        ai.symlink("app/rel", "../../../../../../etc/passwd"),
        ai.symlink("app/secret", str(secret)),
        ai.symlink("etc/passwd", str(secret)),  # what --user would look up
        ai.symlink("etc/group", str(secret)),
        ai.symlink("hostdir", os.path.dirname(secret)),  # a symlinked parent, then
        ai.file(f"hostdir/{escape}", "written through the link\n"),  # a file under it
        ai.file(f"../../../../../tmp/{escape}-dotdot", "escaped\n"),
        ai.script("app/h.sh", "cat /app/shadow /app/abs /app/rel /app/secret\n"
                              f"cat /tmp/{escape}-dotdot\n"
                              "echo \"ID=$(/bin/busybox id)\"\necho h-done\n"),
    ], add_parents=True)
    layout = tmp_path / "layout"
    f.write_layout(layout, "v1", [busybox_raw, hostile], ai.config(["/bin/sh", "/app/h.sh"]))
    env = cli_env(leftovers.tmpdir)
    record = tmp_path / "record.jsonl"
    res = run_cli("analyze", *DAEMONLESS[runner], "--period", "10", "--record-out", record,
                  f"oci:{layout}:v1", env=env)
    assert res.returncode == 0, res.stderr
    assert "h-done" in res.stderr and "escaped" in res.stderr  # the .. file, in the rootfs
    assert token not in res.stderr + res.stdout
    names = ai.layer_names(busybox_raw) | {n.removeprefix("../../../../../") for n in
                                           ai.layer_names(hostile)}
    rec = pairs(read_record(record))
    assert {p for p, _ in rec} <= names, rec
    assert ("app/h.sh", 1) in rec and (f"tmp/{escape}-dotdot", 1) in rec
    assert not Path("/tmp", f"{escape}-dotdot").exists(), "a .. entry escaped"
    assert not Path(os.path.dirname(secret), escape).exists(), "written through a symlink"
    for user, file in (("secretuser", "/etc/passwd"), ("0:secretuser", "/etc/group")):
        res = run_cli("analyze", *DAEMONLESS[runner], "--period", "10", "--user", user,
                      "--record-out", record, f"oci:{layout}:v1", env=env)
        assert token not in res.stderr + res.stdout
        assert "id=4242" not in res.stderr + res.stdout
        msg = error_message(res)
        assert "secretuser" in msg and file in msg, msg
    leftovers.check()
    assert secret.stat().st_atime == atime, "estargz-opt or the workload read the host secret"
    secret.read_text()  # the control: a read does move the atime here
    assert secret.stat().st_atime != atime, "this filesystem does not update atime on read"


# --- sampler flags the runner implements itself ---------------------------------------------

@pytest.mark.parametrize("runner", RUNNERS)
def test_stdin_net_host_and_mount(runner: str, busybox_raw: bytes, tmp_path: Path,
                                  leftovers: RunLeftovers) -> None:
    app = ai.layer([ai.script("app/io.sh", "read line; echo \"got:$line\"\n"
                                           "cat /mnt/host/shared.txt\n"
                                           "cat /etc/resolv.conf | head -1\n")])
    layout = tmp_path / "layout"
    f.write_layout(layout, "v1", [busybox_raw, app], ai.config(["/bin/sh", "/app/io.sh"]))
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "shared.txt").write_text("from-the-host\n")
    text = f"piped-{secrets.token_hex(4)}"
    with open(tmp_path / "in", "w+") as stdin:
        stdin.write(text + "\n")
        stdin.seek(0)
        res = run_cli("optimize", "--oci", *DAEMONLESS[runner], "-i", "--period", "10",
                      "--net-host", "--mount",
                      f"type=bind,source={shared},destination=/mnt/host,options=rbind:ro",
                      f"oci:{layout}:v1", f"oci:{layout}:io", env=cli_env(leftovers.tmpdir),
                      stdin=stdin.fileno())
    assert res.returncode == 0, res.stderr
    assert f"got:{text}" in res.stderr and "from-the-host" in res.stderr
    host_resolv = Path("/etc/resolv.conf").read_text().splitlines()[:1]
    assert any(line in res.stderr for line in host_resolv), "--net-host: the host's resolv.conf"
    assert ended_by(res.stderr) == "the workload exited"
    leftovers.check()


@pytest.mark.parametrize("runner", RUNNERS)
def test_terminal(runner: str, busybox_raw: bytes, tmp_path: Path,
                  leftovers: RunLeftovers) -> None:
    """-t -i: the workload gets a terminal (the runtime's console socket, relayed)."""
    app = ai.layer([ai.script("app/tty.sh", "if [ -t 0 ] && [ -t 1 ]; then echo is-a-tty; fi\n"
                                            "read line; echo \"tty-got:$line\"\n")])
    layout = tmp_path / "layout"
    f.write_layout(layout, "v1", [busybox_raw, app], ai.config(["/bin/sh", "/app/tty.sh"]))
    with open(tmp_path / "in", "w+") as stdin:
        stdin.write("hello\n")
        stdin.seek(0)
        res = run_cli("analyze", *DAEMONLESS[runner], "-t", "-i", "--period", "10",
                      "--wait-on-line", "tty-got", "--record-out", tmp_path / "r.jsonl",
                      f"oci:{layout}:v1", env=cli_env(leftovers.tmpdir), stdin=stdin.fileno())
    assert res.returncode == 0, res.stderr
    assert "is-a-tty" in res.stderr and "tty-got:hello" in res.stderr, res.stderr
    leftovers.check()
