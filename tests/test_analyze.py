"""The workload analyzer: `optimize` and `analyze` run the image's workload in a sample
container (containerd + runc) under a fanotify monitor and record the files it opens.

Everything runs through the CLI, as a child process, against the session's private
containerd. What is checked:

* workload kinds: one that exits at once, one stopped by --period, one that prints a
  --wait-on-line text; the record holds exactly the (layerIndex, path) pairs the workload
  reads (an overridden file maps to the upper layer), the converted layers put them first,
  and the optimized image runs;
* the recorder's rules on a real run: whiteouts and opaque dirs, first access wins;
* the sampler flags reach the workload (env, env-file, user, cwd, args, entrypoint,
  mount, DNS, hosts, net-host, -i) and bad values fail in one line;
* cleanup after success, failure, timeout, Ctrl-C, SIGTERM and a workload killed from
  outside: no container, task, snapshot, mount, lease, temp dir, netns or monitor left,
  and no destination image after a failure;
* errors: no CAP_SYS_ADMIN, no runc, an entrypoint that does not exist;
* security: containerd's default unprivileged spec, a hostile image's symlinks and `..`
  names never reach host files;
* `analyze --record-out` then `optimize --record-in` on an OCI layout gives the same
  prioritized files as the containerd run.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
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
    prioritized,
    read_record,
)
from support.cli import cli_argv, cli_env, error_message, printed_digest, run_cli
from support.containerd import Containerd, ctr_run, images, optimize
from support.leftovers import Leftovers, monitor_processes
from support.ptyrun import PtyRun

pytestmark = pytest.mark.interop

SAMPLE = "estargz-opt-sample-"
MONITOR = "estargz_opt.workload.monitor"
NO_PREFETCH = ".no.prefetch.landmark"
# containerd's default capability set for an unprivileged container (oci.WithDefaultSpec).
CONTAINERD_DEFAULT_CAPS = {
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
}


# --- running the CLI --------------------------------------------------------------------------

def env_with_tmp(tmpdir: Path, **extra: str) -> dict[str, str]:
    return cli_env(TMPDIR=str(tmpdir), **extra)


def start(c: Containerd, *args: str | Path, env: dict[str, str],
          stderr_path: Path) -> subprocess.Popen:
    """The CLI in the background; its stderr goes to *stderr_path* (to poll)."""
    with open(stderr_path, "wb") as err:
        return subprocess.Popen(
            [*cli_argv(), "-a", c.address, *map(str, args)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env,
            start_new_session=True)  # its own process group, as a shell's foreground job


def ctrl_c(proc: subprocess.Popen, group: bool) -> None:
    """SIGINT to the CLI alone, or to its whole process group, as a terminal's Ctrl-C does
    (then the monitor helper and other children get it too)."""
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"the CLI exited {proc.returncode} before printing {text!r}:\n"
                        f"{path.read_text(errors='replace')}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no {text!r} within {timeout}s:\n{path.read_text(errors='replace')}")


def finish(proc: subprocess.Popen, stderr_path: Path,
           timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the CLI did not end within {timeout}s:\n{stderr_path.read_text()}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(),
                                       stderr_path.read_text(errors="replace"))


def sample_containers(c: Containerd) -> list[str]:
    return [x for x in c.ctr("containers", "ls", "-q").stdout.split() if x.startswith(SAMPLE)]


def wait_for_container(c: Containerd, proc: subprocess.Popen, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sample_containers(c)
        if found:
            assert len(found) == 1, found
            return found[0]
        assert proc.poll() is None, "the CLI ended before its sample container appeared"
        time.sleep(0.1)
    pytest.fail("no estargz-opt-sample-* container appeared")


# --- what a run must leave behind: nothing ---------------------------------------------------


@pytest.fixture
def leftovers(containerd, tmp_path: Path) -> Leftovers:
    return Leftovers(containerd, tmp_path / "tmpdir")


# --- images -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kinds(containerd, busybox_layer: Path, tmp_path_factory) -> ai.Image:
    """busybox; layer 1: app/run.sh, a.txt (lower), b.txt; layer 2: a.txt (upper), c.txt.
    Cmd: `sh /app/run.sh exit` (prints alpha-upper, done-exit)."""
    l1 = ai.layer([ai.script("app/run.sh", RUN_SH), ai.file("app/a.txt", "alpha-lower\n"),
                   ai.file("app/b.txt", "bravo\n")])
    l2 = ai.layer([ai.file("app/a.txt", "alpha-upper\n"), ai.file("app/c.txt", "charlie\n")])
    return ai.build(containerd, tmp_path_factory.mktemp("kinds"), "localhost/analyze-kinds:1",
                    [busybox_layer.read_bytes(), l1, l2],
                    ai.config(["/bin/sh", "/app/run.sh", "exit"]))


@pytest.mark.parametrize("kind", list(KINDS))
def test_workload_kinds(kind: str, kinds: ai.Image, containerd, tmp_path: Path,
                        leftovers: Leftovers) -> None:
    flags, want, period, ending, printed = KINDS[kind]
    record = tmp_path / "record.jsonl"
    dst = f"localhost/analyze-kinds:1-{kind}"
    t0 = time.monotonic()
    res = optimize(containerd, "--oci", "--period", str(period), "--record-out", record,
                   *flags, kinds.name, dst, env=env_with_tmp(leftovers.tmpdir))
    elapsed = time.monotonic() - t0
    printed_digest(res)
    assert printed in res.stderr, "the workload's output goes to our stderr"
    assert printed not in res.stdout, "stdout carries only the digest"
    assert ended_by(res.stderr) == ending, res.stderr
    if kind == "exit":
        assert elapsed < period - 2, f"a workload that exits at once took {elapsed:.1f}s"
    elif kind == "period":
        assert period <= elapsed < period + 15, elapsed
    else:
        assert elapsed < 15, f"--wait-on-line READY: the run took {elapsed:.1f}s of {period}"
    leftovers.check(new_images={dst})

    rec = read_record(record)
    assert record.read_text() == "".join(
        json.dumps(r, separators=(",", ":")) + "\n" for r in rec), "ctr-remote's format"
    assert all(list(r) == ["path", "manifestDigest", "layerIndex"] for r in rec), rec
    got = pairs(rec)
    assert len(got) == len(set(got)), f"duplicates in the record: {got}"
    assert set(got) == want, got
    assert {r["manifestDigest"] for r in rec} == {kinds.manifest}
    # busybox is exec'd before the script is read, which is read before what it cats
    assert got.index(BB) < got.index(("app/run.sh", 1)) < got.index(("app/a.txt", 2))

    assert prioritized(containerd, dst) == expected_prioritized(rec, 3)
    assert ctr_run(containerd, dst) == KIND_OUTPUT


# --- recorder rules -------------------------------------------------------------------------

WH_SH = """\
cat /gone/secret.txt /opq/old.txt
cat /keep/k.txt
cat /keep/k.txt /opq/new.txt
cat /keep/k.txt
cat /lib/x.txt
echo created > /keep/new.txt; cat /keep/new.txt
echo wh-done
"""


def test_whiteouts_and_first_access(containerd, busybox_layer: Path, tmp_path: Path,
                                    leftovers: Leftovers) -> None:
    l1 = ai.layer([ai.script("app/wh.sh", WH_SH), ai.file("gone/secret.txt", "deleted\n"),
                   ai.file("opq/old.txt", "hidden\n"), ai.file("keep/k.txt", "kept\n"),
                   ai.file("usr/lib/x.txt", "via-link\n"), ai.symlink("lib", "usr/lib")])
    l2 = ai.layer([ai.whiteout("gone/secret.txt"), ai.dir_("opq"), ai.opaque("opq"),
                   ai.file("opq/new.txt", "new\n")])
    img = ai.build(containerd, tmp_path / "img", "localhost/analyze-wh:1",
                   [busybox_layer.read_bytes(), l1, l2], ai.config(["/bin/sh", "/app/wh.sh"]))
    leftovers.reset()
    record = tmp_path / "record.jsonl"
    res = run_cli("-a", containerd.address, "analyze", img.name, "--record-out", record,
              "--period", "10", "--json", env=env_with_tmp(leftovers.tmpdir))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["endedBy"] == "exit" and summary["exitStatus"] == 0, summary
    out = [line for line in res.stderr.splitlines()
           if line in ("kept", "new", "via-link", "created", "wh-done")]
    assert out == ["kept", "kept", "new", "kept", "via-link", "created", "wh-done"], res.stderr
    assert "can't open '/gone/secret.txt'" in res.stderr
    assert "can't open '/opq/old.txt'" in res.stderr
    leftovers.check()
    got = pairs(read_record(record))
    # a file read through a symlinked directory is recorded under its real path
    assert got == [BB, ("app/wh.sh", 1), ("keep/k.txt", 1), ("opq/new.txt", 2),
                   ("usr/lib/x.txt", 1)], got


# --- sampler flags --------------------------------------------------------------------------

FLAGS_SH = """\
echo "ARGS=$*"
echo "ID=$(/bin/busybox id)"
echo "PWD=$(/bin/busybox pwd)"
/bin/busybox env | /bin/busybox sort | /bin/busybox sed 's/^/ENV /'
/bin/busybox sed 's/^/HOSTS /' /etc/hosts
/bin/busybox sed 's/^/RESOLV /' /etc/resolv.conf
for f in /data/*; do echo "DATA $f $(cat $f)"; done
echo "NET $(ls /sys/class/net | /bin/busybox tr '\\n' ' ')"
"""


@pytest.fixture(scope="module")
def flags_image(containerd, busybox_layer: Path, tmp_path_factory) -> ai.Image:
    l1 = ai.layer([ai.script("app/flags.sh", FLAGS_SH),
                   ai.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"
                                         "app:x:1000:1000:app:/home/app:/bin/sh\n"
                                         "svc:x:2000:2000:svc:/:/bin/sh\n"),
                   ai.file("etc/group", "root:x:0:\napp:x:1000:\nsvc:x:2000:\n"),
                   ai.dir_("tmp"), ai.dir_("data")])
    return ai.build(containerd, tmp_path_factory.mktemp("flags"), "localhost/analyze-flags:1",
                    [busybox_layer.read_bytes(), l1],
                    ai.config(["/app/flags.sh", "from-cmd"], Env=["PATH=/bin", "IMG=1"],
                              User="svc", WorkingDir="/app"))


def lines(stderr: str, prefix: str) -> list[str]:
    return [line.removeprefix(prefix) for line in stderr.splitlines() if line.startswith(prefix)]


def test_sampler_flags(flags_image: ai.Image, containerd, tmp_path: Path,
                       leftovers: Leftovers) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "d1.txt").write_text("host-data")
    env_file = tmp_path / "env"
    env_file.write_text("C=from-file\nD=4\n")
    res = run_cli("-a", containerd.address, "analyze", flags_image.name,
              "--record-out", tmp_path / "r.jsonl", "--period", "10",
              "--env", "A=1", "--env", "C=from-flag", "--env-file", env_file,
              "--user", "1000:1000", "--cwd", "/tmp",
              "--entrypoint", '["/bin/sh"]', "--args", '["/app/flags.sh","x1","x2"]',
              "--mount", f"type=bind,source={data},destination=/data,options=rbind:ro",
              "--dns-nameservers", "1.1.1.1,9.9.9.9",
              "--dns-search-domains", "a.example,b.example", "--dns-options", "ndots:2",
              "--add-hosts", "myhost:10.1.2.3",
              env=env_with_tmp(leftovers.tmpdir))
    assert res.returncode == 0, res.stderr
    err = res.stderr
    leftovers.check()
    assert lines(err, "ARGS=") == ["x1 x2"], err
    assert lines(err, "ID=") == ["uid=1000(app) gid=1000(app) groups=1000(app)"], err
    assert lines(err, "PWD=") == ["/tmp"], err
    env = dict(e.partition("=")[::2] for e in lines(err, "ENV "))
    assert env["A"] == "1" and env["D"] == "4" and env["IMG"] == "1", env
    assert env["C"] == "from-file", "--env-file wins over --env for the same key (upstream)"
    hosts = lines(err, "HOSTS ")
    assert "10.1.2.3\tmyhost" in hosts and "127.0.0.1\tlocalhost" in hosts, hosts
    assert lines(err, "RESOLV ") == ["nameserver 1.1.1.1", "nameserver 9.9.9.9",
                                     "search a.example b.example", "options ndots:2"], err
    assert lines(err, "DATA ") == ["/data/d1.txt host-data"], err
    assert lines(err, "NET ") == ["lo "], "a new network namespace holds only lo"
    # the read-only bind: the workload cannot have written to it
    assert sorted(os.listdir(data)) == ["d1.txt"]


def test_entrypoint_keeps_cmd_and_image_config(flags_image: ai.Image, containerd,
                                            tmp_path: Path) -> None:
    res = run_cli("-a", containerd.address, "analyze", flags_image.name,
              "--record-out", tmp_path / "r.jsonl", "--period", "10",
              "--entrypoint", '["/bin/sh"]')
    assert res.returncode == 0, res.stderr
    assert lines(res.stderr, "ARGS=") == ["from-cmd"], "--entrypoint alone keeps the Cmd"
    # the image config's User and WorkingDir; resolv.conf from the default 8.8.8.8
    assert lines(res.stderr, "ID=") == ["uid=2000(svc) gid=2000(svc) groups=2000(svc)"]
    assert lines(res.stderr, "PWD=") == ["/app"]
    assert lines(res.stderr, "RESOLV ") == ["nameserver 8.8.8.8"]


def test_net_host(flags_image: ai.Image, containerd, tmp_path: Path) -> None:
    res = run_cli("-a", containerd.address, "analyze", flags_image.name,
              "--record-out", tmp_path / "r.jsonl", "--period", "10",
              "--entrypoint", '["/bin/sh"]', "--net-host", "--user", "app")
    assert res.returncode == 0, res.stderr
    assert lines(res.stderr, "ID=") == ["uid=1000(app) gid=1000(app) groups=1000(app)"]
    host = sorted(os.listdir("/sys/class/net"))
    [seen] = lines(res.stderr, "NET ")
    assert sorted(seen.split()) == host, f"--net-host: the workload sees {seen}, host {host}"


def test_stdin(flags_image: ai.Image, containerd, tmp_path: Path, leftovers: Leftovers) -> None:
    text = f"piped-{secrets.token_hex(4)}\n"
    t0 = time.monotonic()
    res = subprocess.run(
        [*cli_argv(), "-a", containerd.address, "analyze",
         flags_image.name, "--record-out", str(tmp_path / "r.jsonl"), "--period", "8",
         "-i", "--entrypoint", '["/bin/cat"]', "--args", "[]"],
        input=text, capture_output=True, text=True, env=env_with_tmp(leftovers.tmpdir),
        timeout=120)
    assert res.returncode == 0, res.stderr
    assert text in res.stderr, res.stderr
    assert ended_by(res.stderr) == "the workload exited", "cat exits on stdin's EOF"
    assert time.monotonic() - t0 < 15
    leftovers.check()


@pytest.mark.parametrize("bad, words", [
    (["--args", "notjson"], "--args"),
    (["--entrypoint", '{"a":1}'], "--entrypoint"),
    (["-t"], "-i"),
    (["--mount", "foo"], "--mount"),
    (["--cwd", "relative"], "--cwd"),
    (["--add-hosts", "nocolon"], "--add-hosts"),
    (["-i", "-t", "--wait-on-signal"], "--wait-on-signal"),
])
def test_bad_flag_values(bad: list[str], words: str, flags_image: ai.Image, containerd,
                         tmp_path: Path, leftovers: Leftovers) -> None:
    commands = [["optimize", "--oci", flags_image.name, "localhost/analyze-flags:bad"]]
    if words in ("--args", "--mount"):  # analyze takes the same flags, checked the same way
        commands.append(["analyze", flags_image.name, "--record-out", str(tmp_path / "r.jsonl")])
    for cmd in commands:
        res = run_cli("-a", containerd.address, *cmd, *bad, env=env_with_tmp(leftovers.tmpdir))
        msg = error_message(res)
        assert words in msg, msg
        assert res.returncode == 2, res.returncode
        assert not (tmp_path / "r.jsonl").exists()
    leftovers.check()


# --- cleanup ------------------------------------------------------------------------------------

def test_failure_missing_layer_blob(containerd, busybox_layer: Path, tmp_path: Path,
                                    leftovers: Leftovers) -> None:
    unique = ai.layer([ai.file("app/u.txt", secrets.token_hex(16))])
    img = ai.build(containerd, tmp_path / "img", "localhost/analyze-missing:1",
                   [busybox_layer.read_bytes(), unique], ai.config(["/bin/cat", "/app/u.txt"]))
    manifest = json.loads(containerd.ctr("content", "get", img.manifest, input=b"").stdout)
    containerd.ctr("content", "rm", manifest["layers"][1]["digest"])
    leftovers.reset()
    dst = "localhost/analyze-missing:1-esgz"
    res = optimize(containerd, "--oci", "--period", "5", img.name, dst,
                   env=env_with_tmp(leftovers.tmpdir))
    msg = error_message(res)
    assert manifest["layers"][1]["digest"] in msg and "not found" in msg, msg
    leftovers.check()


@pytest.mark.parametrize("flags, words", [
    (["--env-file", "/nonexistent/env"], "--env-file"),
    (["--user", "nosuchuser"], "nosuchuser"),
])
def test_failure_while_setting_up(flags: list[str], words: str, kinds: ai.Image, containerd,
                                  leftovers: Leftovers) -> None:
    """Refused while the sample container is set up (after the unpack, the snapshot and
    the monitor): one line, and all of that undone."""
    dst = "localhost/analyze-kinds:1-setup"
    res = optimize(containerd, "--oci", "--period", "5", *flags, kinds.name, dst,
                   env=env_with_tmp(leftovers.tmpdir))
    msg = error_message(res)
    assert words in msg, msg
    leftovers.check()


def _interrupt(containerd, kinds: ai.Image, tmp_path: Path, leftovers: Leftovers,
               signo: int, group: bool = False) -> subprocess.CompletedProcess:
    dst = f"localhost/analyze-kinds:1-sig{signo}"
    err = tmp_path / "stderr"
    proc = start(containerd, "optimize", "--oci", "--period", "60",
                 "--args", '["/bin/sh","/app/run.sh","sleep"]', kinds.name, dst,
                 env=env_with_tmp(leftovers.tmpdir), stderr_path=err)
    wait_for_text(err, "sleeping", proc)
    sent = time.monotonic()
    if signo == signal.SIGINT:
        ctrl_c(proc, group)
    else:
        proc.send_signal(signo)
    res = finish(proc, err)
    took = time.monotonic() - sent
    msg = error_message(res)
    assert msg == "interrupted", msg
    assert res.returncode == 128 + signo  # 130 for Ctrl-C, 143 for SIGTERM
    assert took < 2.0, f"the run took {took:.2f}s to end after signal {signo}"
    leftovers.check()
    return res


@pytest.mark.parametrize("group", [False, True], ids=["process", "group"])
def test_ctrl_c(group: bool, kinds: ai.Image, containerd, tmp_path: Path,
                leftovers: Leftovers) -> None:
    _interrupt(containerd, kinds, tmp_path, leftovers, signal.SIGINT, group)


def test_ctrl_c_on_a_terminal(kinds: ai.Image, containerd, tmp_path: Path,
                              leftovers: Leftovers) -> None:
    """Ctrl-C typed on the command's own terminal (a pty: the whole foreground process
    group gets SIGINT) ends the run within 2 s, with nothing left."""
    term = PtyRun([*cli_argv(), "-a", containerd.address, "optimize",
                   "--oci", "--period", "60", "--args", '["/bin/sh","/app/run.sh","sleep"]',
                   kinds.name, "localhost/analyze-kinds:1-pty"],
                  env_with_tmp(leftovers.tmpdir))
    try:
        term.wait_for("sleeping")
        typed = term.type(b"\x03")
        code = term.finish()
    finally:
        term.close()
    assert code == 130 and term.text.rstrip().endswith("error: interrupted"), term.text
    assert term.ended - typed < 2.0, f"{term.ended - typed:.2f}s:\n{term.text}"
    leftovers.check()


def test_sigterm(kinds: ai.Image, containerd, tmp_path: Path, leftovers: Leftovers) -> None:
    _interrupt(containerd, kinds, tmp_path, leftovers, signal.SIGTERM)


@pytest.mark.parametrize("group", [False, True], ids=["process", "group"])
def test_wait_on_signal(group: bool, kinds: ai.Image, containerd, tmp_path: Path,
                        leftovers: Leftovers) -> None:
    """Under --wait-on-signal, Ctrl-C ends the run (not the command): it converts. A
    terminal's Ctrl-C signals the whole foreground process group ("group")."""
    dst = f"localhost/analyze-kinds:1-onsignal-{int(group)}"
    err = tmp_path / "stderr"
    record = tmp_path / "record.jsonl"
    proc = start(containerd, "optimize", "--oci", "--wait-on-signal", "--period", "1",
                 "--record-out", record,
                 "--args", '["/bin/sh","/app/run.sh","sleep"]', kinds.name, dst,
                 env=env_with_tmp(leftovers.tmpdir), stderr_path=err)
    wait_for_text(err, "sleeping", proc)
    time.sleep(2.5)  # the run waits for the signal: --period does not apply
    assert proc.poll() is None, err.read_text()
    ctrl_c(proc, group)
    res = finish(proc, err)
    printed_digest(res)
    assert ended_by(res.stderr) == "interrupted under --wait-on-signal", res.stderr
    leftovers.check(new_images={dst})
    assert set(pairs(read_record(record))) == KINDS["period"][1]


def test_workload_killed_from_outside(kinds: ai.Image, containerd, tmp_path: Path,
                                      leftovers: Leftovers) -> None:
    dst = "localhost/analyze-kinds:1-killed"
    err = tmp_path / "stderr"
    record = tmp_path / "record.jsonl"
    t0 = time.monotonic()
    proc = start(containerd, "optimize", "--oci", "--period", "60", "--record-out", record,
                 "--args", '["/bin/sh","/app/run.sh","sleep"]', kinds.name, dst,
                 env=env_with_tmp(leftovers.tmpdir), stderr_path=err)
    wait_for_text(err, "sleeping", proc)
    cid = wait_for_container(containerd, proc)
    containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
    res = finish(proc, err)
    printed_digest(res)
    assert time.monotonic() - t0 < 40
    assert ended_by(res.stderr) == "the workload exited", res.stderr
    leftovers.check(new_images={dst})
    assert set(pairs(read_record(record))) == KINDS["period"][1]


# --- errors ---------------------------------------------------------------------------------

def test_without_cap_sys_admin(kinds: ai.Image, containerd, tmp_path: Path,
                               leftovers: Leftovers) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    drop = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]
    status = subprocess.run([*drop, "cat", "/proc/self/status"], capture_output=True,
                            text=True, check=True).stdout
    cap_eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M)[1], 16)
    assert not cap_eff & (1 << 21), "setpriv did not drop CAP_SYS_ADMIN"
    dst = "localhost/analyze-kinds:1-nocap"
    res = subprocess.run(
        [*drop, *cli_argv(), "-a", containerd.address, "optimize",
         "--oci", "--period", "5", kinds.name, dst],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
        env=env_with_tmp(leftovers.tmpdir), timeout=120)
    msg = error_message(res)
    assert "fanotify" in msg and "CAP_SYS_ADMIN" in msg, msg
    assert "--record-in" in msg and "--prefetch-list" in msg, msg
    leftovers.check()


def test_without_runc(kinds: ai.Image, containerd, tmp_path: Path,
                      leftovers: Leftovers) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("ctr", "containerd"):
        if shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool))
    env = env_with_tmp(leftovers.tmpdir, PATH=str(bindir))
    dst = "localhost/analyze-kinds:1-norunc"
    res = subprocess.run(
        [*cli_argv(), "-a", containerd.address, "optimize", "--oci",
         "--period", "5", kinds.name, dst],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=120)
    msg = error_message(res)
    assert "runc" in msg and "--record-in" in msg, msg
    leftovers.check()


def test_entrypoint_that_does_not_exist(kinds: ai.Image, containerd, tmp_path: Path,
                                        leftovers: Leftovers) -> None:
    dst = "localhost/analyze-kinds:1-noentry"
    record = tmp_path / "record.jsonl"
    res = optimize(containerd, "--oci", "--period", "5", "--record-out", record,
                   "--entrypoint", '["/nonexistent"]', kinds.name, dst,
                   env=env_with_tmp(leftovers.tmpdir))
    msg = error_message(res)
    assert "/nonexistent" in msg and "could not start" in msg, msg
    leftovers.check()  # and no image
    assert not record.exists()


def test_record_out_in_a_missing_directory(kinds: ai.Image, containerd, tmp_path: Path,
                                           leftovers: Leftovers) -> None:
    """--record-out where it cannot be written: one line naming that path, no image, and
    (what a user expects; unspecified) before the workload spends its --period."""
    record = tmp_path / "missing" / "record.jsonl"
    dst = "localhost/analyze-kinds:1-badrecord"
    res = optimize(containerd, "--oci", "--period", "5", "--record-out", record,
                   kinds.name, dst, env=env_with_tmp(leftovers.tmpdir))
    msg = error_message(res)
    leftovers.check()
    assert not record.parent.exists()
    assert str(record) in msg, f"the error names {msg!r}, not the --record-out path"
    assert "done-exit" not in res.stderr, "the workload ran before the record path was checked"


def test_analyze_of_a_workload_that_cannot_start_fails(kinds: ai.Image, containerd,
                                                       tmp_path: Path,
                                                       leftovers: Leftovers) -> None:
    """`analyze` only makes a record: when the workload cannot start at all, it fails, as
    `optimize` does, and writes no record."""
    record = tmp_path / "record.jsonl"
    res = run_cli("-a", containerd.address, "analyze", kinds.name, "--record-out", record,
              "--period", "5", "--entrypoint", '["/nonexistent"]',
              env=env_with_tmp(leftovers.tmpdir))
    leftovers.check()
    msg = error_message(res)
    assert "/nonexistent" in msg and "could not start" in msg, msg
    assert not record.exists()


# --- security -----------------------------------------------------------------------------------

def test_sample_container_spec(kinds: ai.Image, containerd, tmp_path: Path,
                               leftovers: Leftovers) -> None:
    data = tmp_path / "data"
    data.mkdir()
    err = tmp_path / "stderr"
    proc = start(containerd, "analyze", kinds.name, "--record-out", tmp_path / "r.jsonl",
                 "--period", "60", "--args", '["/bin/sh","/app/run.sh","sleep"]',
                 "--mount", f"type=bind,source={data},destination=/data,options=rbind:ro",
                 env=env_with_tmp(leftovers.tmpdir), stderr_path=err)
    try:
        wait_for_text(err, "sleeping", proc)
        cid = wait_for_container(containerd, proc)
        info = json.loads(containerd.ctr("containers", "info", cid).stdout)
        monitors = monitor_processes(containerd)
    finally:
        ctrl_c(proc, False)
        finish(proc, err)
    leftovers.check()
    spec = info["Spec"]
    assert info["Labels"].get("estargz-opt/sample") == "1", info["Labels"]
    caps = spec["process"]["capabilities"]
    for kind in ("bounding", "effective", "permitted"):
        assert set(caps[kind]) == CONTAINERD_DEFAULT_CAPS, (kind, caps[kind])
    assert not set(caps.get("ambient") or []) - CONTAINERD_DEFAULT_CAPS
    assert "CAP_SYS_ADMIN" not in json.dumps(caps)
    binds = {m["destination"]: m for m in spec["mounts"]
             if m.get("type") == "bind" or "bind" in m.get("options", [])
             or "rbind" in m.get("options", [])}
    assert set(binds) == {"/etc/resolv.conf", "/etc/hosts", "/data"}, list(binds)
    tmpdir = str(leftovers.tmpdir)
    for name in ("resolv.conf", "hosts"):
        src = binds[f"/etc/{name}"]["source"]
        assert src.startswith(f"{tmpdir}/{SAMPLE}") and src.endswith(f"/etc/{name}"), src
    assert binds["/data"]["source"] == str(data)
    others = [m for m in spec["mounts"] if m["destination"] not in binds]
    assert all(not m.get("source", "").startswith("/") for m in others), others
    assert {m["destination"] for m in others} >= {"/proc", "/dev", "/sys"}, others
    [mnt] = [n for n in spec["linux"]["namespaces"] if n["type"] == "mount"]
    assert re.fullmatch(r"/proc/\d+/ns/mnt", mnt["path"]), mnt
    pid = mnt["path"].split("/")[2]
    assert any(line.split()[0] == pid for line in monitors), (pid, monitors)
    types = {n["type"] for n in spec["linux"]["namespaces"]}
    assert {"pid", "ipc", "uts", "mount", "network"} <= types, types


@pytest.fixture
def host_secret() -> Iterator[tuple[Path, str]]:
    token = f"HOSTSECRET-{secrets.token_hex(8)}"
    path = Path(f"/tmp/estargz-opt-secret-{secrets.token_hex(6)}")
    path.write_text(f"{token}\nsecretuser:x:4242:4242::/:/bin/sh\n")
    old = time.time() - 3600
    os.utime(path, (old, path.stat().st_mtime))
    yield path, token
    path.unlink()


def test_hostile_symlinks(containerd, busybox_layer: Path, tmp_path: Path,
                          host_secret: tuple[Path, str], leftovers: Leftovers) -> None:
    secret, token = host_secret
    atime = secret.stat().st_atime
    hostile = [
        ai.symlink("app/shadow", "/etc/shadow"),
        ai.symlink("app/abs", "/etc/hostname"),
        ai.symlink("app/rel", "../../../../../../etc/passwd"),
        ai.symlink("app/secret", str(secret)),
        ai.symlink("etc/passwd", str(secret)),  # what --user would look up
        ai.symlink("etc/group", str(secret)),
        ai.script("app/h.sh", "cat /app/shadow /app/abs /app/rel /app/secret\n"
                              "echo \"ID=$(/bin/busybox id)\"\necho h-done\n"),
    ]
    raw = [busybox_layer.read_bytes(), ai.layer(hostile)]
    img = ai.build(containerd, tmp_path / "img", "localhost/analyze-hostile:1", raw,
                   ai.config(["/bin/sh", "/app/h.sh"]))
    leftovers.reset()
    names = set().union(*map(ai.layer_names, raw))
    record = tmp_path / "record.jsonl"
    dst = "localhost/analyze-hostile:1-esgz"
    res = optimize(containerd, "--oci", "--period", "10", "--record-out", record,
                   img.name, dst, env=env_with_tmp(leftovers.tmpdir))
    printed_digest(res)
    assert "h-done" in res.stderr
    leftovers.check(new_images={dst})
    assert token not in res.stderr + res.stdout
    rec = pairs(read_record(record))
    assert {p for p, _ in rec} <= names, rec
    assert ("app/h.sh", 1) in rec
    # --user secretuser: /etc/passwd is a symlink to the host secret; it must be resolved
    # inside the rootfs (where it leads nowhere), never on the host.
    res = run_cli("-a", containerd.address, "analyze", img.name, "--record-out", record,
              "--period", "10", "--user", "secretuser", env=env_with_tmp(leftovers.tmpdir))
    assert token not in res.stderr + res.stdout
    assert "id=4242" not in res.stderr + res.stdout, res.stderr
    msg = error_message(res)
    assert "secretuser" in msg and "/etc/passwd" in msg, msg
    res = run_cli("-a", containerd.address, "analyze", img.name, "--record-out", record,
              "--period", "10", "--user", "0:secretuser", env=env_with_tmp(leftovers.tmpdir))
    assert token not in res.stderr + res.stdout
    assert "id=4242" not in res.stderr + res.stdout, res.stderr
    msg = error_message(res)
    assert "secretuser" in msg and "/etc/group" in msg, msg
    leftovers.check(new_images={dst})
    assert secret.stat().st_atime == atime, "estargz-opt or the workload read the host secret"
    # the control: a read of the secret does move its atime here (relatime: atime < mtime)
    secret.read_text()
    assert secret.stat().st_atime != atime, "this filesystem does not update atime on read"


def test_passwd_that_is_a_fifo(containerd, busybox_layer: Path, tmp_path: Path,
                               leftovers: Leftovers) -> None:
    """A hostile /etc/passwd that is a FIFO: --user's look-up must not block on it."""
    raw = [busybox_layer.read_bytes(), ai.layer([ai.fifo("etc/passwd")])]
    img = ai.build(containerd, tmp_path / "img", "localhost/analyze-fifo:1", raw,
                   ai.config(["/bin/echo", "fifo-ran"]))
    leftovers.reset()
    res = run_cli("-a", containerd.address, "analyze", img.name, "--record-out",
              tmp_path / "r.jsonl", "--period", "5", "--user", "someone",
              env=env_with_tmp(leftovers.tmpdir), timeout=60)
    msg = error_message(res)
    assert "someone" in msg and "/etc/passwd" in msg, msg
    leftovers.check()


def test_dotdot_tar_entry(containerd, busybox_layer: Path, tmp_path: Path,
                          leftovers: Leftovers) -> None:
    """A layer entry `../../../../../tmp/NAME`: containerd's applier (the unpack step)
    sanitizes it into the rootfs (/tmp/NAME inside the snapshot), so nothing lands on
    the host; `analyze` records it as tmp/NAME; `optimize` then refuses the layer in one
    line (the converter rejects names that climb out of the layer root)."""
    escape = f"estargz-opt-escape-{secrets.token_hex(6)}"
    bad = ai.layer([ai.file(f"../../../../../tmp/{escape}", "escaped\n"),
                    ai.dir_("app"), ai.file("app/ok.txt", "ok\n")], add_parents=False)
    assert f"../../../../../tmp/{escape}" in ai.layer_names(bad), "the .. name as written"
    img = ai.build(containerd, tmp_path / "img", "localhost/analyze-dotdot:1",
                   [busybox_layer.read_bytes(), bad],
                   ai.config(["/bin/cat", "/app/ok.txt", f"/tmp/{escape}"]))
    leftovers.reset()
    record = tmp_path / "r.jsonl"
    res = run_cli("-a", containerd.address, "analyze", img.name, "--record-out", record,
              "--period", "5", env=env_with_tmp(leftovers.tmpdir))
    assert not Path("/tmp", escape).exists(), "a .. entry escaped the snapshot"
    assert res.returncode == 0, res.stderr
    out = [line for line in res.stderr.splitlines() if line in ("ok", "escaped")]
    assert out == ["ok", "escaped"], "the entry was sanitized into the rootfs's /tmp"
    leftovers.check()
    assert pairs(read_record(record)) == [BB, ("app/ok.txt", 1), (f"tmp/{escape}", 1)]

    dst = "localhost/analyze-dotdot:1-esgz"
    res = optimize(containerd, "--oci", "--period", "5", img.name, dst,
                   env=env_with_tmp(leftovers.tmpdir))
    assert not Path("/tmp", escape).exists()
    msg = error_message(res)
    assert "climbs out of the layer root" in msg and "layer 1" in msg, msg
    leftovers.check()


def test_index_image_records_the_host_manifest(containerd, busybox_layer: Path,
                                               tmp_path: Path) -> None:
    """An image index: the host platform's workload runs, and the record names the host
    manifest (what --record-in matches), not the index."""
    layout = tmp_path / "layout"
    app = ai.layer([ai.file("app/host.txt", "host-platform\n")])
    arm = ai.layer([ai.file("app/host.txt", "arm64\n")])
    index = f.write_index(layout, "v1", [(f.HOST_PLATFORM, [busybox_layer.read_bytes(), app]),
                                         ("linux/arm64", [arm])],
                          config_extra=ai.config(["/bin/cat", "/app/host.txt"]))
    name = "localhost/analyze-index:1"
    containerd.ctr("images", "import", "--no-unpack", "--all-platforms",
                   str(f.archive_for_ctr(layout, "v1", name, tmp_path / "image.tar")))
    [host] = [m for p, m, _ in f.platform_manifests(layout, "v1")
              if p and p["architecture"] == f.HOST_PLATFORM[1]]
    record = tmp_path / "record.jsonl"
    res = run_cli("-a", containerd.address, "analyze", name, "--record-out", record,
              "--period", "10")
    assert res.returncode == 0, res.stderr
    assert "host-platform" in res.stderr.splitlines()
    rec = read_record(record)
    assert {r["manifestDigest"] for r in rec} == {host["digest"]} != {index}, rec
    assert pairs(rec) == [BB, ("app/host.txt", 1)]


# --- analyze, then optimize --record-in an OCI layout -----------------------------------------

def test_analyze_then_record_in_oci_layout(kinds: ai.Image, containerd, tmp_path: Path,
                                           leftovers: Leftovers) -> None:
    record = tmp_path / "record.jsonl"
    res = run_cli("-a", containerd.address, "analyze", kinds.name, "--record-out", record,
              "--period", "10", "--json", env=env_with_tmp(leftovers.tmpdir))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert {k: summary.get(k) for k in ("record", "endedBy", "exitStatus", "error")} == \
        {"record": str(record), "endedBy": "exit", "exitStatus": 0, "error": None}, summary
    leftovers.check()
    rec = read_record(record)
    assert set(pairs(rec)) == KINDS["exit"][1]

    out = tmp_path / "out"
    res = run_cli("optimize", "--oci", "--record-in", record, f"oci:{kinds.layout}:{kinds.tag}",
              f"oci:{out}:esgz", env=cli_env(CONTAINERD_ADDRESS="/nonexistent/containerd.sock"))
    printed_digest(res)
    from_layout = [[p for p in lay["prioritized"] if not p.endswith("/")]
                   for lay in json.loads(run_cli("inspect", f"oci:{out}:esgz", "--json").stdout)
                   ["layers"]]
    assert from_layout == expected_prioritized(rec, 3)
    # ... and a containerd `optimize` run of the same workload prioritized the same
    dst = "localhost/analyze-kinds:1-exit"
    if dst not in images(containerd):  # test_workload_kinds[exit] did not run first
        printed_digest(optimize(containerd, "--oci", "--period", "10", kinds.name, dst))
    assert prioritized(containerd, dst) == from_layout


def test_analyze_prefetch_list_out_round_trip(kinds: ai.Image, containerd, tmp_path: Path,
                                              leftovers: Leftovers) -> None:
    """A real workload run's --prefetch-list-out gives, fed back with --prefetch-list, the
    same image byte for byte as its record with --record-in (daemonless conversions)."""
    record, listing = tmp_path / "record.jsonl", tmp_path / "prefetch.txt"
    res = run_cli("-a", containerd.address, "analyze", kinds.name, "--record-out", record,
              "--prefetch-list-out", listing, "--period", "10",
              env=env_with_tmp(leftovers.tmpdir))
    assert res.returncode == 0, res.stderr
    rec = read_record(record)
    lines = listing.read_text().splitlines()
    assert lines[0].startswith("# estargz-opt prefetch list") and kinds.name in lines[0], lines
    assert rec[0]["manifestDigest"] in lines[0], lines
    assert [x for x in lines if not x.startswith("#")] == [r["path"] for r in rec]
    src = f"oci:{kinds.layout}:{kinds.tag}"
    nodaemon = cli_env(CONTAINERD_ADDRESS="/nonexistent/containerd.sock")
    via_record = printed_digest(run_cli("optimize", "--oci", "--record-in", record, src,
                                    f"oci:{tmp_path / 'r'}:esgz", env=nodaemon))
    via_list = printed_digest(run_cli("optimize", "--oci", "--prefetch-list", listing, src,
                                  f"oci:{tmp_path / 'l'}:esgz", env=nodaemon))
    assert via_list == via_record


def test_analyze_record_survives_a_rebuild(kinds: ai.Image, containerd, tmp_path: Path,
                                           leftovers: Leftovers) -> None:
    """Record release 1 with a real workload run, rebuild with a changed top layer (a new
    manifest digest), and convert the rebuild with the old record, with no daemon: the
    base layers prioritize the same files in the same order, the top layer by path."""
    record = tmp_path / "record.jsonl"
    res = run_cli("-a", containerd.address, "analyze", kinds.name, "--record-out", record,
              "--period", "10", env=env_with_tmp(leftovers.tmpdir))
    assert res.returncode == 0, res.stderr
    rec = read_record(record)
    rebuilt = tmp_path / "rebuilt"
    top = ai.layer([ai.file("app/a.txt", "alpha-upper, release 2\n"),
                    ai.file("app/d.txt", "delta\n")])
    new_digest = f.write_layout(rebuilt, "v2", [*kinds.layers[:2], top],
                                ai.config(["/bin/sh", "/app/run.sh", "exit"]))
    assert new_digest != kinds.manifest
    nodaemon = cli_env(CONTAINERD_ADDRESS="/nonexistent/containerd.sock")

    def prioritized_of(out: Path) -> list[list[str]]:
        report = json.loads(run_cli("inspect", f"oci:{out}:esgz", "--json").stdout)
        return [[p for p in lay["prioritized"] if not p.endswith("/")]
                for lay in report["layers"]]

    printed_digest(run_cli("optimize", "--oci", "--record-in", record,
                       f"oci:{kinds.layout}:{kinds.tag}", f"oci:{tmp_path / 'v1'}:esgz",
                       env=nodaemon))
    res = run_cli("optimize", "--oci", "--record-in", record, f"oci:{rebuilt}:v2",
              f"oci:{tmp_path / 'v2'}:esgz", env=nodaemon)
    printed_digest(res)
    assert "matched by path" in res.stderr, res.stderr
    original, after = prioritized_of(tmp_path / "v1"), prioritized_of(tmp_path / "v2")
    assert original == expected_prioritized(rec, 3)
    assert after[:2] == original[:2]
    assert after[2] == ["app/a.txt"] == original[2]
