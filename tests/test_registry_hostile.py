"""Registries that lie or stall: every run ends in one line, in a bounded time, with
nothing left behind, and the user's credentials go to the registry they named (and the
token server it announced) only.

A real docker-registry holds the image; `support.hostile.HostileServer` stands in front
of it as the registry the user names, and as the other hosts (a CDN, an upload host, a
token server) its redirects and headers lead to. Stalls run with --registry-timeout 1.
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import imagefactory as F, lazypull
from support.cli import cli_argv
from support.hostile import (
    Auth,
    Exchange,
    HostileServer,
    answer,
    challenge,
    endless,
    gzip_bomb,
    redirect,
    trickle_body,
    trickle_headers,
)
from support.peakrss import run_measured

pytestmark = pytest.mark.registry

PLAIN = ["--src-tls-verify=false", "--dest-tls-verify=false"]
#: the deadline stalls are run with, and the bound each such run must end within
#: (a hang, as before these bounds, lasts for ever; the margin is for a loaded machine)
DEADLINE = 1
STALL_BOUND = 20
#: the bound for any other failure
BOUND = 30
BLOB = r"^/v2/app/blobs/sha256:"
MANIFEST = r"^/v2/app/manifests/"
UPLOADS = r"^/v2/out/blobs/uploads/"


@dataclass
class Upstream:
    registry: lazypull.Registry
    layout: Path
    manifest: dict[str, Any]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """docker-registry holding app:1, two layers (one of 3 MiB) converted by us (so that `verify`
    passes it); the source image in an OCI layout, to push."""
    base = tmp_path_factory.mktemp("hostile")
    registry = lazypull.Registry.start(base)
    layout = base / "src"
    F.write_layout(layout, "1", [
        F.simple_layer({"etc/": None, "etc/hello": b"hello\n" * 500}),
        F.simple_layer({"data/": None, "data/x.bin": random.Random(7).randbytes(3 << 20)}),
    ])
    try:
        run = cli(base, "optimize", "--oci", "--no-optimize", "--no-cache", *PLAIN,
                  f"oci:{layout}:1", f"docker://{registry.host}/app:1")
        assert run.returncode == 0, run
        req = urllib.request.Request(f"http://{registry.host}/v2/app/manifests/1",
                                     headers={"Accept": F.OCI_MANIFEST})
        with urllib.request.urlopen(req, timeout=10) as r:
            manifest = json.loads(r.read())
        yield Upstream(registry, layout, manifest)
    finally:
        registry.stop()


@pytest.fixture
def front(upstream: Upstream) -> Iterator[HostileServer]:
    """The registry the user names: forwards to the real one unless a route says else."""
    with HostileServer(upstream=upstream.registry.host) as server:
        yield server


@pytest.fixture
def other() -> Iterator[HostileServer]:
    """Another host: a CDN, an upload host or a token server."""
    with HostileServer() as server:
        yield server


@dataclass
class Run:
    returncode: int
    stderr: str
    seconds: float


def cli(tmp_path: Path, *args: str, timeout: float = 120, **env_extra: str) -> Run:
    """Our CLI, with its temporary files in tmp_path/tmp (checked empty by `fails`)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path),
           "TMPDIR": str(tmp), "PYTHONPATH": ":".join(sys.path), **env_extra}
    started = time.monotonic()
    res = subprocess.run(cli_argv(*args), capture_output=True,
                         text=True, env=env, stdin=subprocess.DEVNULL, timeout=timeout)
    return Run(res.returncode, res.stderr, time.monotonic() - started)


def verify(tmp_path: Path, server: HostileServer, *extra: str) -> Run:
    return cli(tmp_path, "verify", "--tls-verify=false", "--registry-timeout", str(DEADLINE),
               *extra, f"docker://{server.host}/app:1")


def push(tmp_path: Path, upstream: Upstream, server: HostileServer, *extra: str) -> Run:
    return cli(tmp_path, "optimize", "--oci", "--no-optimize", "--no-cache", *PLAIN,
               "--registry-timeout", str(DEADLINE), *extra, f"oci:{upstream.layout}:1",
               f"docker://{server.host}/out:1")


def fails(run: Run, tmp_path: Path, *words: str, bound: float = BOUND) -> str:
    """The run failed in one line holding `words`, within `bound` s, leaving no file
    (an INFO log line, such as which platforms are converted, is not a failure's)."""
    lines = [line for line in run.stderr.strip().splitlines()
             if not line.startswith("estargz-opt: INFO: ")]
    assert run.returncode == 1, run
    assert len(lines) == 1 and lines[0].startswith("estargz-opt: error: "), run.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert run.seconds < bound, run
    assert list((tmp_path / "tmp").iterdir()) == []
    return lines[0]


def not_pushed(upstream: Upstream) -> None:
    """No destination tag was left behind."""
    assert manifest_status(upstream, "out", "1") == 404


def manifest_status(upstream: Upstream, repo: str, tag: str) -> int:
    req = urllib.request.Request(f"http://{upstream.registry.host}/v2/{repo}/manifests/{tag}",
                                 method="HEAD", headers={"Accept": F.OCI_MANIFEST})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def same_path_on(server: HostileServer) -> Callable[[Exchange], str]:
    """A redirect target: the request's own path on `server`."""
    return lambda ex: server.url + ex.path


# --------------------------------------------------------------------------- credentials


def secret_forms(server: HostileServer) -> list[bytes]:
    """The password, and the Basic header's encoding of it, in every form it could go."""
    pair = f"{server.user}:{server.password}".encode()
    return [server.password.encode(), base64.b64encode(pair), pair]


def saw_no_credentials(server: HostileServer, *secrets: bytes) -> None:
    assert server.seen, "the redirect target got no request: the test proves nothing"
    for seen in server.seen:
        assert not any(k.lower() == "authorization" for k in seen.headers), seen
        for s in secrets:
            assert s not in seen.raw, seen
    assert not [s for s in server.seen if s.path.startswith("/token")], server.seen


def test_a_cdn_redirect_works_anonymously(upstream: Upstream, front: HostileServer,
                                          other: HostileServer, tmp_path: Path) -> None:
    """Blobs and manifests redirected to a CDN that serves them: the run succeeds, and
    the CDN saw no credential."""
    front.auth = "basic"
    other.upstream = upstream.registry.host  # the CDN serves the registry's bytes
    front.on("GET", BLOB, redirect(same_path_on(other)))
    front.on("GET", MANIFEST, redirect(same_path_on(other), 302))
    run = verify(tmp_path, front, "--creds", f"{front.user}:{front.password}")
    assert run.returncode == 0, run
    assert any("/blobs/" in s.path for s in other.seen), other.seen
    saw_no_credentials(other, *secret_forms(front))
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("auth", ["basic", "token"])
@pytest.mark.parametrize("what", ["blob", "manifest", "upload"])
def test_credentials_never_reach_a_host_a_redirect_led_to(
        upstream: Upstream, front: HostileServer, other: HostileServer, tmp_path: Path,
        auth: Auth, what: str) -> None:
    """The redirect target answers 401 with a bearer challenge of its own: the run fails
    in one line naming it, and it never got an Authorization header or any form of the
    secret (nor did its token realm get asked)."""
    front.auth = auth
    other.on("*", "^/token", answer(200, b'{"token": "cdn-token"}'))
    other.on("*", "", challenge(lambda ex: f"{other.url}/token"))
    creds = ["--creds", f"{front.user}:{front.password}"]
    if what == "upload":
        front.on("POST", UPLOADS, redirect(same_path_on(other)))
        run = push(tmp_path, upstream, front, "--dest-creds", creds[1])
        not_pushed(upstream)
    else:
        front.on("GET", BLOB if what == "blob" else MANIFEST, redirect(same_path_on(other)))
        run = verify(tmp_path, front, *creds)
    secrets = secret_forms(front)
    saw_no_credentials(other, *secrets)
    fails(run, tmp_path, f"{other.host}, where a redirect led, answered 401")
    assert not any(s.decode() in run.stderr for s in secrets), run.stderr


# --------------------------------------------------------------------------- redirects


@pytest.mark.parametrize("path", ["/v2/app/manifests/1", "/v2/"])
def test_a_redirect_loop_on_one_host_is_one_line(front: HostileServer, tmp_path: Path,
                                                 path: str) -> None:
    """On a manifest, and on the session's first request (the ping)."""
    front.on("GET", f"^{path}$", redirect(lambda ex: front.url + ex.path))
    fails(verify(tmp_path, front), tmp_path, "more than 10 redirects (a redirect loop?), "
          f"the last to http://{front.host}{path}")


def test_a_redirect_loop_over_two_hosts_is_one_line(front: HostileServer,
                                                    other: HostileServer,
                                                    tmp_path: Path) -> None:
    front.on("GET", MANIFEST, redirect(same_path_on(other)))
    other.on("GET", MANIFEST, redirect(same_path_on(front)))
    fails(verify(tmp_path, front), tmp_path, "more than 10 redirects", "/v2/app/manifests/1")


def test_a_redirect_loop_on_an_upload_post_is_one_line(upstream: Upstream,
                                                       front: HostileServer,
                                                       tmp_path: Path) -> None:
    front.on("POST", UPLOADS, redirect(lambda ex: front.url + ex.path))
    fails(push(tmp_path, upstream, front), tmp_path, "more than 10 redirects",
          f"the last to http://{front.host}/v2/out/blobs/uploads/")
    not_pushed(upstream)


# --------------------------------------------------------------------------- stalls


def _stalled(what: str, front: HostileServer, other: HostileServer, upstream: Upstream
             ) -> str:
    """Set `front` (and `other`, as a token server) up to stall at `what`; the
    command to run ("verify" or "push")."""
    if what == "ping headers":
        front.on("GET", r"^/v2/$", trickle_headers())
    elif what == "manifest body":
        front.on("GET", MANIFEST, trickle_body(headers={"Content-Type": F.OCI_MANIFEST}))
    elif what == "blob body":
        front.on("GET", BLOB, trickle_body(size=1 << 30))
    elif what == "token headers":
        front.auth, front.realm = "token", f"{other.url}/token"
        other.on("GET", "^/token", trickle_headers())
    elif what == "upload POST headers":
        front.on("POST", UPLOADS, trickle_headers())
        return "push"
    elif what == "upload PATCH headers":
        # the streamed PATCH first, then the upload again from the spool
        front.on("PATCH", UPLOADS, trickle_headers())
        return "push"
    return "verify"


@pytest.mark.parametrize("what", ["ping headers", "manifest body", "blob body",
                                  "token headers", "upload POST headers",
                                  "upload PATCH headers"])
def test_a_trickling_server_fails_at_the_deadline(upstream: Upstream, front: HostileServer,
                                                  other: HostileServer, tmp_path: Path,
                                                  what: str) -> None:
    """One byte every half second keeps per-read timeouts happy; the request's deadline
    (1 s here) ends it: one line, well within the bound, with no retry. (A minimum rate
    of 4 MiB/s, so that the 3 MiB a PATCH sends buy it under a second more.)"""
    rate = ["--registry-min-rate", "4096"]
    if _stalled(what, front, other, upstream) == "push":
        run = push(tmp_path, upstream, front, *rate)
        not_pushed(upstream)
    else:
        run = verify(tmp_path, front, *rate, *(["--creds", f"{front.user}:{front.password}"]
                                               if front.auth else []))
    fails(run, tmp_path, f"no complete answer within {DEADLINE} s", bound=STALL_BOUND)


def test_a_slow_link_passes_where_a_trickle_does_not(upstream: Upstream,
                                                     tmp_path: Path) -> None:
    """Through an 8 Mbit/s link the 3 MiB layer takes over 3 s, past --registry-timeout
    1: at the default minimum rate (256 KiB/s) its bytes buy it the time; at 2 MiB/s
    they do not, and the download stops once it falls behind, in one line."""
    proxy = lazypull.Proxy.start(upstream.registry.host, tmp_path / "proxy.jsonl", mbit=8)
    try:
        image = f"docker://{proxy.host}/app:1"
        slow = cli(tmp_path, "verify", "--tls-verify=false", "--registry-timeout", "1", image)
        assert slow.returncode == 0 and slow.seconds > 3, slow
        fails(cli(tmp_path, "verify", "--tls-verify=false", "--registry-timeout", "1",
                  "--registry-min-rate", "2048", image), tmp_path,
              "no complete answer within 1 s plus 1 s per 2048 KiB moved", bound=STALL_BOUND)
    finally:
        proxy.stop()


def test_the_deadline_can_be_set_in_the_environment(front: HostileServer,
                                                    tmp_path: Path) -> None:
    front.on("GET", r"^/v2/$", trickle_headers())
    fails(cli(tmp_path, "inspect", "--tls-verify=false", f"docker://{front.host}/app:1",
              ESTARGZ_OPT_REGISTRY_TIMEOUT="1.5"), tmp_path,
          "no complete answer within 1.5 s", bound=STALL_BOUND)


def test_the_deadline_holds_through_a_proxy_the_environment_names(
        front: HostileServer, tmp_path: Path) -> None:
    """ALL_PROXY is honoured, on connections bounded like any other: a proxy that
    trickles its answer to the CONNECT of the ping is cut at the deadline."""
    front.on("*", "", trickle_headers())
    fails(cli(tmp_path, "inspect", "--tls-verify=false", "--registry-timeout", "1",
              "docker://127.0.0.1:9/app:1", ALL_PROXY=front.url), tmp_path,
          "no complete answer within 1 s", bound=STALL_BOUND)
    assert [s.method for s in front.seen] == ["CONNECT"] and \
        front.seen[0].path == "127.0.0.1:9", front.seen


# --------------------------------------------------------------------------- big bodies


@pytest.mark.parametrize("what", ["ping", "token", "config", "tags list", "error body"])
def test_an_endless_body_is_cut_at_its_cap(upstream: Upstream, front: HostileServer,
                                           other: HostileServer, tmp_path: Path,
                                           what: str) -> None:
    words = ["is larger than"]
    if what == "ping":
        front.on("GET", r"^/v2/$", endless())
    elif what == "token":
        front.auth, front.realm = "token", f"{other.url}/token"
        other.on("GET", "^/token", endless(headers={"Content-Type": "application/json"}))
        words.append(f"its token server {other.host}")
    elif what == "config":
        front.on("GET", f"/blobs/{upstream.manifest['config']['digest']}$", endless())
        words.append(f"is larger than {upstream.manifest['config']['size']} bytes")
    elif what == "tags list":
        front.on("GET", MANIFEST, answer(404, b"{}"))
        front.on("GET", r"^/v2/app/tags/list", endless())
        words.append("listing tags: the answer is larger than 1048576 bytes")
    else:
        front.on("GET", MANIFEST, endless(400, {"Content-Type": "application/json"}))
        words = ["tag '1': 400"]
    creds = ["--creds", f"{front.user}:{front.password}"] if front.auth else []
    fails(verify(tmp_path, front, "--registry-timeout", "60", *creds), tmp_path, *words)


def test_a_gzip_bomb_on_the_ping_is_never_inflated(upstream: Upstream, front: HostileServer,
                                                   tmp_path: Path) -> None:
    """256 MiB of zeros gzipped (0.25 MiB) as the ping's body: the run succeeds in a
    fraction of that memory."""
    front.on("GET", r"^/v2/$", answer(200, gzip_bomb(256 << 20),
                                      {"Content-Encoding": "gzip"}))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    measured = run_measured(["env", f"TMPDIR={tmp}", f"HOME={tmp_path}",
                             *cli_argv("verify", "--tls-verify=false",
                                       f"docker://{front.host}/app:1")], timeout=120,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert measured is not None and measured.returncode == 0, measured
    assert measured.rss_mib < 160, measured
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("body,headers,words", [
    (None, {"Content-Encoding": "gzip"}, "is larger than 4194304 bytes once decoded (gzip)"),
    (b"not gzip at all", {"Content-Encoding": "gzip"}, "is not valid gzip"),
    (b"{}", {"Content-Encoding": "x-garbage, br"}, "a Content-Encoding we cannot read"),
], ids=["gzip bomb", "bad gzip", "unknown encoding"])
def test_a_manifest_content_encoding_is_decoded_under_the_cap_or_refused(
        front: HostileServer, tmp_path: Path, body: bytes | None, headers: dict[str, str],
        words: str) -> None:
    """(None: a 64 MiB gzip bomb.)"""
    front.on("GET", MANIFEST, answer(200, gzip_bomb(64 << 20) if body is None else body,
                                     {**headers, "Content-Type": F.OCI_MANIFEST}))
    fails(verify(tmp_path, front), tmp_path, "tag '1'", words)


# --------------------------------------------------------------------------- malformed


def test_a_deeply_nested_manifest_is_one_line(front: HostileServer, tmp_path: Path) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    front.on("GET", MANIFEST, answer(200, deep, {"Content-Type": F.OCI_MANIFEST}))
    fails(verify(tmp_path, front), tmp_path, "JSON nested deeper than 64 levels")


def test_a_redirect_to_an_invalid_url_is_one_line_at_once(front: HostileServer,
                                                          tmp_path: Path) -> None:
    front.on("GET", MANIFEST, redirect("http://[::1/x"))
    fails(verify(tmp_path, front), tmp_path, "tag '1': a redirect to an unusable URL")
    assert len([s for s in front.seen if "/manifests/" in s.path]) == 1  # not retried


def test_an_invalid_upload_location_is_one_line(upstream: Upstream, front: HostileServer,
                                                tmp_path: Path) -> None:
    front.on("POST", UPLOADS, answer(202, headers={"Location": "http://[::1/upload"}))
    fails(push(tmp_path, upstream, front), tmp_path,
          "the registry sent an unusable Location 'http://[::1/upload'")
    not_pushed(upstream)


@pytest.mark.parametrize("realm", ["http://[::1/token", "file:///etc/passwd"])
def test_an_invalid_token_realm_is_one_line(front: HostileServer, tmp_path: Path,
                                            realm: str) -> None:
    front.auth, front.realm = "token", realm
    fails(verify(tmp_path, front, "--creds", f"{front.user}:{front.password}"), tmp_path,
          f"its token realm {realm!r} is not an http(s) URL")


# --------------------------------------------------------------------------- upload hosts


def test_a_relative_location_is_relative_to_the_upload_host(
        upstream: Upstream, front: HostileServer, other: HostileServer,
        tmp_path: Path) -> None:
    """Uploads are redirected to another host, which answers with relative Locations:
    they name that host (RFC 9110), and the registry itself takes no upload."""
    other.upstream = upstream.registry.host
    front.on("POST", UPLOADS, redirect(same_path_on(other)))
    front.on("*", UPLOADS + ".", answer(404, b"{}"))
    run = push(tmp_path, upstream, front)
    assert run.returncode == 0, run
    patches = [s for s in other.seen if s.method in ("PATCH", "PUT")]
    assert patches and all(s.path.startswith("/v2/out/blobs/uploads/") for s in patches)
    assert not [s for s in front.seen if s.method in ("PATCH", "PUT")
                and "/blobs/uploads/" in s.path], front.seen
    assert cli(tmp_path, "verify", "--tls-verify=false",
               f"docker://{upstream.registry.host}/out:1").returncode == 0
