"""The sample container's OCI spec: containerd's default unprivileged spec + image config +
ctr-remote's sampler flags (reference §6.1), and safe user lookup in a hostile rootfs."""

from __future__ import annotations

import json
import os
import signal

import pytest

from estargz_opt.errors import BadInputError
from estargz_opt.workload import spec as S
from estargz_opt.workload.spec import SamplerOptions, build_spec

pytestmark = pytest.mark.unit

CFG = {
    "architecture": "amd64",
    "os": "linux",
    "rootfs": {"type": "layers", "diff_ids": []},
    "config": {
        "Env": ["PATH=/bin", "A=image", "B=image"],
        "Entrypoint": ["/entry"],
        "Cmd": ["c1", "c2"],
        "WorkingDir": "/work",
    },
}


def make_rootfs(tmp_path, passwd=None, group=None):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True, exist_ok=True)
    if passwd is not None:
        (root / "etc/passwd").write_text(passwd)
    if group is not None:
        (root / "etc/group").write_text(group)
    return str(root)


def spec_of(tmp_path, cfg=CFG, **kw):
    etc_dir = kw.pop("etc_dir", None)
    return build_spec(cfg, SamplerOptions(**kw), make_rootfs(tmp_path), "sample", etc_dir=etc_dir)


# ---- containerd defaults ---------------------------------------------------------------


def test_default_capabilities_namespaces_rlimits(tmp_path):
    s = spec_of(tmp_path)
    caps = s["process"]["capabilities"]
    want = [
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
        "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
    ]  # fmt: skip
    assert set(caps) == {"bounding", "effective", "permitted"}  # no inheritable/ambient
    for k in caps:
        assert caps[k] == want
    assert "CAP_SYS_ADMIN" not in caps["bounding"]
    assert [n["type"] for n in s["linux"]["namespaces"]] == [
        "pid", "ipc", "uts", "mount", "network",
    ]  # fmt: skip
    assert all("path" not in n for n in s["linux"]["namespaces"])
    assert s["process"]["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    assert s["process"]["noNewPrivileges"] is True
    assert "/proc/kcore" in s["linux"]["maskedPaths"]
    assert "/proc/sys" in s["linux"]["readonlyPaths"]
    assert s["linux"]["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    assert s["root"] == {"path": os.path.join(str(tmp_path), "rootfs")}
    assert s["hostname"] == "sample"
    json.dumps(s)  # JSON-serializable


def test_no_host_mounts_by_default(tmp_path):
    s = spec_of(tmp_path)
    dsts = [m["destination"] for m in s["mounts"]]
    assert dsts == ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/run"]
    for m in s["mounts"]:
        assert m["type"] != "bind" and not m["source"].startswith("/")
    sys_mount = next(m for m in s["mounts"] if m["destination"] == "/sys")
    assert "ro" in sys_mount["options"]
    assert next(m for m in s["mounts"] if m["destination"] == "/dev")["type"] == "tmpfs"


def test_resolv_and_hosts_bind_mounts(tmp_path):
    s = spec_of(tmp_path, etc_dir="/tmp/tmpetc1")
    binds = [m for m in s["mounts"] if m["type"] == "bind"]
    assert binds == [
        {"destination": "/etc/resolv.conf", "type": "bind",
         "source": "/tmp/tmpetc1/resolv.conf", "options": ["bind"]},
        {"destination": "/etc/hosts", "type": "bind",
         "source": "/tmp/tmpetc1/hosts", "options": ["bind"]},
    ]  # fmt: skip


def test_net_host_uses_host_files_and_network(tmp_path):
    s = spec_of(tmp_path, net_host=True, etc_dir="/tmp/x")
    assert "network" not in [n["type"] for n in s["linux"]["namespaces"]]
    binds = {m["destination"]: m for m in s["mounts"] if m["type"] == "bind"}
    assert binds["/etc/hosts"]["source"] == "/etc/hosts"
    assert binds["/etc/resolv.conf"]["options"] == ["rbind", "ro"]
    assert len(binds) == 2


def test_namespace_paths(tmp_path):
    s = build_spec(
        CFG, SamplerOptions(), make_rootfs(tmp_path), "h",
        mount_ns_path="/proc/42/ns/mnt", netns_path="/var/run/netns/n1",
        container_id="cid", namespace="ns",
    )  # fmt: skip
    nss = {n["type"]: n for n in s["linux"]["namespaces"]}
    assert nss["mount"]["path"] == "/proc/42/ns/mnt"
    assert nss["network"]["path"] == "/var/run/netns/n1"
    assert "path" not in nss["pid"]
    assert s["linux"]["cgroupsPath"] == "/ns/cid"


# ---- image config and process ----------------------------------------------------------


def test_image_config_applied(tmp_path):
    p = spec_of(tmp_path)["process"]
    assert p["args"] == ["/entry", "c1", "c2"]
    assert p["env"] == ["PATH=/bin", "A=image", "B=image"]
    assert p["cwd"] == "/work"
    assert p["user"] == {"uid": 0, "gid": 0, "additionalGids": [0]}
    assert p["terminal"] is False


def test_default_path_env_and_cwd(tmp_path):
    p = spec_of(tmp_path, cfg={"config": {"Cmd": ["x"]}})["process"]
    assert p["env"] == [S.DEFAULT_PATH_ENV]
    assert p["cwd"] == "/"


def test_bare_config_section_accepted(tmp_path):
    p = spec_of(tmp_path, cfg={"Cmd": ["x"], "User": "7"})["process"]
    assert p["args"] == ["x"] and p["user"]["uid"] == 7


def test_entrypoint_override_keeps_cmd(tmp_path):
    p = spec_of(tmp_path, entrypoint='["/bin/sh","-c"]')["process"]
    assert p["args"] == ["/bin/sh", "-c", "c1", "c2"]


def test_args_override_replaces_cmd(tmp_path):
    p = spec_of(tmp_path, args='["a"]')["process"]
    assert p["args"] == ["/entry", "a"]
    p = spec_of(tmp_path, args='["a"]', entrypoint='["/e"]')["process"]
    assert p["args"] == ["/e", "a"]
    p = spec_of(tmp_path, entrypoint="[]")["process"]
    assert p["args"] == ["c1", "c2"]


@pytest.mark.parametrize("bad", ["not json", '"str"', "[1]", '{"a":1}', '["a"'])
def test_bad_json_args(tmp_path, bad):
    with pytest.raises(BadInputError, match="args must be a JSON array"):
        spec_of(tmp_path, args=bad)
    with pytest.raises(BadInputError, match="entrypoint must be a JSON array"):
        spec_of(tmp_path, entrypoint=bad)


def test_no_command(tmp_path):
    with pytest.raises(BadInputError, match="no Entrypoint or Cmd"):
        spec_of(tmp_path, cfg={"config": {}})


def test_env_merge_order(tmp_path):
    env_file = tmp_path / "envfile"
    env_file.write_text("# comment\n\nB=file\nC=file\nD=file\nPATH\n")
    p = spec_of(tmp_path, env=["A=flag", "C=flag", "E=flag"], env_file=str(env_file))["process"]
    # image env, then --env (replaces in place, appends new), then --env-file, which is
    # applied after --env upstream and so wins for C; a bare key unsets (PATH).
    assert p["env"] == ["A=flag", "B=file", "C=file", "E=flag", "D=file"]


def test_env_only_flag(tmp_path):
    p = spec_of(tmp_path, env=["A=1", "A=2", "Z=z"])["process"]
    assert p["env"] == ["PATH=/bin", "A=2", "B=image", "Z=z"]


def test_env_file_missing(tmp_path):
    with pytest.raises(BadInputError, match="cannot read env_file"):
        spec_of(tmp_path, env_file=str(tmp_path / "nope"))


def test_cwd_and_terminal(tmp_path):
    p = spec_of(tmp_path, cwd="/tmp", terminal=True, stdin=True)["process"]
    assert p["cwd"] == "/tmp"
    assert p["terminal"] is True
    assert p["env"][-1] == "TERM=xterm"
    with pytest.raises(BadInputError, match="absolute"):
        spec_of(tmp_path, cwd="rel")


def test_flag_combination_errors():
    with pytest.raises(BadInputError, match="terminal requires stdin"):
        SamplerOptions(terminal=True).validate()
    with pytest.raises(BadInputError, match="wait_on_signal cannot be used with terminal"):
        SamplerOptions(terminal=True, stdin=True, wait_on_signal=True).validate()
    SamplerOptions(wait_on_signal=True).validate()


def test_defaults_and_period():
    o = SamplerOptions()
    assert o.period == 10 and o.dns_nameservers == "8.8.8.8"
    assert SamplerOptions(period=0).effective_period == 10
    assert SamplerOptions(period=-3).effective_period == 10
    assert SamplerOptions(period=3).effective_period == 3


# ---- mounts, DNS, hosts, gpus ------------------------------------------------------------


def test_parse_mount():
    assert S.parse_mount("type=bind,source=/a,destination=/b,options=rbind:ro") == {
        "destination": "/b", "type": "bind", "source": "/a", "options": ["rbind", "ro"],
    }  # fmt: skip
    assert S.parse_mount("src=/a,dst=/b") == {"destination": "/b", "source": "/a"}
    # the value is CSV: a quoted field may contain a comma
    assert S.parse_mount('"type=bind,x",dst=/b') == {"destination": "/b", "type": "bind,x"}


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("type=bind,source=/a", "destination is missing"),
        ("type=bind,dst=rel", "must be absolute"),
        ("type,dst=/b", "not key=val"),
        ("type=a=b,dst=/b", "not key=val"),
        ("foo=bar,dst=/b", "not supported"),
        ("", "destination is missing"),
    ],
)
def test_parse_mount_errors(text, msg):
    with pytest.raises(BadInputError, match=msg):
        S.parse_mount(text)


def test_mount_flag_added_after_defaults(tmp_path):
    s = spec_of(tmp_path, mounts=["type=bind,src=/data,dst=/data,options=rbind:ro"])
    assert s["mounts"][-1] == {
        "destination": "/data", "type": "bind", "source": "/data", "options": ["rbind", "ro"],
    }  # fmt: skip
    with pytest.raises(BadInputError):
        spec_of(tmp_path, mounts=["bogus"])


def test_resolv_conf():
    assert S.resolv_conf(SamplerOptions()) == "nameserver 8.8.8.8\n"
    o = SamplerOptions(
        dns_nameservers="1.1.1.1,9.9.9.9", dns_search_domains="a.example,b", dns_options="ndots:2"
    )
    assert S.resolv_conf(o) == (
        "nameserver 1.1.1.1\nnameserver 9.9.9.9\nsearch a.example b\noptions ndots:2\n"
    )


def test_hosts_file():
    defaults = (
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "fe00::0\tip6-localnet\n"
        "ff00::0\tip6-mcastprefix\n"
        "ff02::1\tip6-allnodes\n"
        "ff02::2\tip6-allrouters\n"
    )
    assert S.hosts_file(SamplerOptions()) == defaults
    o = SamplerOptions(add_hosts="db:10.0.0.2,v6:fd00::1")
    assert S.hosts_file(o) == defaults + "10.0.0.2\tdb\nfd00::1\tv6\n"
    with pytest.raises(BadInputError, match="host:IP"):
        S.hosts_file(SamplerOptions(add_hosts="nocolon"))


def test_parse_gpus():
    assert S.parse_gpus("") == []
    assert S.parse_gpus("all") == ["nvidia.com/gpu=all"]
    assert S.parse_gpus("0,1") == ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]
    with pytest.raises(BadInputError):
        S.parse_gpus("x")


# ---- stop signal ------------------------------------------------------------------------


def test_gpus_use_the_nvidia_hook(tmp_path):
    hook = "/usr/bin/nvidia-container-runtime-hook"
    s = build_spec(CFG, SamplerOptions(gpus="0,1"), make_rootfs(tmp_path), "h", gpu_hook=hook)
    assert s["hooks"] == {"prestart": [{"path": hook, "args": [
        "nvidia-container-runtime-hook", "prestart"]}]}
    assert "NVIDIA_VISIBLE_DEVICES=0,1" in s["process"]["env"]
    assert "NVIDIA_DRIVER_CAPABILITIES=all" in s["process"]["env"]
    every = build_spec(CFG, SamplerOptions(gpus="all"), make_rootfs(tmp_path / "b"), "h",
                       gpu_hook=hook)
    assert "NVIDIA_VISIBLE_DEVICES=all" in every["process"]["env"]
    assert "hooks" not in build_spec(CFG, SamplerOptions(), make_rootfs(tmp_path / "c"), "h")


def test_gpus_without_the_toolkit_is_a_clear_error(tmp_path):
    with pytest.raises(BadInputError, match="NVIDIA Container Toolkit"):
        build_spec(CFG, SamplerOptions(gpus="all"), make_rootfs(tmp_path), "h")


def test_stop_signal():
    assert S.stop_signal({"config": {"StopSignal": "SIGTERM"}}) == signal.SIGTERM
    assert S.stop_signal({"config": {"StopSignal": "15"}}) == 15
    assert S.stop_signal({"config": {"StopSignal": "quit"}}) == signal.SIGQUIT
    assert S.stop_signal({"config": {"StopSignal": "SIGRTMIN+3"}}) == signal.SIGRTMIN + 3
    # ctr-remote: WithImageStopSignal(img, "SIGKILL")
    assert S.stop_signal({"config": {}}) == signal.SIGKILL
    assert S.stop_signal({"config": {}}, default="SIGTERM") == signal.SIGTERM
    for bad in ("SIGNOPE", "0", "999"):
        with pytest.raises(BadInputError, match="invalid stop signal"):
            S.stop_signal({"config": {"StopSignal": bad}})


# ---- users ------------------------------------------------------------------------------

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n"
GROUP = "root:x:0:\nappgrp:x:1001:\nextra:x:2000:app,other\nstaff:x:50:\n"


def test_user_names_and_numbers(tmp_path):
    root = make_rootfs(tmp_path, PASSWD, GROUP)
    assert S.resolve_user(root, "app") == {"uid": 1000, "gid": 1001, "additionalGids": [1001, 2000]}
    assert S.resolve_user(root, "1000")["gid"] == 1001  # gid from passwd by uid
    assert S.resolve_user(root, "app:staff") == {
        "uid": 1000, "gid": 50, "additionalGids": [50, 2000],
    }  # fmt: skip
    assert S.resolve_user(root, "5:6") == {"uid": 5, "gid": 6, "additionalGids": [6]}
    assert S.resolve_user(root, "4242") == {"uid": 4242, "gid": 0, "additionalGids": [0]}
    with pytest.raises(BadInputError, match="not in the image's /etc/passwd"):
        S.resolve_user(root, "ghost")
    with pytest.raises(BadInputError, match="not in the image's /etc/group"):
        S.resolve_user(root, "app:ghosts")


def test_user_flag_overrides_image_user(tmp_path):
    root = make_rootfs(tmp_path, PASSWD, GROUP)
    cfg = {"config": {"Cmd": ["x"], "User": "app"}}
    assert build_spec(cfg, SamplerOptions(), root, "h")["process"]["user"]["uid"] == 1000
    s = build_spec(cfg, SamplerOptions(user="0:0"), root, "h")
    assert s["process"]["user"] == {"uid": 0, "gid": 0, "additionalGids": [0]}


def test_numeric_user_needs_no_passwd(tmp_path):
    root = make_rootfs(tmp_path)
    assert S.resolve_user(root, "12:34") == {"uid": 12, "gid": 34, "additionalGids": [34]}


def _hostile(tmp_path, target):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shadow").write_text("evil:x:4242:4343::/:/bin/sh\n")
    (outside / "group").write_text("evilgrp:x:4343:evil\n")
    root = make_rootfs(tmp_path)
    os.symlink(target(outside), os.path.join(root, "etc/passwd"))
    os.symlink(str(outside / "group"), os.path.join(root, "etc/group"))
    return root


@pytest.mark.parametrize(
    "target",
    [
        lambda o: str(o / "shadow"),  # absolute link to a host file
        lambda o: "../../outside/shadow",  # '..' climbing out of the rootfs
        lambda o: "../../../../../../../../" + str(o / "shadow"),
    ],
)
def test_hostile_symlinks_are_not_followed_out(tmp_path, target):
    root = _hostile(tmp_path, target)
    with pytest.raises(BadInputError, match="not in the image's /etc/passwd"):
        S.resolve_user(root, "evil")
    # the numeric path also never picks up the host file's gid or groups
    assert S.resolve_user(root, "4242") == {"uid": 4242, "gid": 0, "additionalGids": [0]}
    with pytest.raises(BadInputError):
        S.resolve_user(root, "0:evilgrp")
    assert S.read_rootfs_file(root, "/etc/passwd") is None


def test_symlinks_resolved_inside_rootfs(tmp_path):
    root = make_rootfs(tmp_path)
    os.makedirs(os.path.join(root, "usr/lib"))
    with open(os.path.join(root, "usr/lib/passwd"), "w") as f:
        f.write(PASSWD)
    # absolute link: resolved against the rootfs, not the host
    os.symlink("/usr/lib/passwd", os.path.join(root, "etc/passwd"))
    assert S.resolve_user(root, "app")["uid"] == 1000
    # a directory symlink escaping with '..' is clamped at the rootfs
    os.symlink("../../../../usr", os.path.join(root, "etc/u"))
    assert S.read_rootfs_file(root, "/etc/u/lib/passwd") == PASSWD


def test_symlink_loop_and_non_regular(tmp_path):
    root = make_rootfs(tmp_path)
    os.symlink("group", os.path.join(root, "etc/passwd"))
    os.symlink("passwd", os.path.join(root, "etc/group"))
    assert S.read_rootfs_file(root, "/etc/passwd") is None
    os.mkfifo(os.path.join(root, "etc/fifo"))
    assert S.read_rootfs_file(root, "/etc/fifo") is None  # does not block
    os.mkdir(os.path.join(root, "etc/dir"))
    assert S.read_rootfs_file(root, "/etc/dir") is None
