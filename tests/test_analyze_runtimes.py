"""`--runtime` with both runners: containerd's (the runc shim's BinaryName option) and the
runc runner (the runtime's own CLI).

- crun (Debian's): that crun, not runc, ran the container is read from the runtime's
  state directory while the workload runs (crun keeps `status` there, runc `state.json`).
- a PATH (a wrapper that keeps each bundle's config.json): both runners hand the
  runtime the same spec, but for what names the run.

The host is used as it is: on a hybrid cgroup host whose v2 hierarchy still holds a
controller (this machine's init leaves hugetlb there), which crun refuses, the runners
run crun without cgroup v2 (`workload.cgroups`); the tests do nothing to the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import analyzeimages as ai, imagefactory as f
from support.analyzeimages import (
    BB,
    KIND_OUTPUT,
    RUN_SH,
    ended_by,
    expected_prioritized,
    pairs,
    prioritized,
    read_record,
)
from support.cli import cli_argv, cli_env, error_message
from support.containerd import SCRIPTS, Containerd, ctr_run
from support.leftovers import Leftovers
from support.runnerlib import (
    DAEMONLESS,
    STATE_ROOT,
    RunLeftovers,
    layout_prioritized,
    run_layout_image,
)
from support.runtimes import CRUN_HYBRID, refusing_runtime
from support.unprivileged import Unprivileged, make_unprivileged

pytestmark = [pytest.mark.interop, pytest.mark.root]

WANT = {BB, ("app/run.sh", 1), ("app/a.txt", 2), ("app/b.txt", 1)}
SLEEP = ["--args", '["/bin/sh","/app/run.sh","sleep"]']
#: where containerd's runc shim keeps its runtime's state (namespace "default")
SHIM_ROOT = "/run/containerd/runc/default"


@pytest.fixture(scope="module")
def layers(busybox_layer: Path) -> list[bytes]:
    l1 = ai.layer([ai.script("app/run.sh", RUN_SH), ai.file("app/a.txt", "alpha-lower\n"),
                   ai.file("app/b.txt", "bravo\n")])
    l2 = ai.layer([ai.file("app/a.txt", "alpha-upper\n"), ai.file("app/c.txt", "charlie\n")])
    return [busybox_layer.read_bytes(), l1, l2]


CONFIG = ai.config(["/bin/sh", "/app/run.sh", "exit"])


def _run_watching(argv: list[str], env: dict[str, str], root: str,
                  tmp_path: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run the CLI; meanwhile, the files in the sample container's state directory (this
    run's: its spec names our TMPDIR; other runs on this machine share the state root)."""
    before = set(Path(root).iterdir()) if Path(root).is_dir() else set()
    err = tmp_path / "err"
    with open(err, "wb") as e:
        proc = subprocess.Popen([*cli_argv(), *argv], env=env,
                                stdout=subprocess.PIPE, stderr=e, stdin=subprocess.DEVNULL)
    seen: set[str] = set()
    while proc.poll() is None:
        with contextlib.suppress(OSError):  # the directory goes when the run ends
            for d in set(Path(root).iterdir()) - before:
                if d.name.startswith("estargz-opt-sample-") and d.is_dir() and any(
                        env["TMPDIR"] in (d / spec).read_text(errors="replace")
                        for spec in ("config.json", "state.json") if (d / spec).exists()):
                    seen |= {p.name for p in d.iterdir()}
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(),
                                       err.read_text()), seen


def test_crun_with_the_containerd_runner(containerd, layers: list[bytes],
                                         tmp_path: Path) -> None:
    img = ai.build(containerd, tmp_path / "img", "localhost/analyze-crun:1", layers, CONFIG)
    record = tmp_path / "r.jsonl"
    dst = "localhost/analyze-crun:1-esgz"
    env = cli_env(tmp_path, CONTAINERD_ADDRESS=containerd.address)
    res, seen = _run_watching(["optimize", "--oci", "--runtime", "crun", "--period", "3",
                               "--record-out", str(record), *SLEEP, img.name, dst],
                              env, SHIM_ROOT, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "status" in seen and "state.json" not in seen, f"not crun's state: {seen}"
    assert ended_by(res.stderr) == "the --period elapsed"
    rec = read_record(record)
    assert set(pairs(rec)) == WANT
    assert prioritized(containerd, dst) == expected_prioritized(rec, 3)
    assert ctr_run(containerd, dst) == KIND_OUTPUT


@pytest.mark.parametrize("runner", list(DAEMONLESS))
def test_crun_with_the_daemonless_runners(runner: str, layers: list[bytes],
                                          tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    f.write_layout(layout, "v1", layers, CONFIG)
    leftovers = RunLeftovers(tmp_path / "tmpdir")
    record = tmp_path / "r.jsonl"
    res, seen = _run_watching(["optimize", "--oci", *DAEMONLESS[runner], "--runtime", "crun",
                               "--period", "3", "--record-out", str(record), *SLEEP,
                               f"oci:{layout}:v1", f"oci:{layout}:esgz"],
                              cli_env(leftovers.tmpdir), STATE_ROOT, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "status" in seen and "state.json" not in seen, f"not crun's state: {seen}"
    assert ended_by(res.stderr) == "the --period elapsed"
    leftovers.check()
    rec = read_record(record)
    assert set(pairs(rec)) == WANT
    assert layout_prioritized(layout, "esgz") == expected_prioritized(rec, 3)
    assert run_layout_image(layout, "esgz", tmp_path) == KIND_OUTPUT
    assert json.loads((layout / "index.json").read_text())["manifests"]


def _spy_runtime(path: Path, out: Path) -> Path:
    """A runtime (`--runtime PATH`) that keeps a copy of each bundle's config.json it is
    asked to create, then runs runc with the same arguments."""
    path.write_text(
        "#!/bin/sh\n"
        'prev=""; for a in "$@"; do\n'
        f'  if [ "$prev" = "--bundle" ]; then cp "$a/config.json" "{out}/$$.json"; fi\n'
        '  prev="$a"\n'
        "done\n"
        'exec runc "$@"\n'
    )
    path.chmod(0o755)
    out.mkdir()
    return path


def _normalized(spec: dict) -> dict:
    """A spec without what names this run (paths of its directory, ids, owner)."""
    spec = json.loads(json.dumps(spec))
    spec["root"].pop("path")
    spec.pop("annotations", None)
    spec["linux"].pop("cgroupsPath")
    for ns in spec["linux"]["namespaces"]:
        if ns["type"] == "mount":
            assert ns.pop("path").startswith("/proc/")
    for m in spec["mounts"]:
        if m["destination"] in ("/etc/hosts", "/etc/resolv.conf"):
            assert m.pop("source").endswith(m["destination"])
    return spec


def test_both_runners_give_the_same_spec_and_take_a_runtime_path(
    containerd, layers: list[bytes], tmp_path: Path
) -> None:
    """--runtime PATH in both runners; the spec the runtime is given is the same."""
    img = ai.build(containerd, tmp_path / "img", "localhost/analyze-spec:1", layers, CONFIG)
    layout = tmp_path / "layout"
    f.write_layout(layout, "v1", layers, CONFIG)
    flags = ["--period", "5", "--env", "A=1", "--user", "0:0", "--cwd", "/app",
             "--mount", f"type=bind,source={tmp_path},destination=/data,options=rbind:ro"]
    specs = {}
    for runner, src in (("containerd", img.name), ("runc", f"oci:{layout}:v1")):
        out = tmp_path / f"specs-{runner}"
        spy = _spy_runtime(tmp_path / f"spy-{runner}", out)
        env = cli_env(tmp_path, CONTAINERD_ADDRESS=containerd.address)
        res = subprocess.run(
            [*cli_argv(), "analyze", "--runner", runner, "--runtime",
             str(spy), *flags, "--record-out", str(tmp_path / f"{runner}.jsonl"), src],
            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "done-exit" in res.stderr
        [copied] = list(out.iterdir())
        specs[runner] = json.loads(copied.read_text())
    assert specs["runc"]["linux"]["cgroupsPath"].startswith("/estargz-opt/estargz-opt-sample-")
    assert specs["containerd"]["linux"]["cgroupsPath"].startswith("/default/estargz-opt-sample-")
    assert _normalized(specs["runc"]) == _normalized(specs["containerd"])


# --- a workload that cannot start fails the run -------------------------------------------

#: cause -> (flags that make it happen, given a scratch directory; what the error names)
CANNOT_START = {
    "missing entrypoint": (lambda d: ["--entrypoint", '["/no/such/binary"]'],
                           ("/no/such/binary",)),
    "runtime exits 1 at create": (lambda d: ["--runtime", str(refusing_runtime(d / "exits-1"))],
                                  ("exits-1", "exit status 1")),
    "crun refuses the host": (
        lambda d: ["--runtime", str(refusing_runtime(d / "crun", CRUN_HYBRID))],
        ("cgroups in hybrid mode not supported",)),
}


@pytest.mark.parametrize("cause", list(CANNOT_START))
@pytest.mark.parametrize("runner", ["containerd", *DAEMONLESS])
def test_a_workload_that_cannot_start_fails_the_run(
    runner: str, cause: str, containerd, layers: list[bytes], tmp_path: Path
) -> None:
    """Exit 1, one line with the cause, and nothing written or left: no destination, no
    record, no container, task, snapshot, lease, cgroup, mount or process."""
    make_flags, named = CANNOT_START[cause]
    record = tmp_path / "r.jsonl"
    common = ["optimize", "--oci", "--period", "5", "--record-out", str(record),
              *make_flags(tmp_path)]
    if runner == "containerd":
        img = ai.build(containerd, tmp_path / "img", "localhost/analyze-nostart:1", layers,
                       CONFIG)
        ours = Leftovers(containerd, tmp_path / "tmpdir")
        env = cli_env(ours.tmpdir, CONTAINERD_ADDRESS=containerd.address)
        argv = [*common, img.name, "localhost/analyze-nostart:1-esgz"]
    else:
        layout = tmp_path / "layout"
        f.write_layout(layout, "v1", layers, CONFIG)
        index = (layout / "index.json").read_text()
        leftovers = RunLeftovers(tmp_path / "tmpdir")
        env = cli_env(leftovers.tmpdir)
        argv = [*common, *DAEMONLESS[runner], f"oci:{layout}:v1", f"oci:{layout}:esgz"]
    started = time.monotonic()
    res = subprocess.run([*cli_argv(), *argv], capture_output=True,
                         text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
    msg = error_message(res)
    assert res.returncode == 1
    assert msg.startswith("the workload could not start: "), msg
    assert all(word in msg for word in named), msg
    assert time.monotonic() - started < 5 + 30, "it waited for the --period"
    assert "done-exit" not in res.stderr
    assert not record.exists()
    if runner == "containerd":
        ours.check()  # no new image either
    else:
        leftovers.check()
        assert (layout / "index.json").read_text() == index


@pytest.mark.parametrize("runner", ["containerd", *DAEMONLESS])
def test_crun_records_what_runc_records(runner: str, containerd, layers: list[bytes],
                                        tmp_path: Path) -> None:
    """On this host as it is (hybrid, hugetlb on cgroup v2), crun records the same
    (layer, path) set as runc, in each runner."""
    if runner == "containerd":
        src = ai.build(containerd, tmp_path / "img", "localhost/analyze-crun-runc:1", layers,
                       CONFIG).name
        flags = ["--runner", "containerd"]
    else:
        layout = tmp_path / "layout"
        f.write_layout(layout, "v1", layers, CONFIG)
        src, flags = f"oci:{layout}:v1", DAEMONLESS[runner]
    records = {}
    for runtime in ("runc", "crun"):
        record = tmp_path / f"{runtime}.jsonl"
        res = subprocess.run(
            [*cli_argv(), "analyze", *flags, "--runtime", runtime,
             "--period", "10", "--record-out", str(record), src],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
            env=cli_env(tmp_path, CONTAINERD_ADDRESS=containerd.address))
        assert res.returncode == 0, res.stderr
        assert ended_by(res.stderr) == "the workload exited", res.stderr
        records[runtime] = set(pairs(read_record(record)))
    assert records["crun"] == records["runc"] == {BB, ("app/run.sh", 1), ("app/a.txt", 2)}


#: cgroup layout -> what makes this host look like it, in a private mount namespace (the
#: controllers stay where the host's init bound them; the runtimes read the layout from
#: /sys/fs/cgroup)
CGROUP_LAYOUTS = {
    "v1": "umount /sys/fs/cgroup/unified",
    "hybrid": "true",  # this host as it is: hugetlb on v2
    "unified": "umount -R /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup",
}


@pytest.mark.parametrize("runtime", ["runc", "crun"])
@pytest.mark.parametrize("layout_name", list(CGROUP_LAYOUTS))
def test_each_runtime_on_each_cgroup_layout(runtime: str, layout_name: str,
                                            layers: list[bytes], tmp_path: Path) -> None:
    """The runc runner with runc and crun, on a host that shows cgroup v1 only, this
    hybrid host, and a unified one: the same record, nothing left."""
    if not Path("/sys/fs/cgroup/unified/cgroup.controllers").exists():
        pytest.skip("the layouts are made from a hybrid host's")
    layout = tmp_path / "layout"
    f.write_layout(layout, "v1", layers, CONFIG)
    leftovers = RunLeftovers(tmp_path / "tmpdir")
    record = tmp_path / "r.jsonl"
    argv = [*cli_argv(), "analyze", "--runner", "runc", "--runtime",
            runtime, "--period", "10", "--record-out", str(record), f"oci:{layout}:v1"]
    script = f'{CGROUP_LAYOUTS[layout_name]} || exit 97\nexec "$@"'
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
        env=cli_env(leftovers.tmpdir))
    if runtime == "crun" and layout_name == "unified" and not _can_raise_memlock():
        # crun's cgroup v2 device filter (eBPF) raises RLIMIT_MEMLOCK to infinity first,
        # which takes CAP_SYS_RESOURCE (this machine's root lacks it) or an unlimited
        # hard limit: the run fails in one line naming that, as any refusal does.
        msg = error_message(res)
        assert "could not start" in msg and "RLIM_MEMLOCK" in msg, msg
        assert not record.exists()
    else:
        assert res.returncode == 0, res.stderr
        assert ended_by(res.stderr) == "the workload exited", res.stderr
        assert set(pairs(read_record(record))) == {BB, ("app/run.sh", 1), ("app/a.txt", 2)}
    leftovers.check()


def _can_raise_memlock() -> bool:
    """CAP_SYS_RESOURCE in our effective set, or no hard limit on locked memory."""
    caps = next(int(line.split()[1], 16) for line in
                Path("/proc/self/status").read_text().splitlines()
                if line.startswith("CapEff:"))
    return bool(caps & (1 << 24)) or \
        resource.getrlimit(resource.RLIMIT_MEMLOCK)[1] == resource.RLIM_INFINITY


@pytest.fixture(scope="module")
def user() -> Iterator[Unprivileged]:
    made = make_unprivileged()
    yield made
    made.remove()


@pytest.mark.parametrize("cause", list(CANNOT_START))
def test_a_workload_that_cannot_start_fails_the_rootless_run(
    cause: str, user: Unprivileged, layers: list[bytes], tmp_path: Path
) -> None:
    """The same as root, as an unprivileged user with the rootless runner."""
    make_flags, named = CANNOT_START[cause]
    scratch = user.home / f"nostart-{len(list(user.home.iterdir()))}"
    scratch.mkdir()
    layout = scratch / "layout"
    f.write_layout(layout, "v1", layers, CONFIG)
    flags = make_flags(scratch)
    user.give(scratch)
    index = (layout / "index.json").read_text()
    record = scratch / "r.jsonl"
    res = user.run("optimize", "--oci", "--runner", "rootless", "--period", "5",
                   "--record-out", record, *flags, f"oci:{layout}:v1", f"oci:{layout}:esgz")
    msg = error_message(res)
    assert res.returncode == 1
    assert msg.startswith("the workload could not start: "), msg
    assert all(word in msg for word in named), msg
    assert not record.exists() and (layout / "index.json").read_text() == index
    assert os.listdir(user.tmpdir) == []


@pytest.fixture(scope="module", params=list(CGROUP_LAYOUTS))
def containerd_on_layout(request, tmp_path_factory) -> Iterator[tuple[str, Containerd]]:
    """A private containerd started in a mount namespace that shows one cgroup layout:
    its shims, and the runtimes they run, see that layout."""
    if not Path("/sys/fs/cgroup/unified/cgroup.controllers").exists():
        pytest.skip("the layouts are made from a hybrid host's")
    directory = tmp_path_factory.mktemp("ctrd-layout", numbered=True)
    script = f'{CGROUP_LAYOUTS[request.param]} || exit 97\nexec bash "$@"'
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                    "sh", str(SCRIPTS / "containerd-up.sh"), str(directory)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=90)
    daemon = Containerd(directory)
    try:
        yield request.param, daemon
    finally:
        daemon.stop()


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_each_runtime_on_each_cgroup_layout_in_containerd(
    runtime: str, containerd_on_layout: tuple[str, Containerd], layers: list[bytes],
    tmp_path: Path
) -> None:
    """The containerd runner with runc and crun, containerd seeing cgroup v1 only, this
    hybrid host, or a unified one: the same record, nothing left."""
    layout_name, c = containerd_on_layout
    img = ai.build(c, tmp_path / "img", f"localhost/analyze-layout-{runtime}:1", layers,
                   CONFIG)
    ours = Leftovers(c, tmp_path / "tmpdir")
    record = tmp_path / "r.jsonl"
    res = subprocess.run(
        [*cli_argv(), "analyze", "--runtime", runtime, "--period",
         "10", "--record-out", str(record), img.name],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
        env=cli_env(ours.tmpdir, CONTAINERD_ADDRESS=c.address))
    if runtime == "crun" and layout_name == "unified" and not _can_raise_memlock():
        msg = error_message(res)  # as in the runc runner: see there
        assert "could not start" in msg and "RLIM_MEMLOCK" in msg, msg
        assert not record.exists()
    else:
        assert res.returncode == 0, res.stderr
        assert ended_by(res.stderr) == "the workload exited", res.stderr
        assert set(pairs(read_record(record))) == {BB, ("app/run.sh", 1), ("app/a.txt", 2)}
    ours.check()
