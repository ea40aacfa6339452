"""docker:// sources and destinations against a real registry (Debian's docker-registry,
distribution 2.8, plain HTTP on loopback), with tests/support/throttle_proxy.py in front of it,
unthrottled, logging every request: the log shows which bytes moved.

Source images are pushed by skopeo (not by us), and what we push is checked by skopeo
(inspect, and copy to an OCI layout, which checks every digest) and by our verify.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import imagefactory as F, lazypull
from support.cli import cli_argv, cli_env, estargz_opt, run_cli

from estargz_opt.reference import RegistryRef
from estargz_opt.stores.registry.options import RegistryOptions
from estargz_opt.stores.registry.store import RegistryStore

pytestmark = pytest.mark.registry

FORMATS = {
    "estargz": [],
    "external-toc": ["--estargz-external-toc"],
    "zstdchunked": ["--zstdchunked"],
}
PLAIN = ["--src-tls-verify=false", "--dest-tls-verify=false"]


def image_layers(seed: int) -> list[bytes]:
    """Three small layers: text, random bytes over two chunks, a few links and dirs."""
    rnd = random.Random(seed)
    return [
        F.simple_layer({"etc/": None, "etc/hello": b"hello\n" * 500, "bin/tool": b"#!x" * 9}),
        F.simple_layer({"data/": None, "data/blob.bin": rnd.randbytes(5 << 20)}),
        F.simple_layer({"app/": None, f"app/{seed}.txt": str(seed).encode() * 100}),
    ]


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, (args, res.stdout, res.stderr)
    return res


@dataclass
class Env:
    base: Path
    registry: lazypull.Registry
    proxy: lazypull.Proxy

    @property
    def host(self) -> str:
        return self.proxy.host

    def push_source(self, repo: str, seed: int, docker: bool = False) -> str:
        """An image pushed by skopeo: docker://PROXY/REPO:1."""
        layout = self.base / f"src-{repo.replace('/', '-')}-{seed}"
        F.write_layout(layout, "1", image_layers(seed))
        ref = f"docker://{self.host}/{repo}:1"
        fmt = ["--format", "v2s2"] if docker else []
        skopeo("copy", "--dest-tls-verify=false", *fmt, f"oci:{layout}:1", ref)
        return ref

    def blob_writes(self) -> list[dict]:
        """Logged requests that send blob data, mount a blob or open an upload, but for
        the destination's push check (`push_checks`), which sends no byte."""
        checks = self.push_checks()
        return [r for r in self.proxy.requests()
                if "/blobs/uploads/" in r["path"] and r["method"] in ("POST", "PATCH", "PUT")
                and r not in checks]

    def push_checks(self) -> list[dict]:
        """Upload sessions opened (a bare POST) and cancelled (a DELETE of it) with no
        byte sent in between: the push check a registry destination makes on entry."""
        reqs = self.proxy.requests()
        out = []
        for i, r in enumerate(reqs):
            if r["method"] == "POST" and r["path"].endswith("/blobs/uploads/") and \
                    i + 1 < len(reqs) and reqs[i + 1]["method"] == "DELETE" and \
                    "/blobs/uploads/" in reqs[i + 1]["path"]:
                out += [r, reqs[i + 1]]
        return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("registry")
    registry = lazypull.Registry.start(base)
    proxy = lazypull.Proxy.start(registry.host, base / "requests.jsonl")
    try:
        yield Env(base, registry, proxy)
    finally:
        proxy.stop()
        registry.stop()


def check_pushed(env: Env, ref: str, tmp: Path) -> dict:
    """skopeo reads it and copies it (checking every digest); our verify passes it."""
    info = json.loads(skopeo("inspect", "--tls-verify=false", ref).stdout)
    out = tmp / ("copy-" + ref.rsplit(":", 1)[1])
    skopeo("copy", "--src-tls-verify=false", ref, f"oci:{out}:x")
    estargz_opt("verify", "--tls-verify=false", ref)
    shown = json.loads(estargz_opt("inspect", "--json", "--tls-verify=false", ref).stdout)
    assert shown["digest"] == info["Digest"] and len(shown["layers"]) == len(info["Layers"])
    return info


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_registry_to_registry(env: Env, fmt: str, tmp_path: Path) -> None:
    src = env.push_source("app", seed=1)
    dst = f"docker://{env.host}/app-out:{fmt}"
    res = estargz_opt("optimize", "--oci", "--no-optimize", *FORMATS[fmt], *PLAIN, src, dst)
    digest = res.stdout.strip().splitlines()[-1]
    info = check_pushed(env, dst, tmp_path)
    assert info["Digest"] == digest
    assert len(info["Layers"]) == 3
    if fmt == "external-toc":
        assert f"extra image: {dst}-esgztoc" in res.stdout
        toc = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", dst + "-esgztoc")
                         .stdout)
        assert len(toc["layers"]) == 3


def test_docker_media_types_source(env: Env, tmp_path: Path) -> None:
    src = env.push_source("docker-types", seed=2, docker=True)
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", src).stdout)
    assert raw["mediaType"] == F.DOCKER_MANIFEST
    dst = f"docker://{env.host}/docker-types:esgz"
    estargz_opt("optimize", "--oci", "--no-optimize", *PLAIN, src, dst)
    out = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", dst).stdout)
    assert out["mediaType"] == F.OCI_MANIFEST
    check_pushed(env, dst, tmp_path)


def test_mixed_transports(env: Env, containerd, tmp_path: Path) -> None:
    src = env.push_source("mixed", seed=3)
    # registry -> oci
    layout = tmp_path / "out"
    estargz_opt("optimize", "--oci", "--no-optimize", "--src-tls-verify=false", src,
                f"oci:{layout}:esgz")
    estargz_opt("verify", f"oci:{layout}:esgz")
    # oci -> registry
    to_reg = f"docker://{env.host}/mixed:from-oci"
    estargz_opt("optimize", "--oci", "--no-optimize", "--dest-tls-verify=false",
                f"oci:{layout}:esgz", to_reg, "--reuse")
    check_pushed(env, to_reg, tmp_path)
    # containerd -> registry
    srclayout = tmp_path / "ctr-src"
    F.write_layout(srclayout, "1", image_layers(4))
    name = "registry-test/mixed:1"
    containerd.ctr("images", "import", "--no-unpack",
                   str(F.archive_for_ctr(srclayout, "1", name, tmp_path / "img.tar")))
    from_ctr = f"docker://{env.host}/mixed:from-containerd"
    estargz_opt("-a", containerd.address, "optimize", "--oci", "--no-optimize",
                "--dest-tls-verify=false", name, from_ctr)
    check_pushed(env, from_ctr, tmp_path)
    # registry -> containerd
    back = "registry-test/mixed:from-registry"
    digest = estargz_opt("-a", containerd.address, "optimize", "--oci", "--no-optimize",
                         "--src-tls-verify=false", src, back).stdout.strip().splitlines()[-1]
    estargz_opt("-a", containerd.address, "verify", back)
    listed = containerd.ctr("images", "ls").stdout
    assert back in listed and digest in listed, listed


def test_platform_fetches_only_what_it_converts(env: Env, tmp_path: Path) -> None:
    layout = tmp_path / "multi"
    host = F.HOST_PLATFORM
    other = "linux/s390x" if "s390x" not in F.platform_str(host) else "linux/amd64"
    host_layers, other_layers = image_layers(5), image_layers(50)
    F.write_index(layout, "1", [(host, host_layers), (other, other_layers)])
    src = f"docker://{env.host}/multi:1"
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:1", src)
    env.proxy.clear()
    estargz_opt("optimize", "--oci", "--no-optimize", "--platform", F.platform_str(host), *PLAIN,
                src, f"docker://{env.host}/multi:esgz")
    other_digests = ({F.sha256_digest(F.gzip_layer(x)) for x in other_layers}
                     - {F.sha256_digest(F.gzip_layer(x)) for x in host_layers})
    assert len(other_digests) == 2
    fetched = {r["path"].rsplit("/", 1)[1] for r in env.proxy.requests()
               if r["method"] == "GET" and "/blobs/sha256:" in r["path"]}
    assert fetched and not fetched & other_digests, fetched


def test_more_layers_than_are_fetched_ahead(env: Env, tmp_path: Path) -> None:
    """Twelve layers, one of them twice: more than the store fetches ahead (4 waiting on
    disk, 2 at once), each read once by its conversion."""
    rnd = random.Random(14)
    layers = [F.simple_layer({f"f{i}": rnd.randbytes(300_000)}) for i in range(11)]
    layout = tmp_path / "many"
    F.write_layout(layout, "1", [*layers, layers[3]])
    src = f"docker://{env.host}/many:1"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:1", src)
    env.proxy.clear()
    dst = f"docker://{env.host}/many:esgz"
    estargz_opt("optimize", "--oci", "--no-optimize", "--no-cache", *PLAIN, src, dst)
    gets = [r["path"] for r in env.proxy.requests()
            if r["method"] == "GET" and "/blobs/sha256:" in r["path"]]
    config = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", src).stdout)["config"]
    layer_gets = [g for g in gets if g.rsplit("/", 1)[1] != config["digest"]]
    assert len(layer_gets) == 12 and len(set(layer_gets)) == 11, gets
    assert len(check_pushed(env, dst, tmp_path)["Layers"]) == 12


# --------------------------------------------------------------------------- bytes moved


def test_rerun_uploads_nothing_and_another_repository_is_a_mount(env: Env) -> None:
    src = env.push_source("moved", seed=6)
    dst = f"docker://{env.host}/moved-out:esgz"
    estargz_opt("optimize", "--oci", "--no-optimize", *PLAIN, src, dst)
    # The rerun's conversions come from the (warm) layer cache, and the target holds
    # every blob: nothing recompressed, nothing uploaded.
    env.proxy.clear()
    res = estargz_opt("optimize", "--oci", "--no-optimize", "--json", *PLAIN, src, dst)
    report = json.loads(res.stdout)
    assert [x["cache"] for x in report["layers"]] == ["hit"] * 3, report
    assert env.blob_writes() == [], env.blob_writes()
    # the one upload session the run opened was the push check's, cancelled at once
    assert [(r["method"], r["status"]) for r in env.push_checks()] == \
        [("POST", 202), ("DELETE", 204)], env.proxy.requests()
    # With no cache, a conversion's digest is known only once it is written, and it is
    # streamed as it is written: the three layers go up again (to the same digests);
    # the config, known before it is written, is found by HEAD and not sent.
    env.proxy.clear()
    estargz_opt("optimize", "--oci", "--no-optimize", "--no-cache", *PLAIN, src, dst)
    layers = {x["target"]["digest"] for x in report["layers"]}
    streamed = [r for r in env.blob_writes() if r["method"] == "PATCH"]
    puts = {urllib.parse.unquote(r["path"]).rsplit("digest=", 1)[1]
            for r in env.blob_writes() if r["method"] == "PUT"}
    assert len(streamed) == 3 and puts == layers, env.blob_writes()

    # A second tag in another repository of the same registry: every blob mounted.
    env.proxy.clear()
    other = f"docker://{env.host}/moved-copy:esgz"
    estargz_opt("optimize", "--oci", "--no-optimize", "--reuse", *PLAIN, dst, other)
    writes = env.blob_writes()
    mounts = [r for r in writes if "mount=" in r["path"]]
    assert len(mounts) == 4 and all(r["status"] == 201 for r in mounts), writes  # 3 + config
    assert all("from=moved-out" in urllib.parse.unquote(r["path"]) for r in mounts), mounts
    assert not [r for r in writes if r["method"] in ("PATCH", "PUT")], writes
    assert manifest_status_at(env.registry.host, "moved-copy", "esgz") == 200


# --------------------------------------------------------------------------- faults


def test_unknown_repository_and_tag(env: Env) -> None:
    env.push_source("known", seed=7)
    for ref, reason in [(f"docker://{env.host}/never-pushed:1", "repository not found"),
                        (f"docker://{env.host}/known:nope", "tag 'nope': not found")]:
        res = estargz_opt("verify", "--tls-verify=false", ref, check=False)
        assert res.returncode == 1, res
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("estargz-opt: error: "), res.stderr
        assert f"registry {env.host}" in lines[0] and reason in lines[0], lines


def test_references_as_skopeo_reads_them() -> None:
    from estargz_opt.reference import RegistryRef, parse

    digest = "sha256:" + "ab" * 32
    cases = {
        "docker://busybox": ("docker.io", "library/busybox", "latest", None),
        "docker://docker.io/library/busybox:1.36": ("docker.io", "library/busybox", "1.36", None),
        "docker://user/app": ("docker.io", "user/app", "latest", None),
        "docker://localhost/app:v1": ("localhost", "app", "v1", None),
        "docker://127.0.0.1:5000/team/app": ("127.0.0.1:5000", "team/app", "latest", None),
        f"docker://reg.example/app@{digest}": ("reg.example", "app", None, digest),
    }
    for text, (registry, repository, tag, dig) in cases.items():
        ref = parse(text)
        assert ref == RegistryRef(registry, repository, tag, dig), (text, ref)
    assert parse("docker://busybox").api_host == "registry-1.docker.io"  # type: ignore[union-attr]
    assert str(parse("docker://busybox")) == "docker://docker.io/library/busybox:latest"


def test_unknown_host_is_one_line_at_once() -> None:
    res = estargz_opt("verify", "--tls-verify=false", "docker://no-such-host.invalid/app:1",
                      check=False)
    assert res.returncode == 1, res
    # One line, at once: the session's first request (host-wide, so no repository is
    # named) is not retried, whatever the resolver said.
    assert res.stderr.splitlines() == [
        "estargz-opt: error: registry no-such-host.invalid: cannot resolve the host name "
        "no-such-host.invalid (DNS)"], res.stderr


def test_plain_http_registry_with_tls_verification_fails_at_once(env: Env) -> None:
    res = estargz_opt("verify", f"docker://{env.host}/app:1", check=False)
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    # One line: no "retrying" lines before it (a TLS failure is not retried).
    assert len(lines) == 1 and re.fullmatch(
        rf"estargz-opt: error: registry {re.escape(env.host)}: TLS: the registry does not "
        r"speak TLS \(.+\); for a plain-HTTP registry use --tls-verify=false "
        r"\(--src-tls-verify=false/--dest-tls-verify=false with optimize\)", lines[0]), lines


def test_bad_references_exit_2() -> None:
    for ref in ["docker://127.0.0.1:5000/", "docker://reg.example/app@sha256:1234",
                "foo://reg.example/app:1", "docker://reg.example/App:1"]:
        for args in (["verify", ref], ["optimize", "--no-optimize", ref, "oci:/nonexistent:x"]):
            res = estargz_opt(*args, check=False)
            assert res.returncode == 2, (args, res)
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and "invalid image reference" in lines[0], (args, lines)


def test_workload_of_a_registry_image_runs_without_containerd(
    env: Env, busybox_layer: Path, tmp_path: Path
) -> None:
    """analyze and optimize of docker:// run the workload with the runc runner:
    the layers stream from the registry; no containerd is asked."""
    app = F.simple_layer({"app/": None, "app/a.txt": b"from-the-registry\n"})
    layout = tmp_path / "src"
    F.write_busybox_image(layout, "1", busybox_layer, extra_layers=[app],
                          cmd=["/bin/cat", "/app/a.txt"])
    ref = f"docker://{env.host}/workload/app:1"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:1", ref)
    env_ = cli_env(tmp_path / "tmpdir", CONTAINERD_ADDRESS="/nonexistent/containerd.sock")
    (tmp_path / "tmpdir").mkdir()
    record = tmp_path / "r.jsonl"
    res = run_cli("analyze", "--tls-verify=false", "--period", "10", "--record-out", record,
                  ref, env=env_)
    assert res.returncode == 0, res.stderr
    assert "from-the-registry" in res.stderr
    pairs = {(r["path"], r["layerIndex"]) for r in map(json.loads, record.read_text().split())}
    assert pairs == {("bin/busybox", 0), ("app/a.txt", 1)}, pairs
    res = run_cli("optimize", "--oci", "--src-tls-verify=false", "--period", "10", ref,
                  f"oci:{tmp_path / 'out'}:esgz", env=env_)
    assert res.returncode == 0, res.stderr
    assert "from-the-registry" in res.stderr and res.stdout.strip().startswith("sha256:")
    assert list((tmp_path / "tmpdir").iterdir()) == []


def test_corrupt_blob_is_fetched_twice_then_named(env: Env) -> None:
    src = env.push_source("corrupt", seed=8)
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", src).stdout)
    victim = manifest["layers"][1]["digest"]
    data = env.registry.blob_data(victim)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    env.proxy.clear()
    res = estargz_opt("optimize", "--oci", "--no-optimize", "--no-cache", *PLAIN, src,
                      f"docker://{env.host}/corrupt:esgz", check=False)
    assert res.returncode == 1, res
    errors = [x for x in res.stderr.splitlines() if x.startswith("estargz-opt: error:")]
    assert len(errors) == 1 and victim in errors[0] and "fetched twice" in errors[0], res.stderr
    gets = [r for r in env.proxy.requests()
            if r["method"] == "GET" and r["path"].endswith(f"/blobs/{victim}")]
    assert len(gets) == 2, gets
    assert manifest_status_at(env.registry.host, "corrupt", "esgz") == 404


def test_429_with_retry_after_waits_and_succeeds(env: Env, tmp_path: Path) -> None:
    src = env.push_source("throttled", seed=9)
    proxy = lazypull.Proxy.start(env.registry.host, tmp_path / "429.jsonl",
                                 extra=["--too-many", "2", "--retry-after", "2"])
    try:
        started = time.monotonic()
        dst = f"docker://{proxy.host}/throttled:esgz"
        estargz_opt("optimize", "--oci", "--no-optimize", *PLAIN,
                    src.replace(env.host, proxy.host), dst)
        took = time.monotonic() - started
        refused = [r for r in proxy.requests() if r["status"] == 429]
        assert len(refused) == 2, proxy.requests()
        assert took >= 2, took  # Retry-After was honoured
    finally:
        proxy.stop()
    check_pushed(env, dst.replace(proxy.host, env.host), tmp_path)


def test_413_falls_back_to_chunked_uploads(env: Env, tmp_path: Path) -> None:
    """A proxy that refuses bodies over 1 MiB: the 5 MiB layer's stream is refused, and
    the layer goes up from its spool in chunks with Content-Range (not whole again), and
    what lands is sound."""
    src = env.push_source("chunked", seed=12)
    proxy = lazypull.Proxy.start(env.registry.host, tmp_path / "413.jsonl",
                                 extra=["--max-body", str(1 << 20)])
    try:
        dst = f"docker://{proxy.host}/chunked:esgz"
        estargz_opt("optimize", "--oci", "--no-optimize", "--no-cache", *PLAIN,
                    src.replace(env.host, proxy.host), dst)
        patches = [r for r in proxy.requests() if r["method"] == "PATCH"]
        whole = [r for r in patches if r["status"] == 413 and not r["content_range"]]
        assert len(whole) == 1, patches  # the stream; then chunks only
        assert len([r for r in patches if r["status"] == 202]) > 5, patches
    finally:
        proxy.stop()
    check_pushed(env, dst.replace(proxy.host, env.host), tmp_path)


def test_a_new_blob_streams_while_it_is_written(env: Env, tmp_path: Path) -> None:
    """The PATCH of a blob written through a sink starts while the blob is still being
    written (here: a second before its second half is), not after its commit; what
    lands is the blob. A sink discarded uncommitted cancels its upload session."""
    proxy = lazypull.Proxy.start(env.registry.host, tmp_path / "stream.jsonl")
    data = random.Random(14).randbytes(6 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    ref = RegistryRef.parse(f"docker://{proxy.host}/streamed:1")
    try:
        with RegistryStore(ref, RegistryOptions(tls_verify=False,
                                                env={"HOME": str(tmp_path)})) as store:
            with store.sink() as sink:
                sink.file.write(data[: 3 << 20])
                time.sleep(1)
                second_half = time.time()
                sink.file.write(data[3 << 20:])
                sink.commit(digest, len(data))
            with pytest.raises(RuntimeError), store.sink() as dropped:
                dropped.file.write(data[: 2 << 20])
                time.sleep(0.5)
                raise RuntimeError("the conversion failed")
            store.tag({})  # waits for every push
        log = proxy.requests()
    finally:
        proxy.stop()
    # The proxy logs a request once its body has arrived: the discarded stream's PATCH,
    # broken off, is not logged.
    patches = [r for r in log if r["method"] == "PATCH"]
    assert len(patches) == 1, log  # the stream was not sent again
    assert patches[0]["t0"] < second_half - 0.5 and patches[0]["status"] == 202, patches
    assert patches[0]["req_bytes"] == len(data), patches
    posts = [r for r in log if r["method"] == "POST"]
    assert len(posts) == 2, log
    puts = [r for r in log if r["method"] == "PUT" and "digest=" in r["path"]]
    assert [urllib.parse.unquote(r["path"]).rsplit("digest=", 1)[1] for r in puts] == [digest]
    assert puts[0]["t0"] >= second_half and puts[0]["status"] == 201, puts
    deletes = [r for r in log if r["method"] == "DELETE"]
    assert [r["status"] for r in deletes] == [204], log
    assert deletes[0]["t0"] > posts[1]["t0"], log
    req = urllib.request.Request(f"http://{env.registry.host}/v2/streamed/blobs/{digest}")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.read() == data


def test_a_broken_stream_is_sent_again_from_the_spool(env: Env, tmp_path: Path) -> None:
    """A proxy that resets the first streamed PATCH: the blob goes up again from its
    spool (the retried whole upload), and the run succeeds."""
    src = env.push_source("cut", seed=15)
    proxy = lazypull.Proxy.start(env.registry.host, tmp_path / "cut.jsonl",
                                 extra=["--cut-streams", "1"])
    try:
        dst = f"docker://{proxy.host}/cut:esgz"
        estargz_opt("optimize", "--oci", "--no-optimize", "--no-cache", *PLAIN,
                    src.replace(env.host, proxy.host), dst)
        log = proxy.requests()
    finally:
        proxy.stop()
    patches = [r for r in log if r["method"] == "PATCH"]
    cut = [r for r in patches if r["status"] == 0]
    assert len(cut) == 1 and cut[0]["req_bytes"] > 0, patches
    # Three layers streamed (one of them cut), the cut one sent again, and the config:
    # four PATCHes answered, one commit per blob.
    answered = [r for r in patches if r["status"] == 202]
    assert len(answered) == 4 and any(r["t0"] > cut[0]["t1"] for r in answered), patches
    puts = [urllib.parse.unquote(r["path"]).rsplit("digest=", 1)[1] for r in log
            if r["method"] == "PUT" and "digest=" in r["path"] and r["status"] == 201]
    assert len(set(puts)) == len(puts) == 4, log
    check_pushed(env, dst.replace(proxy.host, env.host), tmp_path)


def test_credentials_never_shown(env: Env) -> None:
    secret = "s3cret-Pa55"
    for args in (["--debug", "verify", "--tls-verify=false", "--creds", f"someone:{secret}",
                  f"docker://{env.host}/never-pushed:1"],
                 ["--debug", "optimize", "--no-optimize", "--json", "--src-tls-verify=false",
                  "--dest-creds", f"someone:{secret}", "--src-creds", f"other:{secret}",
                  f"docker://{env.host}/never-pushed:1", f"docker://{env.host}/x:1"]):
        res = estargz_opt(*args, check=False)
        assert res.returncode == 1, res
        assert secret not in res.stdout + res.stderr, res


def test_a_killed_runs_spool_is_removed_by_the_next(env: Env, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL leaves the run's spool directory (downloaded and converted blobs) in
    $TMPDIR, named after its owner; the next run removes it."""
    spool_dir = tmp_path / "tmpdir"
    spool_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(spool_dir))
    src = env.push_source("spool", seed=13)
    proxy = lazypull.Proxy.start(env.registry.host, tmp_path / "slow.jsonl", rtt_ms=300)
    try:
        args = ["optimize", "--oci", "--no-optimize", "--no-cache", *PLAIN,
                src.replace(env.host, proxy.host), f"docker://{proxy.host}/spool:esgz"]
        run = subprocess.Popen([*cli_argv(), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def spools() -> list[str]:
            return [p.name for p in spool_dir.iterdir()
                    if p.name.startswith(".estargz-opt-registry@")]

        deadline = time.monotonic() + 60
        while not spools():
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        run.kill()
        run.wait()
        assert len(spools()) == 1
        estargz_opt(*args)
        assert spools() == []
    finally:
        proxy.stop()


def _restart(reg: lazypull.Registry) -> None:
    """Start the registry again on its port, over the same storage."""
    log = reg.dir / "registry.log"
    with open(log, "ab") as logf:
        reg.proc = subprocess.Popen(
            [str(lazypull.REGISTRY_BIN), "serve", str(reg.dir / "config.yml")],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            preexec_fn=lazypull._die_with_parent)
    lazypull._wait_until("docker-registry", reg._answers, 30, reg.proc, log)


def test_registry_killed_mid_push_then_rerun_sends_only_the_rest(tmp_path: Path) -> None:
    registry = lazypull.Registry.start(tmp_path)
    # 150 ms per request: the push takes long enough to be killed in the middle.
    proxy = lazypull.Proxy.start(registry.host, tmp_path / "req.jsonl", rtt_ms=150)
    try:
        layout = tmp_path / "src"
        F.write_layout(layout, "1", image_layers(10) + image_layers(11))
        dst = f"docker://{proxy.host}/killed:esgz"
        cmd = [*cli_argv(), "optimize", "--oci", "--no-optimize",
               "--dest-tls-verify=false", f"oci:{layout}:1", dst]
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL)

        def committed() -> set[str]:
            return {urllib.parse.unquote(r["path"]).rsplit("digest=", 1)[1]
                    for r in proxy.requests()
                    if r["method"] == "PUT" and "digest=" in r["path"] and r["status"] == 201}

        deadline = time.monotonic() + 120
        while not committed():
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.02)
        registry.proc.kill()
        registry.proc.wait()
        out, err = run.communicate(timeout=120)
        assert run.returncode == 1, (out, err)
        errors = [x for x in err.splitlines() if x.startswith("estargz-opt: error:")]
        assert len(errors) == 1 and f"registry {proxy.host}" in errors[0], err
        first = committed()
        assert first

        _restart(registry)
        assert manifest_status_at(registry.host, "killed", "esgz") == 404  # no tag
        proxy.clear()
        estargz_opt(*cmd[3:])
        again = committed()
        assert again and not again & first, (first, again)
        assert manifest_status_at(registry.host, "killed", "esgz") == 200
        skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/killed:esgz",
               f"oci:{tmp_path / 'check'}:x")
    finally:
        proxy.stop()
        registry.stop()
        shutil.rmtree(tmp_path / "check", ignore_errors=True)


def manifest_status_at(host: str, repo: str, tag: str) -> int:
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}", method="HEAD",
                                 headers={"Accept": F.OCI_MANIFEST})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
