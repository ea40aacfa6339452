"""`estargz-opt optimize docker://… docker://…` in each registry configuration
(tests/support/registries.py: plain HTTP, TLS with a test CA, htpasswd over TLS, token auth),
each time reaching the registry the way that configuration needs (flags, a certs.d
directory under HOME, an auth file, --*-creds). The source image is pushed by skopeo and
the result read back by skopeo (`inspect`, and `copy … oci:`, which checks every
digest) and by `estargz-opt verify docker://…`. Then the one-line errors and the rule
that no secret reaches the output, through the command line."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import cli_argv
from support.imagefactory import simple_layer, write_layout
from support.lazypull import Registry
from support.registries import PASSWORD, USER, Registries

pytestmark = pytest.mark.registry

CREDS = f"{USER}:{PASSWORD}"
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"


@pytest.fixture(scope="module")
def regs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registries]:
    r = Registries.start(tmp_path_factory.mktemp("registries"))
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def home(regs: Registries, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME whose ~/.config/containers/certs.d holds the test CA for each TLS registry,
    and an auth file for the basic-auth one (used through --authfile)."""
    h = tmp_path_factory.mktemp("home")
    for r in (regs.tls, regs.basic, regs.token):
        regs.ca.certs_d(h / ".config/containers/certs.d", r.host)
    auth = base64.b64encode(CREDS.encode()).decode()
    (h / "basic-auth.json").write_text(json.dumps({"auths": {regs.basic.host: {"auth": auth}}}))
    return h


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("src") / "layout"
    write_layout(d, "v1", [simple_layer({"etc/": None, "etc/hello": b"hello\n" * 1000,
                                         "bin/": None, "bin/tool": os.urandom(50_000)})])
    return d


def _env(home: Path) -> dict[str, str]:
    """The test's environment with HOME replaced and no credential locations of its own."""
    drop = {"REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "HOME": str(home)}


def _ours(regs: Registries, home: Path, name: str, sides: tuple[str, ...]) -> list[str]:
    """estargz-opt's flags for registry `name`, for each side prefix ("src-", "dest-", "")."""
    flags = ["--authfile", str(home / "basic-auth.json")] if name == "basic" else []
    for side in sides:
        if name == "plain":
            flags.append(f"--{side}tls-verify=false")
        elif name == "token":
            flags += [f"--{side}creds", CREDS]
    return flags


def _skopeo(regs: Registries, home: Path, name: str, side: str) -> list[str]:
    """skopeo's flags for the same registry; TLS through --*-cert-dir, not HOME."""
    if name == "plain":
        return [f"--{side}tls-verify=false"]
    host = regs.all()[name].host
    flags = [f"--{side}cert-dir", str(home / ".config/containers/certs.d" / host)]
    if name in ("basic", "token"):
        flags += [f"--{side}creds", CREDS]
    return flags


def _run(cmd: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=300, env=_env(home))


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _run([*cli_argv(), *args], home)


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc.stdout


def _push_source(regs: Registries, home: Path, layout: Path, name: str, ref: str) -> None:
    _ok(_run(["skopeo", "copy", *_skopeo(regs, home, name, "dest-"), f"oci:{layout}:v1",
              f"docker://{regs.all()[name].host}/{ref}"], home))


@pytest.mark.parametrize("name", ["plain", "tls", "basic", "token"])
def test_optimize_registry_to_registry(regs: Registries, home: Path, layout: Path,
                                       tmp_path: Path, name: str) -> None:
    host = regs.all()[name].host
    _push_source(regs, home, layout, name, "src/app:1")
    out = _ok(_cli(home, "optimize", "--oci", "--no-optimize", "--no-cache",
                   *_ours(regs, home, name, ("src-", "dest-")),
                   f"docker://{host}/src/app:1", f"docker://{host}/dst/app:1-esgz"))
    digest = out.strip().splitlines()[-1]
    assert digest.startswith("sha256:")

    inspect = ["skopeo", "inspect", *_skopeo(regs, home, name, "")]
    info = json.loads(_ok(_run([*inspect, f"docker://{host}/dst/app:1-esgz"], home)))
    assert info["Digest"] == digest
    manifest = json.loads(_ok(_run([*inspect, "--raw", f"docker://{host}/dst/app:1-esgz"],
                                   home)))
    assert all(TOC_DIGEST in layer.get("annotations", {}) for layer in manifest["layers"])
    _ok(_run(["skopeo", "copy", *_skopeo(regs, home, name, "src-"),
              f"docker://{host}/dst/app:1-esgz", f"oci:{tmp_path / 'copy'}:x"], home))
    _ok(_cli(home, "verify", *_ours(regs, home, name, ("",)),
             f"docker://{host}/dst/app:1-esgz"))
    # the destination's push check (an upload opened and cancelled) left no session open
    assert _open_uploads(regs.all()[name], "dst/app") == []


def _repository_dir(reg: Registry, repo: str) -> Path:
    """Where distribution's filesystem driver keeps a repository's links and uploads."""
    return reg.dir / "storage/docker/registry/v2/repositories" / repo


def _open_uploads(reg: Registry, repo: str) -> list[str]:
    """The upload sessions the registry holds open for `repo`: those with a `startedat`
    file (a committed or cancelled one loses it; a committed one leaves its hash state)."""
    uploads = _repository_dir(reg, repo) / "_uploads"
    return sorted(p.parent.name for p in uploads.glob("*/startedat"))


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("estargz-opt: error: "), proc.stderr
    return lines[0].removeprefix("estargz-opt: error: ")


def test_wrong_password_is_one_line_naming_the_source(regs: Registries, home: Path,
                                                      layout: Path) -> None:
    _push_source(regs, home, layout, "basic", "err/app:1")
    host = regs.basic.host
    proc = _cli(home, "verify", "--creds", f"{USER}:not-the-password",
                f"docker://{host}/err/app:1")
    msg = _one_error_line(proc)
    assert msg.startswith(f"registry {host}: unauthorized for repository err/app: the "
                          "credentials from the command line (--creds) were refused "
                          "(basic auth)")
    assert "not-the-password" not in proc.stdout + proc.stderr
    # optimize has a flag per side, and the error names the one that was refused
    good = ["--authfile", str(home / "basic-auth.json")]
    for flag, repo in (("--src-creds", "err/app"), ("--dest-creds", "err/out")):
        proc = _cli(home, "--log-level", "error", "optimize", "--oci", "--no-optimize",
                    "--no-cache", *good, flag, f"{USER}:not-the-password", f"docker://{host}/err/app:1",
                    f"docker://{host}/err/out:1")
        assert _one_error_line(proc).startswith(
            f"registry {host}: unauthorized for repository {repo}: the credentials from "
            f"the command line ({flag}) were refused (basic auth)"), proc.stderr
        assert "not-the-password" not in proc.stdout + proc.stderr
    proc = _cli(home, "verify", "--authfile", str(home / "missing.json"),
                f"docker://{host}/err/app:1")
    assert _one_error_line(proc).startswith(f"registry {host}: unauthorized for repository "
                                            "err/app: no credentials were found")


@pytest.mark.parametrize("case", ["wrong-password", "push-denied"])
def test_destination_that_refuses_us_fails_before_any_conversion(
        regs: Registries, home: Path, layout: Path, tmp_path: Path, case: str) -> None:
    """A wrong --dest-creds (htpasswd), or a repository the token issuer grants pull but
    not push on: the one-line error comes before any layer is read or converted, and the
    destination repository is left untouched (no tag, no blob, no upload session)."""
    name = "basic" if case == "wrong-password" else "token"
    reg = regs.all()[name]
    src, dst = f"{case}/app", f"{case}/out"
    _push_source(regs, home, layout, name, f"{src}:1")
    if case == "wrong-password":
        flags = ["--authfile", str(home / "basic-auth.json"), "--dest-creds",
                 f"{USER}:not-the-password"]
        reason = ("the credentials from the command line (--dest-creds) were refused "
                  "(basic auth)")
    else:
        flags = ["--src-creds", CREDS, "--dest-creds", CREDS]
        reason = ("the token obtained with the credentials from the command line "
                  f"(--dest-creds) does not grant repository:{dst}:pull,push")
    cache = tmp_path / "cache"
    args = ["optimize", "--oci", "--no-optimize", "--cache-dir", str(cache), *flags,
            f"docker://{reg.host}/{src}:1", f"docker://{reg.host}/{dst}:1"]
    seen = len(reg.requests())
    regs.issuer.read_only.add(dst)
    try:
        proc = _cli(home, "--log-level", "error", *args)
    finally:
        regs.issuer.read_only.clear()
    assert _one_error_line(proc) == f"registry {reg.host}: unauthorized for repository " \
        f"{dst}: {reason}"
    # the registry's access log: the push check was made, and no blob was read, probed
    # or sent on either side
    requests = reg.requests()[seen:]
    assert ("POST", f"/v2/{dst}/blobs/uploads/", 401) in requests, requests
    check = f"/v2/{dst}/blobs/uploads/"
    assert not [r for r in requests if ("/blobs/" in r[1] and r[1] != check)
                or r[0] in ("PUT", "PATCH")], requests
    assert not list(cache.rglob("*.meta")), "a layer was converted (and cached)"
    assert not _repository_dir(reg, dst).exists()
    assert "not-the-password" not in proc.stdout + proc.stderr


def test_refusing_destination_fails_before_the_workload_runs(
        regs: Registries, home: Path, layout: Path) -> None:
    """With a workload to run (no --no-optimize), a destination that refuses our pushes
    is still the first and only error: the workload never starts."""
    reg = regs.basic
    proc = _cli(home, "--log-level", "error", "optimize", "--oci", "--period", "1",
                "--dest-creds",
                f"{USER}:not-the-password", f"oci:{layout}:v1",
                f"docker://{reg.host}/workload-refused/out:1")
    assert _one_error_line(proc) == (
        f"registry {reg.host}: unauthorized for repository workload-refused/out: the "
        "credentials from the command line (--dest-creds) were refused (basic auth)")
    assert not _repository_dir(reg, "workload-refused/out").exists()


def test_self_signed_without_ca_is_one_line(regs: Registries, tmp_path: Path) -> None:
    host = regs.tls.host
    msg = _one_error_line(_cli(tmp_path, "verify", f"docker://{host}/any/app:1"))
    assert msg.startswith(f"registry {host}: TLS certificate verification failed")
    assert f"{tmp_path}/.config/containers/certs.d/{host}" in msg
    assert "--src-tls-verify=false" in msg


def test_no_secret_in_debug_json_output(regs: Registries, home: Path, layout: Path) -> None:
    """--debug logs every request (httpx, httpcore, ours) and --json prints the result:
    neither the password, its Basic encoding nor a token the issuer signed appears."""
    host = regs.token.host
    _push_source(regs, home, layout, "token", "secret/app:1")
    regs.issuer.issued.clear()
    proc = _cli(home, "--debug", "optimize", "--json", "--oci", "--no-optimize", "--no-cache",
                *_ours(regs, home, "token", ("src-", "dest-")),
                f"docker://{host}/secret/app:1", f"docker://{host}/secret/app:1-esgz")
    _ok(proc)
    output = proc.stdout + proc.stderr
    # the debug log did speak about the tokens (what it must not show is their value)
    assert f"estargz-opt: DEBUG: registry {host}: token for repository:secret/app:pull " \
           "from 127.0.0.1:" in proc.stderr
    assert regs.issuer.issued, "the run obtained tokens"
    for secret in (PASSWORD, base64.b64encode(CREDS.encode()).decode(), *regs.issuer.issued):
        assert secret not in output
