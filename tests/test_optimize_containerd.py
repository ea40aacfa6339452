"""``estargz-opt optimize`` on images in containerd , checked with ctr and ctr-remote.

Everything runs against private containerds started by scripts/containerd-up.sh:

* the session-shared one (the ``containerd`` fixture) for conversions, labels,
  errors and export/import; nothing here kills it, prunes it or runs its GC;
* one of this module's own (``own``) for what would disturb other tests: a
  garbage collection and ``ctr content prune references``, SIGKILL of
  estargz-opt in the middle of a layer write, and SIGKILL of containerd itself
  in the middle of a run (then restarted with containerd-up.sh on the same
  directory).

What is checked:

* ``-a SOCK optimize --oci --no-optimize`` (and ``--record-in``, and
  ``--zstdchunked``) gives an image that ``ctr run --rm`` runs with the
  source's output; ctr-remote 0.14.3's ``images get-toc-digest
  [--zstdchunked]`` prints each layer's ``toc.digest`` annotation;
* per-layer TOCs (normalized as in test_toc_parity.py) equal ctr-remote's
  ``image optimize --oci --record-out`` for the same containerd image and record;
* ``ctr content ls`` labels: new layers carry the source blob's labels plus
  ``containerd.io/uncompressed=<DiffID>``; manifests and indexes carry
  ``containerd.io/gc.ref.content.*`` references to their children; a GC keeps
  the new image whole and runnable;
* no estargz-opt lease is left after a run that ends, well or badly;
* errors are one ``estargz-opt: error:`` line (the last on stderr), a non-zero
  exit and no new image in ``ctr images ls``;
* a run killed mid-write, or whose containerd died, can simply be rerun, and
  leaves no ingest behind (``ctr content active``);
* containerd -> ``oci:DIR:TAG`` (skopeo copies it) and ``oci:`` -> containerd
  (``ctr run`` runs it), without ctr.

"Pulled for one platform only" is made the way ``ctr images import`` makes it
when the archive lacks the other platform's blobs: containerd 1.6 imports
every blob an archive holds whatever ``--all-platforms`` says, so the
archive itself is cut down.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import imagefactory as f
from support.cli import cli_argv, cli_env, error_message, printed_digest, run_cli
from support.containerd import (
    Containerd,
    active,
    containerd_unavailable_reason,
    ctr_run,
    images,
    import_layout,
    leases,
    optimize,
)
from support.ociimage import image_target, read_manifest
from support.reference import (
    ParityReference,
    ctr_remote_run,
    recorded_per_layer,
    reference_tocs,
)
from support.tocs import describe_mismatch, normalize, prioritized_files

pytestmark = pytest.mark.interop

SRC_LABEL = "containerd.io/distribution.source.example"
UNCOMPRESSED = "containerd.io/uncompressed"
GC_REF = "containerd.io/gc.ref.content."
GC_EXPIRE = "containerd.io/gc.expire"
RUN_CMD = ["/bin/busybox", "sh", "-c", f"echo {f.BUSYBOX_HELLO}; cat /data/a.txt"]
RUN_OUTPUT = f"{f.BUSYBOX_HELLO}\nalpha\n"
MiB = 1 << 20
BIG = 40 * MiB  # random bytes in the big image's layer: ~0.5 s for containerd to receive


# --- running things -------------------------------------------------------------------------


def content_labels(c: Containerd) -> dict[str, dict[str, str]]:
    """digest -> labels, as ``ctr content ls`` shows them."""
    out: dict[str, dict[str, str]] = {}
    for line in c.ctr("content", "ls").stdout.splitlines()[1:]:
        cols = [x for x in line.split("\t") if x]
        if not cols:
            continue
        labels = cols[-1].strip()
        out[cols[0]] = {} if labels == "-" else dict(
            kv.split("=", 1) for kv in labels.split(","))
    return out


def blob(c: Containerd, digest: str) -> bytes:
    return c.ctr("content", "get", digest, input=b"").stdout


def doc(c: Containerd, digest: str) -> dict:
    return json.loads(blob(c, digest))


def label(c: Containerd, digest: str, **labels: str) -> None:
    c.ctr("content", "label", digest, *(f"{k}={v}" for k, v in labels.items()))


def walk(c: Containerd, top: str) -> list[tuple[dict, dict]]:
    """(manifest document, its config document) for each manifest under *top*."""
    d = doc(c, top)
    if "manifests" in d:
        return [pair for m in d["manifests"] for pair in walk(c, m["digest"])]
    return [(d, doc(c, d["config"]["digest"]))]


def gc_refs(labels: dict[str, str]) -> dict[str, str]:
    return {k.removeprefix(GC_REF): v for k, v in labels.items() if k.startswith(GC_REF)}


def check_toc_digests(ctr_remote: Path, c: Containerd, target: str, zstd: bool) -> None:
    """ctr-remote's get-toc-digest prints each layer's toc.digest annotation."""
    for i, layer in enumerate(read_manifest(c, image_target(c, target))["layers"]):
        want = layer.get("annotations", {}).get(f.TOC_DIGEST)
        assert want, f"layer {i} has no {f.TOC_DIGEST}: {layer}"
        args = ["images", "get-toc-digest", *(["--zstdchunked"] if zstd else []), layer["digest"]]
        got = ctr_remote_run(ctr_remote, c, *args).stdout.strip()
        assert got == want, f"layer {i}: get-toc-digest printed {got!r}, annotation {want}"


def no_leftovers(c: Containerd) -> None:
    assert leases(c) == [], "estargz-opt left a lease behind"
    assert active(c) == {}, "ingests left behind"


# --- images ---------------------------------------------------------------------------------

def data_layer() -> bytes:
    return f.simple_layer({"data/": None, "data/a.txt": b"alpha\n"})


@dataclass(frozen=True)
class Source:
    name: str  # in containerd
    layout: Path
    manifest: str
    output: str  # what ctr run prints


@pytest.fixture(scope="module")
def runnable(containerd, busybox_layer: Path, tmp_path_factory) -> Source:
    """busybox + data/a.txt; prints RUN_OUTPUT."""
    base = tmp_path_factory.mktemp("cdrun")
    manifest = f.write_busybox_image(base / "layout", "v1", busybox_layer,
                                     extra_layers=[data_layer()], cmd=RUN_CMD)
    name = "localhost/cdrun:1"
    import_layout(containerd, base / "layout", "v1", name, base / "image.tar")
    assert image_target(containerd, name) == manifest
    output = ctr_run(containerd, name)
    assert output == RUN_OUTPUT
    return Source(name, base / "layout", manifest, output)


def write_two_platforms(layout: Path, busybox_layer: Path, arm_text: bytes = b"arm64\n") -> str:
    """Index: the host (busybox + data, runnable) and linux/arm64 (one small layer holding
    *arm_text*; content is shared by the whole namespace, so vary it where that matters)."""
    arm = f.simple_layer({"data/": None, "data/arm.txt": arm_text})
    return f.write_index(layout, "v1", [(f.HOST_PLATFORM, [busybox_layer.read_bytes(),
                                                           data_layer()]),
                                        ("linux/arm64", [arm])],
                         config_extra=f.busybox_config(RUN_CMD))


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Iterator[Containerd]:
    """A private containerd of this module's own, free to be GC'd, pruned and killed."""
    reason = containerd_unavailable_reason()
    if reason:
        pytest.skip(reason)
    daemon = Containerd.start(tmp_path_factory.mktemp("owncd"))
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def big(own: Containerd, busybox_layer: Path, tmp_path_factory) -> str:
    """busybox + a layer of BIG random bytes (an uncompressed tar, quick to build), in *own*:
    its converted layer takes containerd a while to receive, time to kill someone."""
    layout = f.init_layout(tmp_path_factory.mktemp("cdbig") / "layout")
    raws = [busybox_layer.read_bytes(),
            f.simple_layer({"big/": None, "big/random.bin": os.urandom(BIG)})]
    layers = [f.descriptor(f.OCI_LAYER_GZIP, *f.put_blob(layout, f.gzip_layer(raws[0]))),
              f.descriptor(f.OCI_LAYER_TAR, *f.put_blob(layout, raws[1]))]
    plat = f.platform_dict(f.HOST_PLATFORM)
    config = {**plat, **f.busybox_config(),
              "rootfs": {"type": "layers", "diff_ids": [f.sha256_digest(r) for r in raws]}}
    cfg = f.descriptor(f.OCI_CONFIG, *f.put_json(layout, config, sort_keys=True))
    manifest = {"schemaVersion": 2, "mediaType": f.OCI_MANIFEST, "config": cfg,
                "layers": layers}
    f.tag_descriptor(layout, "v1", f.descriptor(f.OCI_MANIFEST, *f.put_json(layout, manifest),
                                                platform=plat))
    name = "localhost/cdbig:1"
    import_layout(own, layout, "v1", name, layout.parent / "image.tar")
    return name


# --- runs and TOCs --------------------------------------------------------------------------

def write_record(path: Path, manifest: str, entries: list[tuple[str, int]]) -> Path:
    path.write_text("".join(json.dumps({"path": p, "manifestDigest": manifest, "layerIndex": i},
                                       separators=(",", ":")) + "\n" for p, i in entries))
    return path


RUN_VARIANTS = {
    # name: (extra flags, record?, zstd?, prioritized files per layer)
    "no-optimize": (["--no-optimize"], False, False, [[], []]),
    "record-in": ([], True, False, [["bin/busybox"], ["data/a.txt"]]),
    "zstdchunked": (["--zstdchunked"], True, True, [["bin/busybox"], ["data/a.txt"]]),
}


@pytest.mark.parametrize("variant", list(RUN_VARIANTS))
def test_optimized_image_runs(variant: str, runnable: Source, containerd, ctr_remote: Path,
                              tmp_path: Path) -> None:
    flags, with_record, zstd, want_prioritized = RUN_VARIANTS[variant]
    if with_record:
        record = write_record(tmp_path / "record.jsonl", runnable.manifest,
                              [("bin/busybox", 0), ("data/a.txt", 1)])
        flags = [*flags, "--record-in", str(record)]
    dst = f"localhost/cdrun:1-{variant}"
    digest = printed_digest(optimize(containerd, "--oci", *flags, runnable.name, dst))
    assert image_target(containerd, dst) == digest
    no_leftovers(containerd)

    manifest = read_manifest(containerd, digest)
    want_type = f.OCI_LAYER_ZSTD if zstd else f.OCI_LAYER_GZIP
    assert [x["mediaType"] for x in manifest["layers"]] == [want_type] * 2, manifest
    check_toc_digests(ctr_remote, containerd, dst, zstd)
    tocs = reference_tocs(ctr_remote, containerd, dst, "zstdchunked" if zstd else "estargz")
    assert [prioritized_files(t) for t in tocs] == want_prioritized
    assert ctr_run(containerd, dst) == runnable.output


def test_existing_image_record_is_updated(runnable: Source, containerd,
                                          tmp_path: Path) -> None:
    dst = "localhost/cdrun:1-update"
    first = printed_digest(optimize(containerd, "--oci", "--no-optimize", runnable.name, dst))
    record = write_record(tmp_path / "record.jsonl", runnable.manifest, [("data/a.txt", 1)])
    second = printed_digest(optimize(containerd, "--oci", "--record-in", record,
                                     runnable.name, dst))
    assert first != second
    assert image_target(containerd, dst) == second
    no_leftovers(containerd)


def test_external_toc_makes_two_images(runnable: Source, containerd) -> None:
    dst = "localhost/cdrun:1-exttoc"
    res = optimize(containerd, "--oci", "--no-optimize", "--estargz-external-toc",
                   runnable.name, dst)
    digest = printed_digest(res)
    assert f"extra image: {dst}-esgztoc" in res.stdout.splitlines()
    assert image_target(containerd, dst) == digest
    toc_image = image_target(containerd, f"{dst}-esgztoc")
    no_leftovers(containerd)
    labels = content_labels(containerd)
    assert gc_ref_problems(containerd, labels, digest) == []
    assert gc_ref_problems(containerd, labels, toc_image) == []
    assert ctr_run(containerd, dst) == runnable.output



@pytest.mark.parametrize("fmt", ["estargz", "zstdchunked"])
def test_toc_matches_ctr_remote_on_the_same_containerd_image(
        fmt: str, parity_reference: ParityReference, containerd, ctr_remote: Path) -> None:
    parity = parity_reference.image
    reference = parity_reference.run(fmt)
    record, recorded, ref_tocs = reference.record, reference.recorded, reference.tocs

    dst = f"localhost/cdparity:1-ours-{fmt}"
    zstd = ["--zstdchunked"] if fmt == "zstdchunked" else []
    digest = printed_digest(optimize(containerd, "--oci", *zstd, "--record-in", record,
                                     parity.ref, dst))
    assert image_target(containerd, dst) == digest
    no_leftovers(containerd)
    check_toc_digests(ctr_remote, containerd, dst, bool(zstd))
    ours = reference_tocs(ctr_remote, containerd, dst, fmt)  # read back by ctr-remote

    expected = recorded_per_layer(recorded, parity)
    reports = []
    for i, (toc, ref_toc) in enumerate(zip(ours, ref_tocs, strict=True)):
        report = describe_mismatch(f"layer {i}, {fmt}, in containerd", normalize(toc),
                                   normalize(ref_toc))
        if report:
            reports.append(report)
        if prioritized_files(toc) != expected[i]:
            reports.append(f"layer {i}: prioritized {prioritized_files(toc)}, record says "
                           f"{expected[i]}")
    if reports:
        pytest.fail("\n\n".join(reports), pytrace=False)


# --- labels and garbage collection ---------------------------------------------------------

def gc_ref_problems(c: Containerd, labels: dict[str, dict[str, str]], top: str) -> list[str]:
    """An index must reference exactly its manifests, a manifest exactly its config and
    layers (containerd.io/gc.ref.content.m.<i>, .config, .l.<i>)."""
    d = doc(c, top)
    if "manifests" in d:
        want = {f"m.{i}": m["digest"] for i, m in enumerate(d["manifests"])}
        children = [p for m in d["manifests"] for p in gc_ref_problems(c, labels, m["digest"])]
    else:
        want = {"config": d["config"]["digest"],
                **{f"l.{i}": x["digest"] for i, x in enumerate(d["layers"])}}
        children = []
    got = gc_refs(labels.get(top, {}))
    return children + ([f"{top}: GC refs {got}, want {want}"] if got != want else [])


def check_labels(c: Containerd, src_top: str, dst_top: str) -> None:
    """New layers: the source layer's labels (GC refs aside) plus uncompressed=<DiffID>;
    manifests and the index: GC references to exactly their children."""
    labels = content_labels(c)
    problems = gc_ref_problems(c, labels, dst_top)
    src_layers = {x["digest"] for m, _ in walk(c, src_top) for x in m["layers"]}
    for m, cfg in walk(c, dst_top):
        for x, diff_id in zip(m["layers"], cfg["rootfs"]["diff_ids"], strict=True):
            got = labels.get(x["digest"], {})
            if x["digest"] in src_layers:
                problems.append(f"layer {x['digest']} was not converted")
            if got.get(UNCOMPRESSED) != diff_id:
                problems.append(f"layer {x['digest']}: {UNCOMPRESSED}={got.get(UNCOMPRESSED)}, "
                                f"config DiffID {diff_id}")
            if f.sha256_digest(gzip.decompress(blob(c, x["digest"]))) != diff_id:
                problems.append(f"layer {x['digest']}: its bytes do not give DiffID {diff_id}")
            if got.get(SRC_LABEL) != "repo":
                problems.append(f"layer {x['digest']}: source label missing: {got}")
            if gc_refs(got):
                problems.append(f"layer {x['digest']} has GC refs: {got}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def import_labelled_two_platforms(c: Containerd, busybox_layer: Path, base: Path,
                                  name: str) -> str:
    """The two-platform image in *c*, each source layer labelled as if pulled, and marked
    with its (old) DiffID as an unpacked image would be."""
    index = write_two_platforms(base / "layout", busybox_layer)
    import_layout(c, base / "layout", "v1", name, base / "image.tar")
    assert image_target(c, name) == index
    for m, cfg in walk(c, index):
        for x, diff_id in zip(m["layers"], cfg["rootfs"]["diff_ids"], strict=True):
            label(c, x["digest"], **{SRC_LABEL: "repo", UNCOMPRESSED: diff_id})
    return index


def test_labels_on_new_blobs(containerd, busybox_layer: Path, tmp_path: Path) -> None:
    src = "localhost/cdlabels:1"
    index = import_labelled_two_platforms(containerd, busybox_layer, tmp_path, src)
    dst = "localhost/cdlabels:1-esgz"
    digest = printed_digest(optimize(containerd, "--oci", "--no-optimize", "--all-platforms",
                                     src, dst))
    assert image_target(containerd, dst) == digest
    no_leftovers(containerd)
    check_labels(containerd, index, digest)


def test_gc_and_prune_keep_the_new_image(own: Containerd, busybox_layer: Path,
                                         tmp_path: Path) -> None:
    src, dst = "localhost/cdgc:1", "localhost/cdgc:1-esgz"
    index = import_labelled_two_platforms(own, busybox_layer, tmp_path, src)
    digest = printed_digest(optimize(own, "--oci", "--no-optimize", "--all-platforms", src, dst))
    no_leftovers(own)
    check_labels(own, index, digest)
    src_layers = {x["digest"] for m, _ in walk(own, index) for x in m["layers"]}
    dst_blobs = {digest} | {d for m, _ in walk(own, digest)
                            for d in [m["config"]["digest"], *(x["digest"] for x in m["layers"])]}
    dst_blobs |= {m["digest"] for m in doc(own, digest)["manifests"]}

    # Deleting the source with --sync runs a garbage collection and waits for it.
    own.ctr("images", "rm", "--sync", src)
    present = set(content_labels(own))
    assert not src_layers & present, "no GC ran: the source layers are still there"
    assert dst_blobs <= present, f"GC took blobs of the new image: {dst_blobs - present}"
    for d in dst_blobs:
        blob(own, d)  # readable
    assert ctr_run(own, dst) == RUN_OUTPUT  # unpacks it too

    # prune references drops every layer reference (ctr's images' too) and collects: what
    # stays is held by the index, manifest and config references and the snapshots.
    own.ctr("content", "prune", "references")
    present = set(content_labels(own))
    kept = dst_blobs - {x["digest"] for m, _ in walk(own, digest) for x in m["layers"]}
    assert kept <= present, f"prune took the index, a manifest or a config: {kept - present}"
    assert ctr_run(own, dst) == RUN_OUTPUT


# --- errors ---------------------------------------------------------------------------------

@dataclass
class Unchanged:
    """Snapshot of what a failed run must not change in containerd."""

    c: Containerd
    before: set[str]

    def check(self) -> None:
        assert images(self.c) == self.before, "a failed run changed the image list"
        no_leftovers(self.c)


@pytest.fixture
def unchanged(containerd) -> Iterator[Unchanged]:
    u = Unchanged(containerd, images(containerd))
    yield u
    u.check()


def test_missing_socket(tmp_path: Path, runnable: Source, unchanged: Unchanged) -> None:
    sock = tmp_path / "no" / "containerd.sock"
    msg = error_message(run_cli("-a", sock, "optimize", "--oci", "--no-optimize",
                                runnable.name, "localhost/x:1"))
    assert str(sock) in msg and "-a/--address" in msg, msg
    # The same through CONTAINERD_ADDRESS, as ctr.
    msg = error_message(run_cli("optimize", "--oci", "--no-optimize", runnable.name,
                                "localhost/x:1", env=cli_env(CONTAINERD_ADDRESS=str(sock))))
    assert str(sock) in msg and "-a/--address" in msg, msg


def test_refused_socket(tmp_path: Path, unchanged: Unchanged) -> None:
    sock = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))  # a socket file nobody listens on
    s.close()
    msg = error_message(run_cli("-a", sock, "optimize", "--oci", "--no-optimize", "localhost/a:1",
                            "localhost/b:1"))
    assert str(sock) in msg and "refused" in msg and "-a/--address" in msg, msg


def test_permission_denied(containerd, runnable: Source, unchanged: Unchanged) -> None:
    """As user nobody. The interpreter and its packages may live under /root, which nobody
    cannot read: the child loads what the run needs as root (a call to a missing socket
    loads grpc's lazy modules, difflib is click's), then drops to nobody and runs the CLI."""
    code = (
        "import os, sys, difflib\n"
        "import estargz_opt.cli, estargz_opt.pipeline, estargz_opt.stores.containerd.store\n"
        "from estargz_opt.stores.containerd.client import Client\n"
        "from estargz_opt.stores.containerd.errors import ContainerdError\n"
        "try:\n"
        "    Client('/nonexistent/containerd.sock').version()\n"
        "except ContainerdError:\n"
        "    pass\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "sys.argv = ['estargz-opt', *sys.argv[1:]]\n"
        "estargz_opt.cli.main()\n"
    )
    res = subprocess.run([sys.executable, "-c", code, "-a", containerd.address, "optimize",
                          "--oci", "--no-optimize", runnable.name, "localhost/cdrun:1-nobody"],
                         capture_output=True, text=True, env=cli_env(), timeout=120,
                         stdin=subprocess.DEVNULL)
    msg = error_message(res)
    assert "permission denied" in msg.lower() and containerd.address in msg, msg


def test_image_not_found(containerd, unchanged: Unchanged) -> None:
    msg = error_message(optimize(containerd, "--oci", "--no-optimize", "localhost/no-such:1",
                                 "localhost/no-such:1-esgz"))
    assert "localhost/no-such:1" in msg and "not found" in msg, msg


def test_namespace_that_does_not_exist(containerd, runnable: Source,
                                       unchanged: Unchanged) -> None:
    before = containerd.ctr("namespaces", "ls", "-q").stdout.split()
    assert "nope" not in before
    try:
        res = run_cli("-a", containerd.address, "-n", "nope", "optimize", "--oci", "--no-optimize",
                  runnable.name, "localhost/cdrun:1-nope")
        msg = error_message(res)
        after = containerd.ctr("namespaces", "ls", "-q").stdout.split()
        problems = []
        if not re.search(r"namespace 'nope' does not exist", msg):
            problems.append(f"the error does not say namespace 'nope' does not exist: {msg!r}")
        if after != before:
            problems.append(f"the run created a namespace: ctr namespaces ls {before} -> {after}")
        if "nope" in after and leases(containerd, "nope"):
            problems.append(f"lease left in namespace nope: {leases(containerd, 'nope')}")
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)
    finally:
        subprocess.run(["ctr", "-a", containerd.address, "namespaces", "rm", "nope"],
                       capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def host_only(containerd, busybox_layer: Path, tmp_path_factory) -> tuple[str, dict]:
    """The two-platform image imported for the host only (the archive has no arm64 blobs).
    Returns (name, arm64 manifest descriptor)."""
    base = tmp_path_factory.mktemp("cdhostonly")
    layout = base / "layout"
    write_two_platforms(layout, busybox_layer, b"arm64, never imported\n")
    [host, arm] = f.platform_manifests(layout, "v1")
    host_blobs = {host[2]["config"]["digest"], *(x["digest"] for x in host[2]["layers"])}
    for d in {arm[1]["digest"], arm[2]["config"]["digest"],
              *(x["digest"] for x in arm[2]["layers"])} - host_blobs:
        f.blob_path(layout, d).unlink()
    name = "localhost/cdhostonly:1"
    import_layout(containerd, layout, "v1", name, base / "image.tar", all_platforms=False)
    have = set(content_labels(containerd))
    assert arm[1]["digest"] not in have and f.resolve_tag(layout, "v1")["digest"] in have
    return name, arm[1]


@pytest.mark.parametrize("flag", [["--platform", "linux/arm64"], ["--all-platforms"]],
                         ids=["platform-arm64", "all-platforms"])
def test_content_of_another_platform_missing(flag: list[str], host_only, containerd,
                                             unchanged: Unchanged) -> None:
    name, arm = host_only
    msg = error_message(optimize(containerd, "--oci", "--no-optimize", *flag, name,
                                 f"{name}-esgz"))
    assert arm["digest"] in msg and "linux/arm64" in msg, msg


def test_host_platform_of_a_host_only_image_converts(host_only, containerd) -> None:
    name, _ = host_only
    dst = f"{name}-host"
    digest = printed_digest(optimize(containerd, "--oci", "--no-optimize", name, dst))
    assert image_target(containerd, dst) == digest
    no_leftovers(containerd)
    assert ctr_run(containerd, dst) == RUN_OUTPUT


# --- interruptions --------------------------------------------------------------------------

def start_optimize(c: Containerd, tmp: Path, *args: str) -> subprocess.Popen:
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    return subprocess.Popen([*cli_argv(), "-a", c.address, "optimize",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=cli_env(TMPDIR=str(tmpdir)))


def wait_for_big_ingest(c: Containerd, proc: subprocess.Popen, timeout: float = 60) -> str:
    """The ref of the big layer's ingest once it holds a few MB, well before its end.
    (The other layer, busybox, converts to ~1 MB.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"estargz-opt ended ({proc.returncode}) before the big layer was "
                        f"half-written\nstdout:\n{out}\nstderr:\n{err}", pytrace=False)
        held = {ref: n for ref, n in active(c).items()
                if ref.startswith("estargz-opt-") and 2e6 <= n <= 0.9 * BIG}
        if held:
            return next(iter(held))
        time.sleep(0.005)
    proc.kill()
    pytest.fail("the big layer's ingest never showed up in ctr content active", pytrace=False)


def finish(proc: subprocess.Popen, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"estargz-opt did not end within {timeout} s\nstderr:\n{err}",
                    pytrace=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_killed_mid_write_then_rerun(own: Containerd, big: str, tmp_path: Path) -> None:
    dst = "localhost/cdbig:1-killed"
    args = ["--oci", "--no-optimize", big, dst]
    before = {lease for lease, _ in leases(own)}
    proc = start_optimize(own, tmp_path, *args)
    ref = wait_for_big_ingest(own, proc)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert ref in active(own), "the kill did not land mid-write (no ingest left)"
    assert dst not in images(own)
    stale = [(lease, labels) for lease, labels in leases(own) if lease not in before]
    assert stale and all(GC_EXPIRE in labels for _, labels in stale), \
        f"the killed run's lease should remain, with an expiry: {stale}"

    res = run_cli("-a", own.address, "--debug", "optimize", *args,
              env=cli_env(TMPDIR=str(tmp_path / "tmpdir")))
    assert "failed precondition" not in res.stderr, res.stderr
    digest = printed_digest(res)
    # The rerun resumed the killed run's ingest (its ref names the dead owner).
    resumed = [ln for ln in res.stderr.splitlines() if f"ingest {ref} held" in ln]
    assert resumed and resumed[0].endswith("resuming"), res.stderr
    assert image_target(own, dst) == digest
    assert active(own) == {}, "stale ingests remain after the rerun"
    # The rerun deleted the killed run's lease (its owner process is gone) and left none.
    assert [x for x in leases(own) if x[0] not in before] == [], "a lease remains"
    assert "left by a run that was killed" in res.stderr, res.stderr


def test_containerd_dies_mid_run_then_rerun(own: Containerd, big: str, tmp_path: Path) -> None:
    # Another chunk size than the test above: other blobs, so there is something to write.
    dst = "localhost/cdbig:1-died"
    args = ["--oci", "--no-optimize", "--estargz-chunk-size", str(2 * MiB), big, dst]
    proc = start_optimize(own, tmp_path, *args)
    wait_for_big_ingest(own, proc)
    pid = int((own.dir / "containerd.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    try:
        msg = error_message(finish(proc))
        assert "containerd" in msg and own.address in msg, msg
    finally:
        restart(own, pid)
    assert dst not in images(own), "half-created DST image after containerd died"

    res = optimize(own, *args, env=cli_env(TMPDIR=str(tmp_path / "tmpdir")))
    assert "failed precondition" not in res.stderr, res.stderr
    digest = printed_digest(res)
    assert image_target(own, dst) == digest
    assert active(own) == {}, "stale ingests remain after the rerun"
    assert ctr_run(own, dst) == f"{f.BUSYBOX_HELLO}\n"
    for lease, _ in leases(own):  # the dead run's, with its expiry
        own.ctr("leases", "rm", lease)


def restart(c: Containerd, pid: int) -> None:
    """Start containerd again on the same directory once the killed one is gone.

    containerd-up.sh refuses while the pid file names a live process, and a zombie
    counts as one; here the killed daemon is init's child, reaped within a few seconds.
    """
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():  # a zombie nobody reaps holds nothing but its pid
        (c.dir / "containerd.pid").unlink()
    Containerd.start(c.dir)


# --- export and import without ctr ------------------------------------------------------------

def test_containerd_to_oci_layout(runnable: Source, containerd, tmp_path: Path,
                                  unchanged: Unchanged) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    out = tmp_path / "out"
    digest = printed_digest(optimize(containerd, "--oci", "--no-optimize", runnable.name,
                                     f"oci:{out}:v2"))
    assert f.resolve_tag(out, "v2")["digest"] == digest
    for _mdesc, layer in f.all_layer_descriptors(out, "v2"):
        res = run_cli("layer", "verify", f.blob_path(out, layer["digest"]), "--toc-digest",
                  layer["annotations"][f.TOC_DIGEST])
        assert res.returncode == 0, res.stderr
    res = subprocess.run(["skopeo", "copy", f"oci:{out}:v2", f"oci:{tmp_path / 'copy'}:v2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    # unchanged: nothing was created in containerd, no lease is left


def test_oci_layout_to_containerd(runnable: Source, containerd) -> None:
    dst = "localhost/cdfromoci:1"
    assert dst not in images(containerd)
    digest = printed_digest(optimize(containerd, "--oci", "--no-optimize",
                                     f"oci:{runnable.layout}:v1", dst))
    assert image_target(containerd, dst) == digest
    no_leftovers(containerd)
    labels = content_labels(containerd)
    assert gc_ref_problems(containerd, labels, digest) == []
    [(m, cfg)] = walk(containerd, digest)
    for x, diff_id in zip(m["layers"], cfg["rootfs"]["diff_ids"], strict=True):
        assert labels[x["digest"]].get(UNCOMPRESSED) == diff_id
    assert ctr_run(containerd, dst) == runnable.output


def test_digest_is_stable_across_stores(runnable: Source, containerd, tmp_path: Path) -> None:
    """containerd -> containerd and oci: -> oci: give the same image."""
    a = printed_digest(optimize(containerd, "--oci", "--no-optimize", runnable.name,
                                "localhost/cdrun:1-again"))
    b = printed_digest(run_cli("optimize", "--oci", "--no-optimize", f"oci:{runnable.layout}:v1",
                           f"oci:{tmp_path / 'o'}:v1"))
    assert a == b
    assert hashlib.sha256(blob(containerd, a)).hexdigest() == a.removeprefix("sha256:")
