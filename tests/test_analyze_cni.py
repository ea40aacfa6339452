"""`--cni`: the sample container gets its own network namespace, wired by CNI plugins.

A bridge network with host-local addresses, from a config dir of our own
(`--cni-plugin-conf-dir`) and Debian's plugins (`--cni-plugin-dir /usr/lib/cni`). The
workload sees `eth0` with an address of the subnet; afterwards the named network
namespace is gone and the address is released (DEL ran).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from support.cli import printed_digest
from support.containerd import optimize
from support.imagefactory import archive_for_ctr, write_busybox_image
from support.tarfactory import build_tar, dir_, reg

PLUGINS = Path("/usr/lib/cni")
BRIDGE = "eo-cnitest0"
SUBNET = "10.233.77"


@pytest.fixture(scope="module")
def image(containerd, busybox_layer: Path, tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("cni")
    app = build_tar([dir_("app/"), reg("app/a.txt", b"A\n")])
    write_busybox_image(base / "layout", "v1", busybox_layer, extra_layers=[app],
                        cmd=["/bin/sh", "-c", "/bin/busybox ip addr; cat /app/a.txt"])
    archive_for_ctr(base / "layout", "v1", "localhost/cni:1", base / "img.tar")
    containerd.ctr("images", "import", "--no-unpack", str(base / "img.tar"))
    return "localhost/cni:1"


def test_cni_network_is_set_up_and_torn_down(containerd, image: str, tmp_path: Path) -> None:
    if not (PLUGINS / "bridge").exists():
        pytest.skip("CNI plugins missing (apt-get install containernetworking-plugins)")
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    ipam = tmp_path / "ipam"
    (conf_dir / "10-test.conflist").write_text(json.dumps({
        "cniVersion": "0.4.0", "name": "eo-cnitest",
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "subnet": f"{SUBNET}.0/24", "dataDir": str(ipam)}},
            {"type": "loopback"},
        ],
    }))
    netns_before = set(os.listdir("/var/run/netns")) if os.path.isdir("/var/run/netns") else set()
    try:
        res = optimize(containerd, "--oci", "--period", "5", "--cni", "--cni-plugin-conf-dir",
                       str(conf_dir), "--cni-plugin-dir", str(PLUGINS), image,
                       "localhost/cni:out")
        printed_digest(res)
    finally:
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    assert f"inet {SUBNET}." in res.stderr, res.stderr  # the workload's eth0
    netns_after = set(os.listdir("/var/run/netns")) if os.path.isdir("/var/run/netns") else set()
    assert netns_after == netns_before
    # host-local keeps one file per leased address: DEL released it.
    leased = [p.name for p in (ipam / "eo-cnitest").iterdir() if p.name.startswith(SUBNET)]
    assert leased == []


def test_cni_without_a_config_is_one_clear_line(containerd, image: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    res = optimize(containerd, "--oci", "--cni", "--cni-plugin-conf-dir", str(empty), image,
                   "localhost/cni:none")
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith("estargz-opt: error: --cni: no CNI")
    assert "localhost/cni:none" not in containerd.ctr("images", "ls", "-q").stdout
    assert not [c for c in containerd.ctr("containers", "ls", "-q").stdout.split()
                if c.startswith("estargz-opt-sample-")]
