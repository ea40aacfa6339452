"""End to end with the real consumer: the stargz snapshotter lazily pulls our images.

Set-up (module-scoped, tests/support/lazypull.py): the snapshotter daemon of
tests/e2e/snapshotter/main.go (Debian's stargz-snapshotter 0.12 library), Debian's
docker-registry on loopback, and tests/support/throttle_proxy.py in front of it without any
throttling, only to log every request the snapshotter makes.

Per format: a two-layer busybox image (layer 0: busybox; layer 1: two files the
workload reads, ``data/prio-*.bin``, and three it never reads, ``data/lazy-*.bin``, all
random bytes) is imported into the session's private containerd, converted there with
``estargz-opt optimize --oci --record-in REC`` (the record lists busybox and the two
prio files), pushed with ``ctr push --plain-http``, then, on a fresh snapshotter and a
fresh containerd whose ``proxy_plugins.stargz`` is that snapshotter, pulled with
``ctr-remote images rpull --plain-http`` and run with ``ctr run --snapshotter stargz``.

The snapshotter runs with background fetch off, so every registry request after the
pull is either the prefetch (everything before ``.prefetch.landmark``) or an on-demand
read, and the request log tells them apart by their byte ranges, computed from each
layer's TOC.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import imagefactory as F, lazypull
from support.cli import estargz_opt

pytestmark = [pytest.mark.interop, pytest.mark.registry, pytest.mark.slow]

READY = "READY"
PRIO = ("data/prio-a.bin", "data/prio-b.bin")
LAZY = ("data/lazy-0.bin", "data/lazy-1.bin", "data/lazy-2.bin")
LANDMARK = ".prefetch.landmark"
# The granularity of the snapshotter's registry reads (0.12 fs/remote defaultChunkSize).
FETCH_CHUNK = 50000
FORMATS = {
    "estargz": [],
    "zstdchunked": ["--zstdchunked"],
    "external-toc": ["--estargz-external-toc"],
    # converted from an OCI layout and pushed by estargz-opt itself (docker://)
    "estargz-pushed": [],
}
#: The formats whose image estargz-opt pushes to the registry (not ctr push).
PUSHED_BY_US = {"estargz-pushed"}
WORKLOAD = ["/bin/sh", "-c",
            "/bin/busybox sha256sum /" + " /".join(PRIO) + f" && echo {READY}"]


def _skip(reason: str) -> None:
    print(f"SKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)


# --------------------------------------------------------------------------- images


def data_layer(seed: int) -> tuple[bytes, dict[str, bytes]]:
    """Layer 1: random (incompressible) files, so every byte range means something."""
    rnd = random.Random(seed)
    files: dict[str, bytes] = {
        "data/prio-a.bin": rnd.randbytes(3 << 20),  # spans more than one 50 kB fetch chunk
        "data/prio-b.bin": rnd.randbytes(300 << 10),
    }
    for name in LAZY:
        files[name] = rnd.randbytes(2 << 20)
    return F.simple_layer({"data/": None, **files}), files


@dataclass
class Region:
    name: str
    begin: int  # first byte in the blob
    end: int  # last byte (inclusive)

    def overlaps(self, rng: tuple[int, int]) -> bool:
        return rng[0] <= self.end and rng[1] >= self.begin


@dataclass
class Layer:
    digest: str
    size: int
    landmark: int | None  # offset of .prefetch.landmark: the prefetch covers [0, landmark)
    regions: dict[str, list[Region]] = field(default_factory=dict)  # file -> its chunks


@dataclass
class Pushed:
    repo: str  # e.g. lazy/estargz
    tag: str
    manifest_digest: str
    layers: list[Layer]
    files: dict[str, bytes]

    def ref(self, host: str) -> str:
        return f"{host}/{self.repo}:{self.tag}"


def toc_regions(toc: dict, blob_size: int) -> tuple[int | None, dict[str, list[Region]]]:
    """Byte ranges of every regular file's chunks in the blob, from the TOC: a chunk
    runs from its entry's offset to the next larger offset of any entry."""
    offsets = sorted({e["offset"] for e in toc["entries"] if e.get("offset")})
    landmark = None
    regions: dict[str, list[Region]] = {}
    owner = None
    for e in toc["entries"]:
        if e["type"] == "reg":
            owner = e["name"]
        if e["type"] not in ("reg", "chunk") or not e.get("offset"):
            continue
        if e["name"] == LANDMARK:
            landmark = e["offset"]
        nxt = next((o for o in offsets if o > e["offset"]), blob_size)
        regions.setdefault(owner, []).append(Region(owner, e["offset"], nxt - 1))
    return landmark, regions


class Env:
    """The module's registry, request-logging proxy, snapshotter binary and builder."""

    def __init__(self, base: Path, builder, ctr_remote: Path, busybox: Path):
        self.base = base
        self.builder = builder  # the session's private containerd (conftest `containerd`)
        self.ctr_remote = ctr_remote
        self.busybox = busybox
        self.binary = lazypull.build_snapshotter()
        self.builder_images: list[str] = []
        self.pushed: dict[str, Pushed] = {}
        self.registry = lazypull.Registry.start(base)
        try:
            self.proxy = lazypull.Proxy.start(self.registry.host, base / "requests.jsonl")
        except BaseException:
            self.registry.stop()
            raise

    def close(self) -> None:
        try:
            for name in self.builder_images:
                self.builder.ctr("images", "rm", name)
        finally:
            self.proxy.stop()
            self.registry.stop()
            shutil.rmtree(self.base, ignore_errors=True)

    def _blob(self, digest: str, in_registry: bool = False) -> Path:
        if in_registry:
            return self.registry.blob_data(digest)
        out = self.base / "blobs" / digest.replace(":", "-")
        out.parent.mkdir(exist_ok=True)
        with open(out, "wb") as f:
            subprocess.run(["ctr", "-a", self.builder.address, "-n", "default", "content", "get",
                            digest], stdout=f, check=True, stdin=subprocess.DEVNULL)
        return out

    def build_and_push(self, name: str, flags: list[str], seed: int,
                       workload_run: bool = False) -> Pushed:
        """Make the busybox+data image, optimize it in the builder containerd with a
        record (or, with *workload_run*, by running the workload), push DST (and
        DST-esgztoc for external TOCs) to the registry."""
        layout = self.base / f"layout-{name}"
        layer1, files = data_layer(seed)
        src_digest = F.write_busybox_image(layout, "src", self.busybox, [layer1], cmd=WORKLOAD)
        src, dst = f"lazy-e2e/{name}:src", f"lazy-e2e/{name}:opt"
        archive = F.archive_for_ctr(layout, "src", src, self.base / f"{name}.tar")
        self.builder.ctr("images", "import", "--no-unpack", str(archive))
        self.builder_images.append(src)
        record = self.base / f"{name}.record.jsonl"
        record.write_text("".join(
            json.dumps({"path": p, "manifestDigest": src_digest, "layerIndex": i}) + "\n"
            for p, i in [("bin/busybox", 0), *((p, 1) for p in PRIO)]))
        how = (["--period", "3", "--wait-on-line", READY, "--record-out", str(record)]
               if workload_run else ["--record-in", str(record)])
        repo, tag = f"lazy/{name}", "1"
        if name in PUSHED_BY_US:
            # No daemon on the way: the OCI layout converted straight into the registry.
            res = estargz_opt("optimize", "--oci", *how, *flags, "--dest-tls-verify=false",
                              f"oci:{layout}:src", f"docker://{self.registry.host}/{repo}:{tag}")
            digest = res.stdout.strip().splitlines()[-1]
            return self._pushed(repo, tag, digest, flags, files, in_registry=True)
        res = estargz_opt("-a", self.builder.address, "optimize", "--oci", *how, *flags,
                          src, dst)
        self.builder_images.append(dst)
        digest = res.stdout.strip().splitlines()[-1]
        self.builder.ctr("images", "push", "--plain-http", f"{self.registry.host}/{repo}:{tag}",
                         dst)
        if "--estargz-external-toc" in flags:
            self.builder_images.append(dst + "-esgztoc")
            self.builder.ctr("images", "push", "--plain-http",
                             f"{self.registry.host}/{repo}:{tag}-esgztoc", dst + "-esgztoc")
        return self._pushed(repo, tag, digest, flags, files)

    def _pushed(self, repo: str, tag: str, digest: str, flags: list[str],
                files: dict[str, bytes], in_registry: bool = False) -> Pushed:
        """What was pushed, with each layer's TOC regions (blobs read from the builder
        containerd, or from the registry's storage)."""
        manifest = json.loads(self._blob(digest, in_registry).read_bytes())
        assert manifest["mediaType"] == F.OCI_MANIFEST, manifest
        layers = []
        for desc in manifest["layers"]:
            blob = self._blob(desc["digest"], in_registry)
            landmark, regions = None, {}
            if "--estargz-external-toc" not in flags:
                toc = json.loads(estargz_opt("layer", "toc", str(blob)).stdout)
                landmark, regions = toc_regions(toc, desc["size"])
            layers.append(Layer(desc["digest"], desc["size"], landmark, regions))
        return Pushed(repo, tag, digest, layers, files)


@pytest.fixture(scope="module")
def lazy_env(tmp_path_factory, containerd, ctr_remote, busybox_layer):
    reason = lazypull.unavailable_reason()
    if reason:
        _skip(reason)
    env = Env(tmp_path_factory.mktemp("lazy"), containerd, ctr_remote, busybox_layer)
    try:
        yield env
    finally:
        env.close()


def pushed_image(env: Env, fmt: str) -> Pushed:
    if fmt not in env.pushed:
        env.pushed[fmt] = env.build_and_push(fmt, FORMATS[fmt], seed=7)
    return env.pushed[fmt]


def blob_requests(env: Env, pushed: Pushed, layer: Layer) -> list[dict]:
    path = f"/v2/{pushed.repo}/blobs/{layer.digest}"
    return [r for r in env.proxy.requests() if r["path"] == path and r["method"] == "GET"]


def ranges(req: dict) -> list[tuple[int, int]]:
    return lazypull.parse_range(req["range"])


def is_size_probe(req: dict) -> bool:
    return ranges(req) == [(0, 1)]


def prefetch_requests(env: Env, pushed: Pushed, layer: Layer) -> list[dict]:
    """Requests for *layer* from byte 0 through its landmark: the prefetch."""
    return [r for r in blob_requests(env, pushed, layer) if ranges(r)
            and ranges(r)[0][0] == 0 and ranges(r)[-1][1] >= layer.landmark - 1]


def wait_for_prefetch(env: Env, pushed: Pushed, timeout: float = 60) -> None:
    """Wait until every layer's prefetch request is done (logged). The snapshotter
    starts it while it mounts the layer, in the background, so it may still be
    under way when rpull returns; the container would wait for it (reads wait for
    the prefetch), but the checks below want a clear before and after."""
    deadline = time.monotonic() + timeout
    while not all(prefetch_requests(env, pushed, la) for la in pushed.layers):
        assert time.monotonic() < deadline, ("no prefetch request", env.proxy.requests())
        time.sleep(0.05)


def is_tail_read(req: dict, layer: Layer, before: float) -> bool:
    """The footer/TOC read of a layer during the pull: one range through the last byte."""
    rs = ranges(req)
    return len(rs) == 1 and rs[0][1] == layer.size - 1 and req["t0"] < before


def run_container(daemons: lazypull.LazyDaemons, ref: str, cid: str,
                  cmd: list[str] | None = None) -> tuple[float | None, int, str, str]:
    args = ["ctr", "-a", daemons.address, "-n", "default", "run", "--rm",
            "--snapshotter", "stargz", ref, cid, *(cmd or [])]
    return lazypull.run_until_line(args, READY, timeout=120)


def sha256_line(data: bytes, path: str) -> str:
    return f"{hashlib.sha256(data).hexdigest()}  /{path}"


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_lazy_pull_prefetches_prioritized_files(lazy_env: Env, fmt: str) -> None:
    env = lazy_env
    pushed = pushed_image(env, fmt)
    if fmt == "external-toc":
        # The image and its TOC image REF-esgztoc are both in the registry ...
        for tag in (pushed.tag, pushed.tag + "-esgztoc"):
            req = urllib.request.Request(
                f"http://{env.registry.host}/v2/{pushed.repo}/manifests/{tag}", method="HEAD",
                headers={"Accept": F.OCI_MANIFEST})
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200, (tag, r.status)
        # ... but Debian's snapshotter cannot use them.
        if not lazypull.stargz_lib_has_external_toc():
            _skip("the stargz snapshotter library Debian ships (0.12) has no external-TOC "
                  "support (estargz/externaltoc came with 0.13): it cannot lazily pull "
                  "--estargz-external-toc images")
    ref = pushed.ref(env.proxy.host)
    with lazypull.lazy_daemons(env.binary, env.base, ctr_remote=env.ctr_remote,
                               no_background_fetch=True) as daemons:
        env.proxy.clear()
        daemons.ctr_remote_cmd("images", "rpull", "--plain-http", ref)

        # Really lazy: one FUSE mount per layer under the snapshotter's root, and
        # the layers were not downloaded whole.
        mounts = daemons.fuse_mounts()
        assert len(mounts) == len(pushed.layers), (mounts, daemons.snapshotter_log_text())

        wait_for_prefetch(env, pushed)
        t_run = time.time()
        ready_s, rc, out, err = run_container(daemons, ref, f"lazy-{fmt}")
        assert rc == 0, (out, err, daemons.snapshotter_log_text()[-3000:])
        assert ready_s is not None, f"no {READY} line: {out!r} {err!r}"
        # The bytes the container read through FUSE are the image's bytes.
        for p in PRIO:
            assert sha256_line(pushed.files[p], p) in out.splitlines(), out

        data = pushed.layers[1]
        for layer in pushed.layers:
            reqs = [r for r in blob_requests(env, pushed, layer) if not is_size_probe(r)]
            assert layer.landmark is not None, "no .prefetch.landmark in the TOC"
            # The prefetch: a request from byte 0 through the landmark, made during
            # the pull, before the container started. (0.12 may prefetch a layer
            # twice: once when it is mounted, once as a neighbour of the next.)
            prefetch = [r for r in prefetch_requests(env, pushed, layer) if r["t1"] < t_run]
            assert prefetch, (layer.digest, layer.landmark, reqs)
            # No on-demand read of a prioritized file: once the container started,
            # no request touched their chunks.
            prio_regions = [rg for name in (("bin/busybox",) if layer is not data else PRIO)
                            for rg in layer.regions[name]]
            assert prio_regions and all(rg.end < layer.landmark for rg in prio_regions)
            on_demand = [r for r in reqs if r["t0"] >= t_run
                         and any(rg.overlaps(x) for rg in prio_regions for x in ranges(r))]
            assert not on_demand, f"prioritized files read on demand: {on_demand}"
        # Files the workload never read were not fetched at all. The snapshotter
        # fetches whole 50 kB chunks (fs/remote: defaultChunkSize), so the prefetch
        # may run a little past the landmark, and the footer/TOC read at the tail
        # of the blob may take the end of the last file: only bytes outside those
        # roundings count.
        tails = [ranges(r)[0][0] for r in blob_requests(env, pushed, data)
                 if is_tail_read(r, data, t_run)]
        lo = -(-data.landmark // FETCH_CHUNK) * FETCH_CHUNK
        hi = min(tails, default=data.size) - 1
        lazy_regions = [Region(rg.name, max(rg.begin, lo), min(rg.end, hi))
                        for name in LAZY for rg in data.regions[name]]
        fetched_lazy = [r for r in blob_requests(env, pushed, data)
                        if any(rg.overlaps(x) for rg in lazy_regions for x in ranges(r))]
        assert not fetched_lazy, fetched_lazy
        fetched = sum(r["bytes"] for r in blob_requests(env, pushed, data))
        assert fetched < data.size - 5 * (1 << 20), (fetched, data.size)

        # Control: a file behind the landmark is fetched on demand when read, and
        # the request log shows it (so the checks above can see on-demand reads).
        env.proxy.clear()
        _, rc, out, err = run_container(
            daemons, ref, f"lazy-{fmt}-2",
            ["/bin/busybox", "sha256sum", "/" + LAZY[1]])
        assert rc == 0, (out, err)
        assert sha256_line(pushed.files[LAZY[1]], LAZY[1]) in out.splitlines()
        lazy1 = data.regions[LAZY[1]]
        assert any(rg.overlaps(x) for r in blob_requests(env, pushed, data)
                   for x in ranges(r) for rg in lazy1), env.proxy.requests()


def test_corrupted_chunk_fails_the_lazy_read_loudly(lazy_env: Env) -> None:
    """A byte flipped inside a chunk of a pushed layer (in the registry's storage,
    after the push; the TOC is intact so the layer mounts) makes reading that file
    in the container fail with an I/O error, while untouched files still read."""
    env = lazy_env
    pushed = env.build_and_push("corrupt", FORMATS["estargz"], seed=99)
    data = pushed.layers[1]
    victim = data.regions[LAZY[1]][0]
    blob = env.registry.blob_data(data.digest)
    raw = bytearray(blob.read_bytes())
    assert len(raw) == data.size
    at = (victim.begin + victim.end) // 2
    raw[at] ^= 0xFF
    blob.write_bytes(bytes(raw))

    ref = pushed.ref(env.proxy.host)
    with lazypull.lazy_daemons(env.binary, env.base, ctr_remote=env.ctr_remote,
                               no_background_fetch=True) as daemons:
        daemons.ctr_remote_cmd("images", "rpull", "--plain-http", ref)
        assert len(daemons.fuse_mounts()) == len(pushed.layers)
        script = (f"/bin/busybox sha256sum /{PRIO[0]} && echo {READY}; "
                  f"/bin/busybox cat /{LAZY[1]} >/dev/null; echo cat-status=$?")
        ready_s, _rc, out, err = run_container(daemons, ref, "lazy-corrupt",
                                              ["/bin/sh", "-c", script])
        assert ready_s is not None, (out, err)
        assert sha256_line(pushed.files[PRIO[0]], PRIO[0]) in out.splitlines()
        status = [line for line in out.splitlines() if line.startswith("cat-status=")]
        assert status and status[0] != "cat-status=0", (out, err)
        assert "I/O error" in out + err or "Input/output error" in out + err, (out, err)
        # ... because the snapshotter checked the chunk against its TOC digest.
        failures = [line for line in daemons.snapshotter_log_text().splitlines()
                    if data.digest in line and "invalid chunk" in line]
        assert failures, daemons.snapshotter_log_text()[-3000:]


def test_workload_run_optimize_then_lazy_pull(lazy_env: Env) -> None:
    """estargz-opt runs the workload itself (``--period 3 --wait-on-line READY``, no
    --record-in), like ``ctr-remote image optimize``; the files it saw are prefetched."""
    env = lazy_env
    res = estargz_opt("-a", env.builder.address, "optimize", "--help")
    if "--period" not in res.stdout:
        _skip("estargz-opt optimize cannot run the workload (no --period option)")
    pushed = env.build_and_push("workload", FORMATS["estargz"], seed=11, workload_run=True)
    recorded = {json.loads(line)["path"]
                for line in (env.base / "workload.record.jsonl").read_text().splitlines()}
    assert set(PRIO) <= recorded, recorded
    assert not set(LAZY) & recorded, recorded
    data = pushed.layers[1]
    assert data.landmark is not None
    for p in PRIO:
        assert all(rg.end < data.landmark for rg in data.regions[p]), p
    for p in LAZY:
        assert all(rg.begin > data.landmark for rg in data.regions[p]), p

    ref = pushed.ref(env.proxy.host)
    with lazypull.lazy_daemons(env.binary, env.base, ctr_remote=env.ctr_remote,
                               no_background_fetch=True) as daemons:
        env.proxy.clear()
        daemons.ctr_remote_cmd("images", "rpull", "--plain-http", ref)
        assert len(daemons.fuse_mounts()) == len(pushed.layers)
        wait_for_prefetch(env, pushed)
        t_run = time.time()
        ready_s, rc, out, err = run_container(daemons, ref, "lazy-workload")
        assert rc == 0 and ready_s is not None, (out, err)
        prio_regions = [rg for p in PRIO for rg in data.regions[p]]
        on_demand = [r for r in blob_requests(env, pushed, data) if r["t0"] >= t_run
                     and any(rg.overlaps(x) for rg in prio_regions for x in ranges(r))]
        assert not on_demand, on_demand
