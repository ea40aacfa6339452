"""Registry sessions against Debian's docker-registry (distribution 2.8) on loopback in
the four configurations of tests/support/registries.py: the scheme, TLS from certs.d,
credentials from every place skopeo/docker look, Basic and bearer-token auth checked by
the real registry, and the one-line errors. Images pushed through a session are read
back by skopeo, an independent client."""

from __future__ import annotations

import base64
import gzip
import io
import json
import logging
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
from support.cli import cli_argv
from support.lazypull import Registry, RegistryConfig, _free_port
from support.registries import PASSWORD, USER, LoopbackCA, Registries, sha256

from estargz_opt.errors import RegistryAccessError
from estargz_opt.reference import RegistryRef
from estargz_opt.stores.registry import credentials
from estargz_opt.stores.registry.options import RegistryOptions
from estargz_opt.stores.registry.session import Session, open_session
from estargz_opt.stores.registry.store import RegistryStore

pytestmark = pytest.mark.registry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CREDS = f"{USER}:{PASSWORD}"


@pytest.fixture(scope="module")
def regs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registries]:
    r = Registries.start(tmp_path_factory.mktemp("registries"))
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def certs_d(regs: Registries, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A certs.d tree with the test CA for each TLS registry."""
    base = tmp_path_factory.mktemp("certs.d")
    for r in (regs.tls, regs.basic, regs.token):
        regs.ca.certs_d(base, r.host)
    return base


def _opts(regs: Registries, name: str, certs_d: Path, **kw: object) -> RegistryOptions:
    reg = regs.all()[name]
    base: dict[str, object] = {"env": {"HOME": "/nonexistent", "PATH": os.defpath}}
    if name == "plain":
        base["tls_verify"] = False
    else:
        base["cert_dir"] = certs_d / reg.host
    if name in ("basic", "token"):
        base["creds"] = CREDS
    base.update(kw)
    return RegistryOptions(**base)  # type: ignore[arg-type]


def _layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"hello from estargz-opt\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


def _with_digest(location: str, blob: bytes) -> httpx.URL:
    """The upload URL plus ?digest= (httpx's `params=` would drop the registry's own
    query parameters, such as `_state`)."""
    return httpx.URL(location).copy_add_param("digest", sha256(blob))


def _upload_streamed(s: Session, repo: str, blob: bytes) -> None:
    """POST, one PATCH whose body is a generator (not replayable), PUT ?digest."""
    r = s.client.post(f"{s.base_url}/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    loc = urljoin(s.base_url + "/", r.headers["Location"])

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(blob), 7):
            yield blob[i:i + 7]

    r = s.client.patch(loc, content=chunks(), headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 202, r.text
    loc = urljoin(s.base_url + "/", r.headers["Location"])
    r = s.client.put(_with_digest(loc, blob))
    assert r.status_code == 201, r.text


def _upload_monolithic(s: Session, repo: str, blob: bytes) -> None:
    r = s.client.post(f"{s.base_url}/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    loc = urljoin(s.base_url + "/", r.headers["Location"])
    r = s.client.put(_with_digest(loc, blob), content=blob,
                     headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text


def _push_image(s: Session, repo: str, tag: str) -> tuple[str, bytes]:
    """A one-layer OCI image: layer streamed, config monolithic, then manifest and tag."""
    layer = _layer()
    diff_id = sha256(gzip.decompress(layer))
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    if s.client.head(f"{s.base_url}/v2/{repo}/blobs/{sha256(layer)}").status_code != 200:
        _upload_streamed(s, repo, layer)
    _upload_monolithic(s, repo, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256(layer), "size": len(layer)}]}).encode()
    r = s.client.put(f"{s.base_url}/v2/{repo}/manifests/{tag}", content=manifest,
                     headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, r.text
    return sha256(manifest), layer


def _skopeo_inspect(regs: Registries, name: str, certs_d: Path, ref: str) -> dict[str, object]:
    reg = regs.all()[name]
    flags = ["--tls-verify=false"] if name == "plain" else ["--cert-dir", str(certs_d / reg.host)]
    if name in ("basic", "token"):
        flags += ["--creds", CREDS]
    res = subprocess.run(["skopeo", "inspect", *flags, f"docker://{reg.host}/{ref}"],
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"})
    assert res.returncode == 0, res.stderr
    out: dict[str, object] = json.loads(res.stdout)
    return out


@pytest.mark.parametrize("name", ["plain", "tls", "basic", "token"])
def test_push_through_session_then_skopeo_reads_it(regs: Registries, certs_d: Path,
                                                    name: str) -> None:
    s = open_session(regs.all()[name].host, _opts(regs, name, certs_d))
    try:
        assert s.base_url == f"{'http' if name == 'plain' else 'https'}://{s.host}"
        digest, _ = _push_image(s, "acme/app", "v1")
        r = s.client.get(f"{s.base_url}/v2/acme/app/tags/list")
        assert r.status_code == 200 and r.json()["tags"] == ["v1"]
        r = s.client.get(f"{s.base_url}/v2/acme/app/manifests/v1",
                         headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200 and sha256(r.content) == digest
        expected = "none" if name in ("plain", "tls") else "the creds option"
        assert s.credential_source == expected
    finally:
        s.close()
    info = _skopeo_inspect(regs, name, certs_d, "acme/app:v1")
    assert info["Digest"] == digest


@pytest.mark.parametrize("name", ["basic", "token"])
def test_store_streams_with_the_push_authorization_it_already_holds(
        regs: Registries, certs_d: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    """A sink's PATCH streams a body that cannot be replayed after a 401: the upload's
    POST has the session authorized for push before the stream starts, so the stream
    lands as it is (no second upload from the spool), and the registry checked it."""
    caplog.set_level(logging.INFO, logger="estargz_opt")
    blob = os.urandom(3 << 20)
    ref = RegistryRef.parse(f"docker://{regs.all()[name].host}/stream/app:v1")
    regs.issuer.requests.clear()
    with RegistryStore(ref, _opts(regs, name, certs_d)) as store:
        with store.sink() as sink:
            for i in range(0, len(blob), 1 << 19):
                sink.file.write(blob[i:i + (1 << 19)])
            sink.commit(sha256(blob), len(blob))
        store.tag({})
    assert "did not land" not in caplog.text, caplog.text
    s = open_session(regs.all()[name].host, _opts(regs, name, certs_d))
    try:
        r = s.client.get(f"{s.base_url}/v2/stream/app/blobs/{sha256(blob)}")
        assert r.status_code == 200 and r.content == blob
    finally:
        s.close()
    if name == "token":
        assert ["repository:stream/app:pull,push"] in [t.scopes for t in regs.issuer.requests]


def test_token_flow_one_request_carries_push_and_mount_scopes(regs: Registries,
                                                             certs_d: Path) -> None:
    """A mount POST needs push on the target and pull on the source: one token request
    asks for both, the real registry accepts the token (201 Created, mounted), and the
    token is cached per scope set."""
    s = open_session(regs.token.host, _opts(regs, "token", certs_d))
    try:
        _, layer = _push_image(s, "src/one", "v1")
        regs.issuer.requests.clear()
        r = s.client.post(f"{s.base_url}/v2/dst/two/blobs/uploads/",
                          params={"mount": sha256(layer), "from": "src/one"})
        assert r.status_code == 201, r.text
        assert [sorted(t.scopes) for t in regs.issuer.requests] == [
            ["repository:dst/two:pull,push", "repository:src/one:pull"]]
        assert regs.issuer.requests[0].service == "estargz-opt-test-registry"
        assert regs.issuer.requests[0].user == USER
        for _ in range(3):
            assert s.client.head(f"{s.base_url}/v2/dst/two/blobs/{sha256(layer)}"
                                 ).status_code == 200
        # one more token (pull on dst/two), then the cached one
        assert [t.scopes for t in regs.issuer.requests[1:]] == [["repository:dst/two:pull"]]
    finally:
        s.close()


def test_token_refused_by_registry_is_fetched_again(regs: Registries, certs_d: Path) -> None:
    """A token the registry refuses (here: one already expired, though the issuer said
    it lives 300 s) gets a 401; the flow fetches a fresh token, retries once, and then
    reuses the fresh one from its cache. A 401 whose challenge names a scope the request
    did not derive (distribution wants `delete` to cancel an upload) widens the scope."""
    opts = _opts(regs, "token", certs_d)
    s = open_session(regs.token.host, opts)
    try:
        _push_image(s, "refresh/app", "v1")
    finally:
        s.close()
    s = open_session(regs.token.host, opts)
    try:
        regs.issuer.expired_next = 1
        regs.issuer.requests.clear()
        for _ in range(2):
            r = s.client.get(f"{s.base_url}/v2/refresh/app/manifests/v1",
                             headers={"Accept": OCI_MANIFEST})
            assert r.status_code == 200
        assert [t.scopes for t in regs.issuer.requests] == [["repository:refresh/app:pull"]] * 2
        regs.issuer.requests.clear()
        r = s.client.delete(f"{s.base_url}/v2/refresh/app/blobs/uploads/no-such-upload")
        assert r.status_code == 404  # authorized; the upload is unknown
        assert [t.scopes for t in regs.issuer.requests] == [
            ["repository:refresh/app:pull,push"], ["repository:refresh/app:delete,pull,push"]]
        regs.issuer.requests.clear()
        r = s.client.delete(f"{s.base_url}/v2/refresh/app/blobs/uploads/no-such-upload")
        assert r.status_code == 404 and regs.issuer.requests == []  # widened and cached
    finally:
        s.close()


def test_token_fetched_again_when_it_expires(regs: Registries, certs_d: Path) -> None:
    """Tokens that live 2 s (`expires_in` 2, and the real registry refuses them after
    that): a session used across the expiry asks the issuer again for the same scopes
    before sending, so that even a streamed PATCH, whose body cannot be sent twice after
    a 401, is accepted. The lapsed token is shown to be refused by the registry."""
    opts = _opts(regs, "token", certs_d)
    s = open_session(regs.token.host, opts)
    try:
        _push_image(s, "expiry/app", "v1")
    finally:
        s.close()
    pull, push = ["repository:expiry/app:pull"], ["repository:expiry/app:pull,push"]
    blob = os.urandom(4096)
    regs.issuer.lifetime = 2
    s = open_session(regs.token.host, opts)
    try:
        regs.issuer.requests.clear()
        regs.issuer.issued.clear()
        manifest = f"{s.base_url}/v2/expiry/app/manifests/v1"
        accept = {"Accept": OCI_MANIFEST}
        assert s.client.get(manifest, headers=accept).status_code == 200
        r = s.client.post(f"{s.base_url}/v2/expiry/app/blobs/uploads/")
        assert r.status_code == 202, r.text
        loc = urljoin(s.base_url + "/", r.headers["Location"])
        assert [t.scopes for t in regs.issuer.requests] == [pull, push]
        lapsed = regs.issuer.issued[0]
        time.sleep(3.1)  # JWT times are whole seconds: 2 s, rounded up, plus a margin
        assert s.tls is not None
        with httpx.Client(verify=s.tls.context) as raw:
            r = raw.get(manifest, headers={**accept, "Authorization": f"Bearer {lapsed}"})
        assert r.status_code == 401, "the registry refuses the lapsed token"

        r = s.client.patch(loc, content=iter([blob[:1000], blob[1000:]]),
                           headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 202, r.text
        r = s.client.put(_with_digest(urljoin(s.base_url + "/", r.headers["Location"]), blob))
        assert r.status_code == 201, r.text
        assert s.client.get(manifest, headers=accept).status_code == 200
        after = [t.scopes for t in regs.issuer.requests[2:]]
        # a new token for the push scopes before the PATCH went out, and one for pull
        assert after[0] == push and after[-1] == pull and set(map(tuple, after)) == {
            tuple(push), tuple(pull)}, after
    finally:
        s.close()
        regs.issuer.lifetime = 300
    s = open_session(regs.token.host, opts)
    try:
        assert s.client.head(f"{s.base_url}/v2/expiry/app/blobs/{sha256(blob)}"
                             ).status_code == 200
    finally:
        s.close()


def test_parallel_requests_share_one_token_request(regs: Registries, certs_d: Path) -> None:
    """Layers are fetched in parallel: requests needing the same scopes wait for one
    token instead of each asking the issuer."""
    opts = _opts(regs, "token", certs_d)
    s = open_session(regs.token.host, opts)
    try:
        _, layer = _push_image(s, "parallel/app", "v1")
    finally:
        s.close()
    s = open_session(regs.token.host, opts)
    try:
        regs.issuer.requests.clear()
        url = f"{s.base_url}/v2/parallel/app/blobs/{sha256(layer)}"
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: s.client.get(url).status_code, range(16)))
        assert codes == [200] * 16
        assert [t.scopes for t in regs.issuer.requests] == [["repository:parallel/app:pull"]]
    finally:
        s.close()


@pytest.mark.parametrize("name", ["basic", "token"])
def test_no_credentials_go_to_another_host(regs: Registries, certs_d: Path, name: str) -> None:
    """A URL on another host (an upload Location or a redirect to storage) is sent as it
    is: here the token issuer's host plays that other server and records the header."""
    s = open_session(regs.all()[name].host, _opts(regs, name, certs_d))
    try:
        _push_image(s, "origin/app", "v1")  # the session holds credentials and tokens
        regs.issuer.authorization_seen.clear()
        other = regs.issuer.realm.removesuffix("/token")
        r = s.client.get(f"{other}/v2/origin/app/tags/list")
        assert r.status_code == 401  # the other server's own answer, passed through
        assert regs.issuer.authorization_seen == [""]
    finally:
        s.close()


@pytest.mark.parametrize("name", ["basic", "token"])
def test_wrong_password_names_the_source_and_not_the_secret(
        regs: Registries, certs_d: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bad = "Wr0ng-pa55-7d2e"
    s = open_session(regs.all()[name].host, _opts(regs, name, certs_d, creds=f"{USER}:{bad}",
                                                  creds_source="the command line (--dest-creds)"))
    try:
        with pytest.raises(RegistryAccessError) as e:
            s.client.get(f"{s.base_url}/v2/acme/app/tags/list")
    finally:
        s.close()
    msg = str(e.value)
    assert msg.startswith(f"registry {s.host}: unauthorized for repository acme/app")
    assert "the credentials from the command line (--dest-creds) were refused" in msg
    assert "\n" not in msg
    for secret in (bad, base64.b64encode(f"{USER}:{bad}".encode()).decode()):
        assert secret not in msg and secret not in caplog.text


def test_token_without_the_scope_says_so(regs: Registries, certs_d: Path) -> None:
    """The password is right, but the issuer grants nothing on this repository: the
    registry answers 401 insufficient_scope, and the error says what is missing."""
    regs.issuer.denied.add("locked/app")
    s = open_session(regs.token.host, _opts(regs, "token", certs_d))
    try:
        with pytest.raises(RegistryAccessError) as e:
            s.client.get(f"{s.base_url}/v2/locked/app/tags/list")
    finally:
        s.close()
        regs.issuer.denied.clear()
    assert str(e.value) == (
        f"registry {s.host}: unauthorized for repository locked/app: the token obtained "
        "with the credentials from the creds option does not grant "
        "repository:locked/app:pull")


def test_secrets_never_in_debug_logs(regs: Registries, certs_d: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """httpx and httpcore log every request at DEBUG: neither the password, its Basic
    encoding nor any token the issuer handed out appears."""
    caplog.set_level(logging.DEBUG)
    for name in ("basic", "token"):
        s = open_session(regs.all()[name].host, _opts(regs, name, certs_d))
        try:
            _push_image(s, "logs/app", "v1")
        finally:
            s.close()
    assert "HTTP Request" in caplog.text  # the logging under test did happen
    assert regs.issuer.issued
    for secret in (PASSWORD, base64.b64encode(CREDS.encode()).decode(),
                   *regs.issuer.issued):
        assert secret not in caplog.text


def test_anonymous_on_an_auth_registry_says_no_credentials(regs: Registries,
                                                           certs_d: Path) -> None:
    s = open_session(regs.basic.host, _opts(regs, "basic", certs_d, creds=None))
    try:
        assert s.credential_source == "none"
        with pytest.raises(RegistryAccessError, match=r"^registry 127\.0\.0\.1:\d+: "
                           r"unauthorized for repository x/y: no credentials were found"):
            s.client.get(f"{s.base_url}/v2/x/y/tags/list")
    finally:
        s.close()


def test_self_signed_without_ca_names_certs_d_and_tls_verify(regs: Registries,
                                                            tmp_path: Path) -> None:
    host = regs.tls.host
    opts = RegistryOptions(env={"HOME": str(tmp_path)})
    with pytest.raises(RegistryAccessError) as e:
        open_session(host, opts)
    msg = str(e.value)
    assert msg.startswith(f"registry {host}: TLS certificate verification failed")
    assert str(tmp_path / ".config/containers/certs.d" / host) in msg
    assert "--src-tls-verify=false" in msg and "\n" not in msg


def test_ca_found_in_home_certs_d(regs: Registries, tmp_path: Path) -> None:
    host = regs.tls.host
    regs.ca.certs_d(tmp_path / ".config/containers/certs.d", host)
    s = open_session(host, RegistryOptions(env={"HOME": str(tmp_path)}))
    try:
        assert s.tls is not None
        assert s.tls.cert_dir == tmp_path / ".config/containers/certs.d" / host
        assert s.client.get(f"{s.base_url}/v2/").status_code == 200
    finally:
        s.close()


# --------------------------------------------------------------------------- client certificates


@pytest.fixture(scope="module")
def mtls(regs: Registries, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry with `tls.clientcas`: it requires and verifies a client
    certificate signed by the test CA (its readiness probe presents one)."""
    d = tmp_path_factory.mktemp("mtls")
    probe = regs.ca.client_pair(d / "probe")
    reg = Registry.start(d, RegistryConfig(regs.ca.server_crt, regs.ca.server_key,
                                           regs.ca.ca_crt, client_ca=regs.ca.ca_crt,
                                           probe_cert=probe))
    try:
        yield reg
    finally:
        reg.stop()


def _mtls_home(regs: Registries, mtls: Registry, home: Path, pair: bool) -> Path:
    """HOME's certs.d directory for the registry: the CA, and a client pair if `pair`."""
    d = regs.ca.certs_d(home / ".config/containers/certs.d", mtls.host)
    if pair:
        regs.ca.client_pair(d)
    return d


def test_client_certificate_from_certs_d_is_presented(regs: Registries, mtls: Registry,
                                                      tmp_path: Path) -> None:
    """certs.d's client.cert + client.key (found under HOME, not passed) are presented;
    the registry verifies them, and skopeo, given the same directory, reads back what
    the session pushed."""
    d = _mtls_home(regs, mtls, tmp_path, pair=True)
    s = open_session(mtls.host, RegistryOptions(env={"HOME": str(tmp_path)}))
    try:
        assert s.tls is not None and s.tls.client_cert == d / "client.cert"
        digest, _ = _push_image(s, "mtls/app", "v1")
    finally:
        s.close()
    res = subprocess.run(["skopeo", "inspect", "--cert-dir", str(d),
                          f"docker://{mtls.host}/mtls/app:v1"], capture_output=True, text=True,
                         timeout=60, env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["Digest"] == digest


def test_without_client_certificate_names_the_certs_d_directory(
        regs: Registries, mtls: Registry, tmp_path: Path) -> None:
    """No pair: one line naming the directory to put one in, with TLS verification on or
    off (off must not fall back to plain HTTP: the alert proves the registry speaks
    TLS). A pair the registry does not trust (another CA's): named as refused."""
    d = _mtls_home(regs, mtls, tmp_path, pair=False)
    for verify in (True, False):
        with pytest.raises(RegistryAccessError) as e:
            open_session(mtls.host, RegistryOptions(tls_verify=verify,
                                                    env={"HOME": str(tmp_path)}))
        assert str(e.value) == (
            f"registry {mtls.host}: TLS: the registry requires a client certificate and "
            "none was presented (TLS alert: bad certificate); put one as a NAME.cert + "
            f"NAME.key pair in {d} (or pass --src-cert-dir/--dest-cert-dir)")
    stranger = LoopbackCA.create(tmp_path / "stranger")
    stranger.client_pair(d, "other")
    with pytest.raises(RegistryAccessError) as e:
        open_session(mtls.host, RegistryOptions(env={"HOME": str(tmp_path)}))
    assert str(e.value) == (
        f"registry {mtls.host}: TLS: the registry refused the client certificate "
        f"{d / 'other.cert'} (TLS alert: bad certificate); it must be signed by a CA the "
        "registry trusts for clients (its tls.clientcas) and be valid now")


def test_client_certificate_through_the_command_line(regs: Registries, mtls: Registry,
                                                     tmp_path: Path) -> None:
    """`optimize docker://… docker://…` against the registry that requires a client
    certificate: it works with the pair in HOME's certs.d, and without it fails with the
    one-line TLS error naming the directory (exit 1)."""
    d = _mtls_home(regs, mtls, tmp_path, pair=True)
    s = open_session(mtls.host, RegistryOptions(env={"HOME": str(tmp_path)}))
    try:
        _push_image(s, "mtls/src", "v1")
    finally:
        s.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in (
            "REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME")}
        return subprocess.run([*cli_argv(), "--log-level", "error",
                               *args], capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL, env={**env, "HOME": str(tmp_path)})

    src, dst = f"docker://{mtls.host}/mtls/src:v1", f"docker://{mtls.host}/mtls/dst:v1"
    proc = cli("optimize", "--oci", "--no-optimize", "--no-cache", src, dst)
    assert proc.returncode == 0, proc.stderr
    assert cli("verify", dst).returncode == 0
    for f in (d / "client.cert", d / "client.key"):
        f.unlink()
    proc = cli("verify", dst)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"estargz-opt: error: registry {mtls.host}: TLS: the registry requires a client "
        "certificate and none was presented (TLS alert: bad certificate); put one as a "
        f"NAME.cert + NAME.key pair in {d} (or pass --src-cert-dir/--dest-cert-dir)"]


def test_tls_verify_false_is_https_unverified_then_plain_http(regs: Registries) -> None:
    """skopeo's meaning: a TLS registry is still spoken to over HTTPS (unverified); a
    plain one falls back to HTTP. With verification on, plain HTTP is never tried."""
    opts = RegistryOptions(tls_verify=False, env={"HOME": "/nonexistent"})
    for reg, scheme in ((regs.tls, "https"), (regs.plain, "http")):
        s = open_session(reg.host, opts)
        try:
            assert s.base_url == f"{scheme}://{reg.host}"
            assert s.client.get(f"{s.base_url}/v2/").status_code == 200
        finally:
            s.close()
    with pytest.raises(RegistryAccessError, match=r": TLS: the registry does not speak TLS .*"
                       r"use --tls-verify=false"):
        open_session(regs.plain.host, RegistryOptions(env={"HOME": "/nonexistent"}))


def test_connection_refused_and_dns(tmp_path: Path) -> None:
    opts = RegistryOptions(tls_verify=False, env={"HOME": str(tmp_path)})
    host = f"127.0.0.1:{_free_port()}"
    with pytest.raises(RegistryAccessError, match=rf"^registry {host}: connection refused"):
        open_session(host, opts)
    with pytest.raises(RegistryAccessError,
                       match=r"^registry no-such-registry\.invalid:5000: cannot resolve the "
                             r"host name no-such-registry\.invalid \(DNS\)$"):
        open_session("no-such-registry.invalid:5000", opts)


def test_creds_without_password_is_an_error(regs: Registries) -> None:
    with pytest.raises(RegistryAccessError, match="no password given for user 'bob'"):
        open_session(regs.plain.host, RegistryOptions(creds="bob", tls_verify=False))


# --------------------------------------------------------------------------- credential sources


HELPER = """#!/bin/sh
# docker-credential-test: the server on stdin; JSON for {host}, else "not found".
read -r server
echo "$server" >> "{log}"
if [ "$server" = "{host}" ]; then
  printf '{{"ServerURL":"%s","Username":"{user}","Secret":"{password}"}}\\n' "$server"
  exit 0
fi
echo "credentials not found in native keychain"
exit 1
"""


def _auth_json(key: str, user: str = USER, password: str = PASSWORD) -> dict[str, object]:
    return {"auths": {key: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}


def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def basic_image(regs: Registries, certs_d: Path) -> None:
    """ns/app:v1 and other/app:v1 on the basic-auth registry."""
    s = open_session(regs.basic.host, _opts(regs, "basic", certs_d))
    try:
        _push_image(s, "ns/app", "v1")
        _push_image(s, "other/app", "v1")
    finally:
        s.close()


def _home_opts(regs: Registries, certs_d: Path, home: Path, env: dict[str, str] | None = None,
               authfile: Path | None = None, creds: str | None = None,
               no_creds: bool = False) -> RegistryOptions:
    """Options for the basic-auth registry with HOME (and PATH's first entry) in `home`."""
    return RegistryOptions(
        authfile=authfile, creds=creds, no_creds=no_creds, cert_dir=certs_d / regs.basic.host,
        env={"HOME": str(home), "PATH": f"{home / 'bin'}:{os.defpath}", **(env or {})})


def _pull_tags(s: Session, repo: str) -> list[str]:
    r = s.client.get(f"{s.base_url}/v2/{repo}/tags/list")
    assert r.status_code == 200, r.text
    tags: list[str] = r.json()["tags"]
    return tags


# Where each auth file is, relative to HOME, and the environment that points there.
AUTH_FILE_PLACES = {
    "REGISTRY_AUTH_FILE": ("elsewhere/auth.json",
                           {"REGISTRY_AUTH_FILE": "{home}/elsewhere/auth.json"}),
    "XDG_RUNTIME_DIR": ("run/containers/auth.json", {"XDG_RUNTIME_DIR": "{home}/run"}),
    "~/.config": (".config/containers/auth.json", {}),
    "XDG_CONFIG_HOME": ("cfg/containers/auth.json", {"XDG_CONFIG_HOME": "{home}/cfg"}),
    "DOCKER_CONFIG": ("dcfg/config.json", {"DOCKER_CONFIG": "{home}/dcfg"}),
    "~/.docker": (".docker/config.json", {}),
}


@pytest.mark.parametrize("place", sorted(AUTH_FILE_PLACES))
@pytest.mark.usefixtures("basic_image")
def test_each_auth_file_place(regs: Registries, certs_d: Path, tmp_path: Path,
                              place: str) -> None:
    rel, env = AUTH_FILE_PLACES[place]
    path = _write(tmp_path / rel, _auth_json(regs.basic.host))
    opts = _home_opts(regs, certs_d, tmp_path,
                      env={k: v.format(home=tmp_path) for k, v in env.items()})
    s = open_session(regs.basic.host, opts)
    try:
        assert _pull_tags(s, "ns/app") == ["v1"]
        assert s.credential_source == f"auth file {path} (key {regs.basic.host})"
    finally:
        s.close()


@pytest.mark.usefixtures("basic_image")
def test_authfile_option_legacy_dockercfg_and_url_keys(regs: Registries, certs_d: Path,
                                                       tmp_path: Path) -> None:
    host = regs.basic.host
    named = _write(tmp_path / "named.json", _auth_json(f"https://{host}/v1/"))
    s = open_session(host, _home_opts(regs, certs_d, tmp_path, authfile=named))
    try:
        assert _pull_tags(s, "ns/app") == ["v1"]
        assert s.credential_source == f"auth file {named} (key https://{host}/v1/)"
    finally:
        s.close()
    named.unlink()
    legacy = _write(tmp_path / ".dockercfg", _auth_json(host)["auths"])
    s = open_session(host, _home_opts(regs, certs_d, tmp_path))
    try:
        assert _pull_tags(s, "ns/app") == ["v1"]
        assert s.credential_source == f"auth file {legacy} (key {host})"
    finally:
        s.close()


@pytest.mark.usefixtures("basic_image")
def test_first_file_with_an_answer_wins(regs: Registries, certs_d: Path,
                                        tmp_path: Path) -> None:
    """XDG_RUNTIME_DIR's file before ~/.docker; a named auth file takes the primary
    file's place only, so ~/.config and then ~/.docker are still read after it
    (containers-auth.json(5))."""
    host = regs.basic.host
    good = _write(tmp_path / "run/containers/auth.json", _auth_json(host))
    _write(tmp_path / ".docker/config.json", _auth_json(host, password="wrong"))
    s = open_session(host, _home_opts(regs, certs_d, tmp_path,
                                      env={"XDG_RUNTIME_DIR": str(tmp_path / "run")}))
    try:
        assert _pull_tags(s, "ns/app") == ["v1"]
        assert s.credential_source == f"auth file {good} (key {host})"
    finally:
        s.close()
    config = _write(tmp_path / ".config/containers/auth.json", _auth_json(host))
    _write(tmp_path / ".docker/config.json", _auth_json(host, password="wrong2"))
    named = _write(tmp_path / "empty.json", {"auths": {}})
    s = open_session(host, _home_opts(regs, certs_d, tmp_path, authfile=named))
    try:
        assert _pull_tags(s, "ns/app") == ["v1"]
        assert s.credential_source == f"auth file {config} (key {host})"
    finally:
        s.close()


@pytest.mark.usefixtures("basic_image")
def test_namespaced_keys_longest_match_first(regs: Registries, certs_d: Path,
                                             tmp_path: Path) -> None:
    host = regs.basic.host
    auths = {f"{host}/ns": _auth_json("x")["auths"]["x"],
             host: _auth_json("x", password="wrong")["auths"]["x"]}
    path = _write(tmp_path / ".docker/config.json", {"auths": auths})
    s = open_session(host, _home_opts(regs, certs_d, tmp_path))
    try:
        assert s.auth is not None
        assert _pull_tags(s, "ns/app") == ["v1"]
        assert s.auth.credential_source("ns/app") == f"auth file {path} (key {host}/ns)"
        with pytest.raises(RegistryAccessError) as e:
            s.client.get(f"{s.base_url}/v2/other/app/tags/list")
        assert str(e.value).endswith(
            f"unauthorized for repository other/app: the credentials from auth file {path} "
            f"(key {host}) were refused (basic auth)")
    finally:
        s.close()


@pytest.mark.parametrize("kind", ["credHelpers", "credsStore"])
@pytest.mark.usefixtures("basic_image")
def test_credential_helper_on_path(regs: Registries, certs_d: Path, tmp_path: Path,
                                   kind: str) -> None:
    host = regs.basic.host
    log = tmp_path / "helper.log"
    helper = tmp_path / "bin" / "docker-credential-test"
    helper.parent.mkdir()
    helper.write_text(HELPER.format(host=host, log=log, user=USER, password=PASSWORD))
    helper.chmod(0o755)
    config = {"credHelpers": {host: "test"}} if kind == "credHelpers" else \
        {"credsStore": "test", "auths": {host: {}}}
    _write(tmp_path / ".docker/config.json", config)
    s = open_session(host, _home_opts(regs, certs_d, tmp_path))
    try:
        assert _pull_tags(s, "ns/app") == ["v1"]
        assert _pull_tags(s, "other/app") == ["v1"]
        assert s.credential_source == "credential helper docker-credential-test"
    finally:
        s.close()
    # host-wide, then once per repository; never run twice for the same one
    assert log.read_text().splitlines() == [host] * 3
    # A helper with nothing for a registry is no answer: anonymous, then refused.
    helper.write_text(HELPER.format(host="elsewhere", log=log, user=USER, password=PASSWORD))
    s = open_session(host, _home_opts(regs, certs_d, tmp_path))
    try:
        assert s.credential_source == "none"
        with pytest.raises(RegistryAccessError, match="no credentials were found"):
            s.client.get(f"{s.base_url}/v2/ns/app/tags/list")
    finally:
        s.close()
    helper.unlink()
    with pytest.raises(RegistryAccessError,
                       match="credential helper docker-credential-test: not found on PATH"):
        open_session(host, _home_opts(regs, certs_d, tmp_path))


@pytest.mark.usefixtures("basic_image")
def test_command_line_creds_and_no_creds_override_files(regs: Registries, certs_d: Path,
                                                        tmp_path: Path) -> None:
    host = regs.basic.host
    _write(tmp_path / ".docker/config.json", _auth_json(host, password="wrong"))
    s = open_session(host, _home_opts(regs, certs_d, tmp_path, creds=CREDS))
    try:
        assert _pull_tags(s, "ns/app") == ["v1"]
    finally:
        s.close()
    _write(tmp_path / ".docker/config.json", _auth_json(host))
    s = open_session(host, _home_opts(regs, certs_d, tmp_path, no_creds=True))
    try:
        with pytest.raises(RegistryAccessError, match="no credentials were found"):
            s.client.get(f"{s.base_url}/v2/ns/app/tags/list")
    finally:
        s.close()


def test_bad_auth_file_is_one_line(regs: Registries, certs_d: Path, tmp_path: Path) -> None:
    bad = tmp_path / "auth.json"
    bad.write_text("{not json")
    with pytest.raises(RegistryAccessError, match=rf"^auth file {bad}: malformed JSON"):
        open_session(regs.basic.host, _home_opts(regs, certs_d, tmp_path, authfile=bad))


def test_identity_token_is_exchanged_at_the_realm(regs: Registries, certs_d: Path,
                                                  tmp_path: Path) -> None:
    """An `identitytoken` in an auth file: the OAuth2 refresh-token POST to the realm."""
    s = open_session(regs.token.host, _opts(regs, "token", certs_d))
    try:
        _push_image(s, "ident/app", "v1")
    finally:
        s.close()
    refresh = "refresh-7a61c0ffee"
    regs.issuer.refresh_tokens[refresh] = USER
    _write(tmp_path / ".docker/config.json",
           {"auths": {regs.token.host: {"identitytoken": refresh}}})
    regs.issuer.requests.clear()
    opts = RegistryOptions(cert_dir=certs_d / regs.token.host, env={"HOME": str(tmp_path)})
    s = open_session(regs.token.host, opts)
    try:
        assert _pull_tags(s, "ident/app") == ["v1"]
    finally:
        s.close()
    assert [(t.user, t.scopes, t.grant) for t in regs.issuer.requests] == [
        (USER, ["repository:ident/app:pull"], "refresh_token")]


def test_helper_identity_token_is_exchanged_at_the_realm(regs: Registries, certs_d: Path,
                                                         tmp_path: Path) -> None:
    """A credential helper answering the username `<token>` (what docker's helpers store
    after an OAuth2 login) hands over an identity token, not a password: it is exchanged
    by the refresh-token POST, never sent as Basic, and the real registry accepts the
    token that exchange got, for a pull and for a push."""
    host = regs.token.host
    refresh = "refresh-helper-5b0d"
    regs.issuer.refresh_tokens[refresh] = USER
    log = tmp_path / "helper.log"
    helper = tmp_path / "bin" / "docker-credential-ident"
    helper.parent.mkdir()
    helper.write_text(HELPER.format(host=host, log=log, user="<token>", password=refresh))
    helper.chmod(0o755)
    _write(tmp_path / ".docker/config.json", {"credHelpers": {host: "ident"}})
    opts = RegistryOptions(cert_dir=certs_d / host, env={
        "HOME": str(tmp_path), "PATH": f"{tmp_path / 'bin'}:{os.defpath}"})
    regs.issuer.requests.clear()
    regs.issuer.authorization_seen.clear()
    s = open_session(host, opts)
    try:
        assert s.credential_source == "credential helper docker-credential-ident"
        digest, _ = _push_image(s, "helper/app", "v1")
        assert _pull_tags(s, "helper/app") == ["v1"]
    finally:
        s.close()
    assert regs.issuer.requests, "tokens were fetched"
    assert {(t.user, t.grant, t.client_id, t.service) for t in regs.issuer.requests} == {
        (USER, "refresh_token", "estargz-opt", "estargz-opt-test-registry")}
    assert ["repository:helper/app:pull,push"] in [t.scopes for t in regs.issuer.requests]
    assert regs.issuer.authorization_seen == []  # no GET with Basic: only the POSTs
    assert _skopeo_inspect(regs, "token", certs_d, "helper/app:v1")["Digest"] == digest
    # The basic-auth registry cannot take an identity token: the error says so.
    helper.write_text(HELPER.format(host=regs.basic.host, log=log, user="<token>",
                                    password=refresh))
    _write(tmp_path / ".docker/config.json", {"credHelpers": {regs.basic.host: "ident"}})
    s = open_session(regs.basic.host, RegistryOptions(
        cert_dir=certs_d / regs.basic.host, env=opts.env))
    try:
        with pytest.raises(RegistryAccessError) as e:
            s.client.get(f"{s.base_url}/v2/helper/app/tags/list")
    finally:
        s.close()
    assert str(e.value) == (
        f"registry {regs.basic.host}: unauthorized for repository helper/app: credential "
        "helper docker-credential-ident gave an identity token (user <token>), which only a "
        "token server exchanges, and the registry asks for basic auth")


def test_docker_hub_keys(tmp_path: Path) -> None:
    """Docker Hub's API host finds `docker login`'s URL key, and a namespaced
    `docker.io/…` key before it; its helper is asked for the URL docker uses. (Lookup
    only: no test reaches Docker Hub itself.)"""
    log = tmp_path / "helper.log"
    helper = tmp_path / "bin" / "docker-credential-hub"
    helper.parent.mkdir()
    helper.write_text(HELPER.format(host="https://index.docker.io/v1/", log=log, user="hubber",
                                    password="x"))
    helper.chmod(0o755)
    hub = "registry-1.docker.io"
    path = _write(tmp_path / ".docker/config.json", {
        **_auth_json("https://index.docker.io/v1/", "url-user", "p1"),
        "credHelpers": {}})
    path_env = {"HOME": str(tmp_path), "PATH": str(tmp_path / "bin")}
    cred = credentials.lookup(hub, "library/alpine", RegistryOptions(env=path_env))
    assert cred is not None and (cred.username, cred.source) == (
        "url-user", f"auth file {path} (key https://index.docker.io/v1/)")
    data = json.loads(path.read_text())
    data["auths"]["docker.io/library"] = _auth_json("x", "ns-user", "p2")["auths"]["x"]
    path.write_text(json.dumps(data))
    cred = credentials.lookup(hub, "library/alpine", RegistryOptions(env=path_env))
    assert cred is not None and cred.username == "ns-user"
    path.write_text(json.dumps({"credHelpers": {"docker.io": "hub"}}))
    cred = credentials.lookup(hub, "library/alpine", RegistryOptions(env=path_env))
    assert cred is not None and cred.username == "hubber"
    assert log.read_text().splitlines() == ["https://index.docker.io/v1/"]
