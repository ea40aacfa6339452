"""Each step of the sample container's spec on its own, and the order they run in.

Every test starts from containerd's default spec and applies one step (or a few, to pin
an order), so a step that does too much or too little shows up here by name, while
tests/test_spec.py checks the whole spec.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from estargz_opt.errors import BadInputError
from estargz_opt.workload.options import SamplerOptions
from estargz_opt.workload.spec import DEFAULT_PATH_ENV, Spec, SpecInputs, default_spec, steps

pytestmark = pytest.mark.unit

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n"
GROUP = "root:x:0:\nappgrp:x:1001:\nextra:x:2000:app\n"
HOOK = "/usr/bin/nvidia-container-runtime-hook"


@pytest.fixture
def rootfs(tmp_path: Path) -> str:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    return str(root)


def inputs(rootfs: str, config: dict | None = None, **kw: object) -> SpecInputs:
    fields = {k: kw.pop(k) for k in list(kw) if k in SpecInputs.__dataclass_fields__}
    cfg = {"config": config if config is not None else {"Cmd": ["/bin/true"]}}
    return SpecInputs(cfg, SamplerOptions(**kw), rootfs, **fields)  # type: ignore[arg-type]


def fresh(rootfs: str) -> Spec:
    return default_spec(rootfs, "", None)


def applied(inp: SpecInputs, *run: steps.Step) -> Spec:
    spec = fresh(inp.rootfs)
    for step in run:
        step(spec, inp)
    return spec


def test_the_list_of_steps_is_ctr_remotes_order() -> None:
    assert [s.__name__ for s in steps.STEPS] == [
        "apply_image_config", "apply_env", "apply_mounts", "apply_etc_files", "apply_args",
        "apply_env_file", "apply_user", "apply_cwd", "apply_tty", "apply_network",
        "apply_gpus", "apply_namespaces",
    ]  # fmt: skip


def test_default_spec_is_fresh_each_time(rootfs: str) -> None:
    a, b = fresh(rootfs), fresh(rootfs)
    a["mounts"].append({"destination": "/x"})
    a["linux"]["namespaces"][0]["path"] = "/p"
    a["process"]["capabilities"]["bounding"].append("CAP_SYS_ADMIN")
    assert len(b["mounts"]) == 7
    assert "path" not in b["linux"]["namespaces"][0]
    assert "CAP_SYS_ADMIN" not in b["process"]["capabilities"]["bounding"]
    assert "cgroupsPath" not in b["linux"] and "hostname" not in b
    c = default_spec(rootfs, "h", "/ns/id")
    assert c["hostname"] == "h" and c["linux"]["cgroupsPath"] == "/ns/id"


def test_image_config(rootfs: str) -> None:
    cfg = {"Env": ["A=1", "B=2", "A=3"], "WorkingDir": "/w", "User": "app", "Cmd": ["x"]}
    p = applied(inputs(rootfs, cfg), steps.apply_image_config)["process"]
    assert p["env"] == ["A=1", "B=2", "A=3"]  # the image's own list is taken as it is
    assert p["cwd"] == "/w"
    assert p["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [1001, 2000]}
    assert p["args"] == []  # the command is the args step's job
    p = applied(inputs(rootfs, {}), steps.apply_image_config)["process"]
    assert p["env"] == [DEFAULT_PATH_ENV] and p["cwd"] == "/"
    assert p["user"] == {"uid": 0, "gid": 0, "additionalGids": [0]}
    with pytest.raises(BadInputError, match="not in the image's /etc/passwd"):
        applied(inputs(rootfs, {"User": "ghost"}), steps.apply_image_config)


def test_image_user_is_read_from_files_root(tmp_path: Path, rootfs: str) -> None:
    # The rootfs path is the container's; the files are read where this process sees them.
    inp = inputs("/nowhere", {"User": "app"}, files_root=rootfs)
    assert applied(inp, steps.apply_image_config)["process"]["user"]["uid"] == 1000


def test_env(rootfs: str) -> None:
    inp = inputs(rootfs, {"Env": ["A=i", "B=i"]}, env=["B=f", "C=f", "A"])
    p = applied(inp, steps.apply_image_config, steps.apply_env)["process"]
    assert p["env"] == ["B=f", "C=f"]


def test_mounts_come_after_the_defaults(rootfs: str) -> None:
    inp = inputs(rootfs, mounts=["type=bind,src=/a,dst=/b,options=rbind:ro", "dst=/c"])
    mounts = applied(inp, steps.apply_mounts)["mounts"]
    assert len(mounts) == 9
    assert mounts[7:] == [
        {"destination": "/b", "type": "bind", "source": "/a", "options": ["rbind", "ro"]},
        {"destination": "/c"},
    ]


def test_etc_files(rootfs: str) -> None:
    assert len(applied(inputs(rootfs), steps.apply_etc_files)["mounts"]) == 7  # no etc_dir
    generated = applied(inputs(rootfs, etc_dir="/run/x"), steps.apply_etc_files)["mounts"][7:]
    assert [(m["destination"], m["source"], m["options"]) for m in generated] == [
        ("/etc/resolv.conf", "/run/x/resolv.conf", ["bind"]),
        ("/etc/hosts", "/run/x/hosts", ["bind"]),
    ]
    host = applied(inputs(rootfs, etc_dir="/run/x", net_host=True), steps.apply_etc_files)
    assert [(m["destination"], m["source"], m["options"]) for m in host["mounts"][7:]] == [
        ("/etc/hosts", "/etc/hosts", ["rbind", "ro"]),
        ("/etc/resolv.conf", "/etc/resolv.conf", ["rbind", "ro"]),
    ]


def test_args(rootfs: str) -> None:
    cfg = {"Entrypoint": ["/e"], "Cmd": ["c"]}
    assert applied(inputs(rootfs, cfg), steps.apply_args)["process"]["args"] == ["/e", "c"]
    inp = inputs(rootfs, cfg, entrypoint='["/s"]', args='["a","b"]')
    assert applied(inp, steps.apply_args)["process"]["args"] == ["/s", "a", "b"]
    with pytest.raises(BadInputError, match="no Entrypoint or Cmd"):
        applied(inputs(rootfs, {}), steps.apply_args)
    with pytest.raises(BadInputError, match="no Entrypoint or Cmd"):
        applied(inputs(rootfs, cfg, entrypoint="[]", args="[]"), steps.apply_args)


def test_env_file_wins_over_env(tmp_path: Path, rootfs: str) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("# c\n\nA=file\nD=file\n")
    inp = inputs(rootfs, {"Env": ["A=i"]}, env=["A=flag", "C=flag"], env_file=str(env_file))
    env_only = applied(inp, steps.apply_image_config, steps.apply_env)
    assert env_only["process"]["env"] == ["A=flag", "C=flag"]
    steps.apply_env_file(env_only, inp)
    assert env_only["process"]["env"] == ["A=file", "C=flag", "D=file"]
    untouched = applied(inputs(rootfs), steps.apply_env_file)
    assert untouched["process"]["env"] == []
    with pytest.raises(BadInputError, match="cannot read env_file"):
        applied(inputs(rootfs, env_file=str(tmp_path / "nope")), steps.apply_env_file)


def test_user_replaces_the_image_user(rootfs: str) -> None:
    inp = inputs(rootfs, {"User": "app"}, user="0:extra")
    user = applied(inp, steps.apply_image_config, steps.apply_user)["process"]["user"]
    assert user == {"uid": 0, "gid": 2000, "additionalGids": [2000]}
    same = applied(inputs(rootfs, {"User": "app"}), steps.apply_image_config, steps.apply_user)
    assert same["process"]["user"]["uid"] == 1000


def test_cwd(rootfs: str) -> None:
    inp = inputs(rootfs, {"WorkingDir": "/w"}, cwd="/tmp")
    assert applied(inp, steps.apply_image_config, steps.apply_cwd)["process"]["cwd"] == "/tmp"
    inp = inputs(rootfs, {"WorkingDir": "/w"})
    assert applied(inp, steps.apply_image_config, steps.apply_cwd)["process"]["cwd"] == "/w"


def test_tty_appends_term(rootfs: str) -> None:
    inp = inputs(rootfs, {"Env": ["TERM=dumb", "A=1"]}, terminal=True, stdin=True)
    p = applied(inp, steps.apply_image_config, steps.apply_tty)["process"]
    assert p["terminal"] is True
    assert p["env"] == ["TERM=dumb", "A=1", "TERM=xterm"]  # appended, not merged
    p = applied(inputs(rootfs, stdin=True), steps.apply_tty)["process"]
    assert p["terminal"] is False and p["env"] == []


def test_network(rootfs: str) -> None:
    def kinds(spec: Spec) -> dict[str, str | None]:
        return {n["type"]: n.get("path") for n in spec["linux"]["namespaces"]}

    host = applied(inputs(rootfs, net_host=True, netns_path="/n"), steps.apply_network)
    assert kinds(host) == {"pid": None, "ipc": None, "uts": None, "mount": None}
    cni = applied(inputs(rootfs, netns_path="/var/run/netns/n"), steps.apply_network)
    assert kinds(cni)["network"] == "/var/run/netns/n"
    assert [n for n, p in kinds(cni).items() if p] == ["network"]
    assert kinds(applied(inputs(rootfs), steps.apply_network))["network"] is None


def test_gpus(rootfs: str) -> None:
    inp = inputs(rootfs, {"Env": ["NVIDIA_VISIBLE_DEVICES=none"]}, gpus="0,2", gpu_hook=HOOK)
    spec = applied(inp, steps.apply_image_config, steps.apply_gpus)
    assert spec["process"]["env"] == [
        "NVIDIA_VISIBLE_DEVICES=0,2",
        "NVIDIA_DRIVER_CAPABILITIES=all",
    ]
    assert spec["hooks"] == {
        "prestart": [{"path": HOOK, "args": ["nvidia-container-runtime-hook", "prestart"]}]
    }
    assert "hooks" not in applied(inputs(rootfs, gpu_hook=HOOK), steps.apply_gpus)
    with pytest.raises(BadInputError, match="NVIDIA Container Toolkit"):
        applied(inputs(rootfs, gpus="all"), steps.apply_gpus)


def test_namespaces_join_the_monitor(rootfs: str) -> None:
    inp = inputs(rootfs, net_host=True, mount_ns_path="/proc/7/ns/mnt")
    spec = applied(inp, steps.apply_network, steps.apply_namespaces)
    nss = spec["linux"]["namespaces"]
    assert [n["type"] for n in nss] == ["pid", "ipc", "uts", "mount"]
    assert [n.get("path") for n in nss] == [None, None, None, "/proc/7/ns/mnt"]
    untouched = applied(inputs(rootfs), steps.apply_namespaces)["linux"]["namespaces"]
    assert all("path" not in n for n in untouched)


def test_build_spec_is_the_default_spec_through_every_step(rootfs: str) -> None:
    inp = inputs(
        rootfs, {"Env": ["A=1"], "Cmd": ["x"], "User": "app"}, env=["B=2"], cwd="/c",
        terminal=True, stdin=True, etc_dir="/e", mount_ns_path="/proc/1/ns/mnt",
        container_id="cid", namespace="ns", hostname="h",
    )  # fmt: skip
    spec = default_spec(rootfs, "h", "/ns/cid")
    for step in steps.STEPS:
        step(spec, inp)
    built = steps.build_spec(
        inp.image_config, inp.opts, rootfs, "h", etc_dir="/e",
        mount_ns_path="/proc/1/ns/mnt", container_id="cid", namespace="ns",
    )  # fmt: skip
    assert built == spec
    assert os.path.isabs(built["root"]["path"])
