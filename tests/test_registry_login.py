"""Credentials where `skopeo login` and `podman login` put them (containers-auth.json(5)).

As root with no XDG_RUNTIME_DIR (a plain sudo, a CI job) they write
/run/containers/0/auth.json. The end-to-end test runs skopeo and estargz-opt in a private
mount namespace with a tmpfs over /run, so the machine's own /run/containers is neither
read nor written; the registry is Debian's docker-registry with htpasswd auth over TLS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import imagefactory as f
from support.lazypull import Registry, RegistryConfig
from support.registries import PASSWORD, USER, LoopbackCA, htpasswd

from estargz_opt.stores.registry import credentials
from estargz_opt.stores.registry.options import RegistryOptions

pytestmark = [pytest.mark.registry, pytest.mark.root]

ERROR = "estargz-opt: error:"


def test_lookup_order_follows_containers_auth_json() -> None:
    home = Path("/h")
    with_runtime = RegistryOptions(env={"HOME": str(home), "XDG_RUNTIME_DIR": "/r"})
    without = RegistryOptions(env={"HOME": str(home)})
    rest = [home / ".config/containers/auth.json", home / ".docker/config.json",
            home / ".dockercfg"]
    assert credentials.searched(with_runtime) == [Path("/r/containers/auth.json"), *rest]
    assert credentials.searched(without) == [
        Path(f"/run/containers/{os.getuid()}/auth.json"), *rest]
    # --authfile (or REGISTRY_AUTH_FILE) takes the primary file's place only.
    named = RegistryOptions(authfile=Path("/a.json"), env={"HOME": str(home)})
    assert credentials.searched(named) == [Path("/a.json"), *rest]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Path]]:
    """The htpasswd registry, and a certs.d directory with its CA for skopeo and us."""
    d = tmp_path_factory.mktemp("login")
    ca = LoopbackCA.create(d / "ca")
    auth = ("  htpasswd:\n    realm: estargz-opt-test\n"
            f"    path: {htpasswd(d / 'htpasswd', {USER: PASSWORD})}\n")
    reg = Registry.start(d, RegistryConfig(ca.server_crt, ca.server_key, ca.ca_crt, auth))
    try:
        yield reg, ca.certs_d(d / "certs.d", reg.host)
    finally:
        reg.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="skopeo writes /run/containers/0 as root")
def test_skopeo_login_as_root_without_xdg_runtime_dir(registry: tuple[Registry, Path],
                                                      tmp_path: Path) -> None:
    reg, certs = registry
    assert shutil.which("skopeo") and shutil.which("unshare")
    layout = tmp_path / "src"
    f.write_layout(layout, "t", [f.simple_layer({"app/": None, "app/x": b"x\n"})])
    out = tmp_path / "out"
    out.mkdir()
    estargz_opt = f"{sys.executable} -m estargz_opt"
    src, dst = f"docker://{reg.host}/ns/app:v1", f"docker://{reg.host}/ns/app:v1-esgz"
    certs_flags = f"--src-cert-dir {certs} --dest-cert-dir {certs}"
    script = f"""
        set -eu
        mount -t tmpfs tmpfs /run
        printf '%s' '{PASSWORD}' | skopeo login --cert-dir {certs} -u {USER} \\
            --password-stdin {reg.host}
        cp /run/containers/0/auth.json {out}/auth.json
        skopeo copy --dest-cert-dir {certs} oci:{layout}:t {src}
        {estargz_opt} optimize --oci --no-optimize {certs_flags} {src} {dst} > {out}/digest
        skopeo inspect --cert-dir {certs} docker://{reg.host}/ns/app:v1-esgz > {out}/inspect
        skopeo logout {reg.host}
        if {estargz_opt} optimize --oci --no-optimize {certs_flags} {src} {dst} \\
            2> {out}/refused; then exit 3; fi
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XDG_", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "CONTAINERD"))}
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path))
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                           script], capture_output=True, text=True, env=env, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert reg.host in (out / "auth.json").read_text()
    digest = (out / "digest").read_text().strip()
    assert digest.startswith("sha256:"), digest
    assert f'"Digest": "{digest}"' in (out / "inspect").read_text()
    refused = (out / "refused").read_text().strip().splitlines()
    assert len(refused) == 1 and refused[0].startswith(ERROR), refused
    assert "no credentials were found in /run/containers/0/auth.json," in refused[0]
    assert f"{tmp_path}/home/.docker/config.json (absent)" in refused[0]
    assert not Path("/run/containers/0/auth.json").exists() or \
        reg.host not in Path("/run/containers/0/auth.json").read_text()
