"""A loopback TLS registry with token auth, and "machines" (separate HOME, layer cache
and TMPDIR) that run estargz-opt against it: the fleet of the remote layer cache."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from support.lazypull import Registry, RegistryConfig
from support.registries import PASSWORD, USER, LoopbackCA, TokenIssuer

CREDS = f"{USER}:{PASSWORD}"


@dataclass
class TokenRegistry:
    ca: LoopbackCA
    issuer: TokenIssuer
    registry: Registry

    @classmethod
    def start(cls, d: Path) -> TokenRegistry:
        ca = LoopbackCA.create(d / "ca")
        issuer = TokenIssuer(d / "issuer").start()
        try:
            registry = Registry.start(d, RegistryConfig(
                ca.server_crt, ca.server_key, ca.ca_crt, issuer.auth_config))
        except BaseException:
            issuer.stop()
            raise
        return cls(ca, issuer, registry)

    @property
    def host(self) -> str:
        return self.registry.host

    def stop(self) -> None:
        self.registry.stop()
        self.issuer.stop()

    def log(self) -> str:
        return (self.registry.dir / "registry.log").read_text(errors="replace")

    def blob_uploads(self, repo: str, text: str) -> list[str]:
        """Digests committed by upload into `repo` in the access log excerpt `text`."""
        return re.findall(rf'"PUT /v2/{re.escape(repo)}/blobs/uploads/[^"]*digest=(sha256%3A'
                          r'[0-9a-f]{64}|sha256:[0-9a-f]{64})', text)

    def mounts(self, repo: str, text: str) -> list[str]:
        """Digests mounted into `repo` (201 answers) in the access log excerpt `text`."""
        found = []
        for line in text.splitlines():
            if f'"POST /v2/{repo}/blobs/uploads/?' in line and "mount=" in line \
                    and '" 201 ' in line:
                m = re.search(r"mount=(sha256(?::|%3A)[0-9a-f]{64})", line)
                if m:
                    found.append(m.group(1).replace("%3A", ":"))
        return found


@dataclass
class Machine:
    """One job's machine: its own HOME (certs.d with the test CA), cache and TMPDIR."""

    root: Path
    reg: TokenRegistry

    def __post_init__(self) -> None:
        for sub in ("home", "cache", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.reg.ca.certs_d(self.root / "home/.config/containers/certs.d", self.reg.host)

    def env(self) -> dict[str, str]:
        drop = {"REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME",
                "XDG_CACHE_HOME", "ESTARGZ_OPT_CACHE_DIR", "ESTARGZ_OPT_CACHE_REF"}
        return {**{k: v for k, v in os.environ.items() if k not in drop},
                "HOME": str(self.root / "home"), "TMPDIR": str(self.root / "tmp"),
                "ESTARGZ_OPT_CACHE_DIR": str(self.root / "cache")}

    def optimize(self, src: str, dst: str, *extra: str, creds: str = CREDS,
                 timeout: int = 300) -> subprocess.Popen[str]:
        """Start `optimize --json` (the caller waits: two machines may run at once)."""
        return subprocess.Popen(
            [sys.executable, "-m", "estargz_opt", "optimize", "--oci", "--no-optimize",
             "--json", "--quiet", "--dest-creds", creds, *extra, src, dst],
            env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen[str], timeout: int = 300) -> tuple[dict[str, object], str]:
    """The run's --json report and its stderr; fails the test if the run failed."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err
