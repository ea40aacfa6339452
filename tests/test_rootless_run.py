"""The rootless runner end to end: `optimize`/`analyze` run by an unprivileged uid with no
capabilities (setpriv), on OCI layouts that uid owns, with no containerd involved.

What is checked, as for the other runners (tests/test_analyze.py):
* workload kinds: exits at once, stopped by --period, a --wait-on-line text; the record
  and the converted layers' prioritized files; the optimized image runs (rootless too);
* the runner is chosen by itself when not root, and by --runner rootless;
* a hostile image's symlinks never reach host files (a host secret's atime stays);
* several ids: without newuidmap, a subordinate range, the bounding set's CAP_SETUID or
  under no_new_privs, one id (every file the caller's, the workload root of the
  namespace; a Debian image records what the runc runner records), and a non-root user
  refused; given by newuidmap/newgidmap from an /etc/subuid range when there is one;
* --cni is refused in one line;
* cleanup after success, SIGTERM, Ctrl-C and a workload killed from outside: no process
  of the uid, nothing in its TMPDIR; after a SIGKILL of estargz-opt, the next run kills
  what the dead run left and removes its run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import analyzeimages as ai, imagefactory as f
from support.analyzeimages import BB, KIND_OUTPUT, KINDS, RUN_SH, ended_by, expected_prioritized
from support.cli import cli_env, error_message, printed_digest, run_cli
from support.debs import deb_layer, owners
from support.tocs import our_toc, prioritized_files
from support.unprivileged import Unprivileged, make_unprivileged

pytestmark = pytest.mark.root

SAMPLE = "estargz-opt-sample-"


@pytest.fixture(scope="module")
def user() -> Iterator[Unprivileged]:
    made = make_unprivileged()
    yield made
    made.remove()


def uid_processes(uid: int) -> list[str]:
    """`pid comm` of every process running as `uid` (in the host's view)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry.name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            found.append(f"{entry.name} {fields.get('Name', '').strip()}")
    return found


def sleepers(uid: int) -> list[int]:
    """The workload's `busybox sleep 1000` processes."""
    found = []
    for p in uid_processes(uid):
        pid = p.split()[0]
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().endswith(b"sleep\x001000\x00"):
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.fixture(autouse=True)
def _no_process_outlives_a_test(user: Unprivileged) -> Iterator[None]:
    """A failed test's processes must not fail the next one (the test checks first)."""
    yield
    for p in uid_processes(user.uid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(p.split()[0]), signal.SIGKILL)


def check_clean(user: Unprivileged) -> None:
    """Nothing of a run is left: no process of the uid, nothing in its TMPDIR."""
    deadline = time.monotonic() + 5
    while uid_processes(user.uid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert uid_processes(user.uid) == []
    assert sorted(os.listdir(user.tmpdir)) == []


def layout(user: Unprivileged, name: str, layers: list[bytes], config: dict) -> str:
    """An OCI layout the user owns; its `oci:` reference (tag v1)."""
    path = user.home / name
    f.write_layout(path, "v1", layers, config)
    user.give(path)
    return f"oci:{path}:v1"


def layout_tocs(ref: str) -> list[dict]:
    _, path, tag = ref.split(":")
    [(_plat, _desc, manifest)] = f.platform_manifests(path, tag)
    return [our_toc(f.blob_path(path, x["digest"])) for x in manifest["layers"]]


@pytest.fixture(scope="module")
def kinds(user: Unprivileged, busybox_layer: Path) -> str:
    l1 = ai.layer([ai.script("app/run.sh", RUN_SH), ai.file("app/a.txt", "alpha-lower\n"),
                   ai.file("app/b.txt", "bravo\n")])
    l2 = ai.layer([ai.file("app/a.txt", "alpha-upper\n"), ai.file("app/c.txt", "charlie\n")])
    return layout(user, "kinds", [busybox_layer.read_bytes(), l1, l2],
                  ai.config(["/bin/sh", "/app/run.sh", "exit"]))


@pytest.mark.parametrize("kind", list(KINDS))
def test_workload_kinds(kind: str, kinds: str, user: Unprivileged) -> None:
    flags, want, period, ending, printed = KINDS[kind]
    record = user.home / f"record-{kind}.jsonl"
    dst = f"{kinds.rsplit(':', 1)[0]}:{kind}"
    how = ["--runner", "rootless"] if kind == "line" else []  # else chosen: not root
    t0 = time.monotonic()
    res = user.run("optimize", "--oci", "--period", str(period), "--record-out", record,
                   *how, *flags, kinds, dst)
    elapsed = time.monotonic() - t0
    printed_digest(res)
    assert "rootless" in res.stderr, res.stderr
    assert printed in res.stderr and printed not in res.stdout
    assert ended_by(res.stderr) == ending, res.stderr
    if kind == "exit":
        assert elapsed < period - 2, f"a workload that exits at once took {elapsed:.1f}s"
    elif kind == "period":
        assert period <= elapsed < period + 15, elapsed
    else:
        assert elapsed < 15, f"--wait-on-line READY: the run took {elapsed:.1f}s of {period}"
    check_clean(user)
    rec = [json.loads(x) for x in record.read_text().splitlines()]
    got = [(r["path"], r["layerIndex"]) for r in rec]
    assert len(got) == len(set(got)) and set(got) == want, got
    assert got.index(BB) < got.index(("app/run.sh", 1)) < got.index(("app/a.txt", 2))
    assert [prioritized_files(t) for t in layout_tocs(dst)] == expected_prioritized(rec, 3)

    # the optimized image runs (rootless as well)
    again = user.run("analyze", "--period", "10", "--record-out", user.home / "again.jsonl",
                     dst)
    assert again.returncode == 0, again.stderr
    for line in KIND_OUTPUT.splitlines():
        assert line in again.stderr, again.stderr
    check_clean(user)


@pytest.fixture
def host_secret() -> Iterator[tuple[Path, str]]:
    token = f"HOSTSECRET-{secrets.token_hex(8)}"
    path = Path(f"/tmp/estargz-opt-secret-{secrets.token_hex(6)}")
    path.write_text(f"{token}\nsecretuser:x:4242:4242::/:/bin/sh\n")
    path.chmod(0o644)  # readable by the unprivileged user: only the design keeps it out
    old = time.time() - 3600
    os.utime(path, (old, path.stat().st_mtime))
    yield path, token
    path.unlink()


def test_hostile_symlinks(user: Unprivileged, busybox_layer: Path,
                          host_secret: tuple[Path, str]) -> None:
    secret, token = host_secret
    atime = secret.stat().st_atime
    hostile = [
        ai.symlink("app/shadow", "/etc/shadow"),
        ai.symlink("app/abs", "/etc/hostname"),
        ai.symlink("app/rel", "../../../../../../etc/passwd"),
        ai.symlink("app/secret", str(secret)),
        ai.symlink("etc/passwd", str(secret)),
        ai.symlink("etc/group", str(secret)),
        ai.script("app/h.sh", "cat /app/shadow /app/abs /app/rel /app/secret\n"
                              "echo \"ID=$(/bin/busybox id)\"\necho h-done\n"),
    ]
    raw = [busybox_layer.read_bytes(), ai.layer(hostile)]
    src = layout(user, "hostile", raw, ai.config(["/bin/sh", "/app/h.sh"]))
    names = set().union(*map(ai.layer_names, raw))
    record = user.home / "hostile.jsonl"
    res = user.run("optimize", "--oci", "--period", "10", "--record-out", record, src,
                   f"{src.rsplit(':', 1)[0]}:esgz")
    printed_digest(res)
    assert "h-done" in res.stderr and token not in res.stderr + res.stdout
    rec = {(r["path"], r["layerIndex"]) for r in map(json.loads, record.read_text().split())}
    assert {p for p, _ in rec} <= names, rec
    assert ("app/h.sh", 1) in rec
    res = user.run("analyze", src, "--record-out", record, "--period", "10",
                   "--user", "secretuser")
    assert token not in res.stderr + res.stdout and "id=4242" not in res.stderr
    msg = error_message(res)
    assert "secretuser" in msg and "/etc/passwd" in msg, msg
    check_clean(user)
    assert secret.stat().st_atime == atime, "estargz-opt or the workload read the host secret"
    secret.read_text()
    assert secret.stat().st_atime != atime, "this filesystem does not update atime on read"


def test_dotdot_tar_entry(user: Unprivileged, busybox_layer: Path) -> None:
    """`../../../../../tmp/NAME` lands in the rootfs's /tmp, never in the host's (which
    the unprivileged user could write), and is recorded as tmp/NAME."""
    escape = f"estargz-opt-escape-{secrets.token_hex(6)}"
    bad = ai.layer([ai.file(f"../../../../../tmp/{escape}", "escaped\n"),
                    ai.dir_("app"), ai.file("app/ok.txt", "ok\n")], add_parents=False)
    src = layout(user, "dotdot", [busybox_layer.read_bytes(), bad],
                 ai.config(["/bin/cat", "/app/ok.txt", f"/tmp/{escape}"]))
    record = user.home / "dotdot.jsonl"
    res = user.run("analyze", src, "--record-out", record, "--period", "5")
    assert not Path("/tmp", escape).exists(), "a .. entry escaped the rootfs"
    assert res.returncode == 0, res.stderr
    assert [x for x in res.stderr.splitlines() if x in ("ok", "escaped")] == ["ok", "escaped"]
    rec = [(r["path"], r["layerIndex"]) for r in map(json.loads, record.read_text().split())]
    assert rec == [BB, ("app/ok.txt", 1), (f"tmp/{escape}", 1)]
    check_clean(user)


# --- several ids ------------------------------------------------------------------

IDS_SH = "stat -c 'owner=%u:%g' /srv/data\ncat /srv/data\n/bin/busybox id\necho ids-done\n"


@pytest.fixture(scope="module")
def owned(user: Unprivileged, busybox_layer: Path) -> str:
    layer = ai.layer([ai.file("srv/data", "d\n", owner=1000), ai.script("app/ids.sh", IDS_SH)])
    return layout(user, "owned", [busybox_layer.read_bytes(), layer],
                  ai.config(["/bin/sh", "/app/ids.sh"]))


def _no_subuid_range(user: Unprivileged) -> None:
    for etc in ("/etc/subuid", "/etc/subgid"):
        if Path(etc).exists():
            assert not any(line.split(":")[0] in (str(user.uid), "estargz-test")
                           for line in Path(etc).read_text().splitlines()), etc


@pytest.mark.parametrize("bounding", ["kept", "empty"])
def test_one_id_without_a_subordinate_range(bounding: str, owned: str,
                                            user: Unprivileged) -> None:
    """No /etc/subuid range (or an empty bounding set, where newuidmap cannot work): every
    file is the caller's, the workload runs as root of the namespace, said in one line;
    a workload whose user is not root is refused, naming --user 0."""
    _no_subuid_range(user)
    res = user.run("analyze", "--period", "10", "--record-out", user.home / "o.jsonl", owned,
                   setuid_helpers=bounding == "kept")
    assert res.returncode == 0, res.stderr
    why = (f"uid {user.uid} has no range in /etc/subuid" if bounding == "kept"
           else "newuidmap cannot work without CAP_SETUID and CAP_SETGID")
    said = [x for x in res.stderr.splitlines() if "rootless run with only your own id" in x]
    assert len(said) == 1 and why in said[0] and "ignore_chown_errors" in said[0], said
    assert "owner=0:0" in res.stderr and "uid=0 gid=0" in res.stderr, res.stderr
    assert "ids-done" in res.stderr
    rec = {json.loads(x)["path"] for x in (user.home / "o.jsonl").read_text().split()}
    assert {"srv/data", "app/ids.sh"} <= rec, rec
    check_clean(user)

    res = user.run("analyze", "--record-out", user.home / "o.jsonl", "--user", "1000", owned,
                   setuid_helpers=bounding == "kept")
    msg = error_message(res)
    assert msg.startswith("cannot run the workload rootless: the workload runs as uid 1000 "
                          "(its User, or --user; --user 0 runs it as root of the namespace), "
                          "and only your own id can be mapped: "), msg
    assert why in msg and "--record-in" in msg, msg
    check_clean(user)


def test_one_id_without_newuidmap(owned: str, user: Unprivileged) -> None:
    bin_dir = user.home / "bin-no-uidmap"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("runc", "crun", "nsenter"):
        link = bin_dir / tool
        if not link.exists():
            link.symlink_to(subprocess.run(["which", tool], capture_output=True, text=True,
                                           check=True).stdout.strip())
    res = user.run("analyze", "--period", "10", "--record-out", user.home / "o.jsonl", owned,
                   env=user.env(PATH=str(bin_dir)))
    assert res.returncode == 0, res.stderr
    assert "newuidmap and newgidmap (apt-get install uidmap) are not installed" in res.stderr
    assert "owner=0:0" in res.stderr and "ids-done" in res.stderr, res.stderr
    check_clean(user)


def test_one_id_under_no_new_privs(owned: str, user: Unprivileged) -> None:
    """An /etc/subuid range, but no_new_privs (Kubernetes' allowPrivilegeEscalation:
    false): setuid newuidmap gains nothing, so the run maps one id and says why."""
    argv = user.argv("analyze", "--period", "10", "--record-out", user.home / "n.jsonl",
                     owned, setuid_helpers=True)
    argv.insert(argv.index("--"), "--no-new-privs")
    res = subprocess.run(user.with_subids(argv), capture_output=True, text=True,
                         env=user.env(), timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert ("rootless run with only your own id (newuidmap cannot gain privileges under "
            "no_new_privs)") in res.stderr, res.stderr
    assert "owner=0:0" in res.stderr and "ids-done" in res.stderr, res.stderr
    check_clean(user)


DEBIAN_SH = ("stat -c 'owner=%u:%g %n' /usr/bin/chage /var/cache/lighttpd /home/app/notes\n"
             "cat /usr/bin/chage /etc/lighttpd/lighttpd.conf /home/app/notes > /dev/null\n"
             "/bin/busybox ls /usr/share/doc/passwd\necho debian-done\n")


def test_one_id_debian_image(user: Unprivileged, busybox_layer: Path, tmp_path: Path) -> None:
    """Debian's own layers (passwd: root:shadow, lighttpd: www-data) and an app's files
    (uid 1000, mode 0600), run as an unprivileged uid with no /etc/subuid range and no
    capability at all (setpriv --inh-caps=-all --bounding-set=-all): the rootless runner
    records the same (layer, path) set as the runc runner as root."""
    _no_subuid_range(user)
    passwd, lighttpd = deb_layer("passwd"), deb_layer("lighttpd")
    assert (0, 42) in owners(passwd) and (33, 33) in owners(lighttpd)
    app = ai.layer([ai.script("app/debian.sh", DEBIAN_SH),
                    ai.file("home/app/notes", "n\n", mode=0o600, owner=1000)])
    src = layout(user, "debian", [busybox_layer.read_bytes(), passwd, lighttpd, app],
                 ai.config(["/bin/sh", "/app/debian.sh"]))
    record = user.home / "debian.jsonl"
    res = user.run("optimize", "--oci", "--period", "10", "--record-out", record, src,
                   f"{src.rsplit(':', 1)[0]}:esgz")
    printed_digest(res)
    assert "--bounding-set=-all" in user.argv()
    assert "rootless run with only your own id (newuidmap cannot work" in res.stderr
    for path in ("/usr/bin/chage", "/var/cache/lighttpd", "/home/app/notes"):
        assert f"owner=0:0 {path}" in res.stderr, res.stderr
    assert "debian-done" in res.stderr
    check_clean(user)

    runc_record = tmp_path / "runc.jsonl"
    res = run_cli("analyze", "--runner", "runc", "--period", "10", "--record-out",
                  runc_record, src, env=cli_env(tmp_path, ESTARGZ_OPT_CACHE_DIR=str(tmp_path)))
    assert res.returncode == 0, res.stderr
    assert "owner=0:42 /usr/bin/chage" in res.stderr and "owner=33:33" in res.stderr

    def pairs(path: Path) -> set[tuple[int, str]]:
        return {(r["layerIndex"], r["path"]) for r in map(json.loads, path.read_text().split())}

    ours = pairs(record)
    assert ours == pairs(runc_record)
    assert {(1, "usr/bin/chage"), (2, "etc/lighttpd/lighttpd.conf"),
            (3, "home/app/notes")} <= ours, ours


def test_several_ids_from_subuid(owned: str, user: Unprivileged) -> None:
    """With an /etc/subuid range (bound over the host's in a private mount namespace for
    this test), newuidmap/newgidmap map it, the file keeps its owner and --user works."""
    argv = user.argv("analyze", "--record-out", user.home / "s.jsonl", "--period", "10",
                     "--user", "1000:1000", owned, setuid_helpers=True)
    res = subprocess.run(user.with_subids(argv), capture_output=True, text=True,
                         env=user.env(), timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "owner=1000:1000" in res.stderr and "uid=1000 gid=1000" in res.stderr, res.stderr
    assert "ids-done" in res.stderr
    check_clean(user)


def test_image_larger_than_memory(kinds: str, user: Unprivileged) -> None:
    """MemAvailable below the layers' size (a /proc/meminfo saying 1 MiB, bound over the
    host's in a private mount namespace): refused up front, in one line."""
    meminfo = user.home / "meminfo"
    meminfo.write_text("".join(
        "MemAvailable:       1024 kB\n" if line.startswith("MemAvailable:") else line + "\n"
        for line in Path("/proc/meminfo").read_text().splitlines()))
    meminfo.chmod(0o644)
    argv = user.argv("analyze", "--record-out", user.home / "m.jsonl", kinds)
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          f'mount --bind {meminfo} /proc/meminfo && exec "$@"', "sh", *argv],
                         capture_output=True, text=True, env=user.env(), timeout=60,
                         check=False)
    msg = error_message(res)
    assert re.match(r"cannot run the workload rootless: the image \(its layers alone \d+ "
                    r"MiB\) does not fit in memory", msg), msg
    assert "(MemAvailable 1 MiB)" in msg and "--record-in" in msg, msg
    check_clean(user)


def test_cni_is_refused(kinds: str, user: Unprivileged) -> None:
    res = user.run("analyze", "--record-out", user.home / "c.jsonl", "--cni", kinds)
    msg = error_message(res)
    assert msg.startswith("--cni needs root"), msg
    check_clean(user)


def test_runtime_crun(kinds: str, user: Unprivileged) -> None:
    """--runtime crun (rootless, without cgroups), on this hybrid host as it is (crun
    refuses one with controllers left on v2: the runner hides its cgroups from crun).
    That crun ran is read from its state in the run directory: crun keeps `status`."""
    err = user.home / "err-crun"
    proc = _start(user, "analyze", "--runtime", "crun", "--period", "3", "--record-out",
                  user.home / "crun.jsonl", *SLEEPER, kinds, err=err)
    _wait_for(err, "sleeping", proc)
    states = {p.name for p in user.tmpdir.glob(f"{SAMPLE}*/runtime/*/*")}
    proc.communicate(timeout=60)
    assert proc.returncode == 0, err.read_text()
    assert "status" in states and "state.json" not in states, states
    check_clean(user)


# --- cleanup ----------------------------------------------------------------------


def _start(user: Unprivileged, *args: str | Path, err: Path) -> subprocess.Popen:
    with open(err, "wb") as stream:
        return subprocess.Popen(user.argv(*args), env=user.env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=stream, start_new_session=True)


def _wait_for(err: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in err.read_text(errors="replace"):
        assert proc.poll() is None, err.read_text()
        assert time.monotonic() < deadline, err.read_text()
        time.sleep(0.1)


SLEEPER = ["--args", '["/bin/sh","/app/run.sh","sleep"]']


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c", "workload-killed"])
def test_cleanup_after_interruption(how: str, kinds: str, user: Unprivileged) -> None:
    err = user.home / f"err-{how}"
    proc = _start(user, "analyze", "--period", "60", "--record-out", user.home / "i.jsonl",
                  *SLEEPER, kinds, err=err)
    _wait_for(err, "sleeping", proc)
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    elif how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        deadline = time.monotonic() + 10
        while not sleepers(user.uid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sleepers(user.uid), uid_processes(user.uid)
        for pid in sleepers(user.uid):
            os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    if how == "workload-killed":
        assert "the workload exited" in err.read_text(), err.read_text()
    else:
        assert proc.returncode != 0
    check_clean(user)


def test_kill_9_is_reaped_by_the_next_run(kinds: str, user: Unprivileged) -> None:
    err = user.home / "err-kill9"
    proc = _start(user, "analyze", "--period", "60", "--record-out", user.home / "k.jsonl",
                  *SLEEPER, kinds, err=err)
    _wait_for(err, "sleeping", proc)
    proc.kill()
    proc.wait()
    time.sleep(0.5)
    assert sleepers(user.uid), uid_processes(user.uid)  # what the dead run left
    assert any(n.startswith(SAMPLE) for n in os.listdir(user.tmpdir))
    res = user.run("analyze", "--period", "2", "--record-out", user.home / "n.jsonl", kinds)
    assert res.returncode == 0, res.stderr
    assert "left by a run that was killed" in res.stderr, res.stderr
    check_clean(user)
