"""podman 5.4 (Debian trixie, enable_partial_images) pulls our containers-flavour
zstd:chunked partially, runs it as it runs the gzip original, and fetches only the
changed chunks of a new release, measured at the wire; skopeo 1.18's own zstd:chunked
of the same images is the reference throughout.

One image pair (release 1.0 and 1.1), one registry behind a byte-counting proxy and one
trixie root serve every test; each pull sequence has podman storage of its own.
"""

from __future__ import annotations

import io
import json
import random
import re
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import trixie
from support.cli import cli_argv
from support.imagefactory import blob_path, write_busybox_image
from support.layers import LayerBuildError, build_busybox_layer
from support.lazypull import Proxy, Registry

from estargz_opt.format.zchunked_verify import open_containers_layer

pytestmark = [pytest.mark.root, pytest.mark.registry, pytest.mark.slow]

CLI = cli_argv()
#: What the image prints: above the "--" line, what any pull must reproduce (regular files
#: and hardlinks with owners, modes, times and contents; the symlink's target); below it,
#: the whole tree, device node and symlink and directory times included.
SHOW = (
    "cd /data; ls -ln --full-time a/zeros a/sparse a/empty a/x a/hl b/* | sort; "
    "md5sum a/zeros a/sparse a/empty a/x a/hl b/*; readlink a/sl; cat a/x; echo --; "
    "ls -lnR --full-time /data | sort"
)
MIB = 1 << 20


def _tar(files: list[tuple[str, bytes | None, dict[str, Any]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data, kw in files:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1700000000
            for k, v in kw.items():
                setattr(ti, k, v)
            if data is not None:
                ti.size = len(data)
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def releases() -> tuple[list[bytes], list[bytes]]:
    """Two layers over busybox for 1.0; 1.1 changes 64 bytes of the big file and adds one."""
    rnd = random.Random(25)
    base = _tar([
        ("data/", None, {"type": tarfile.DIRTYPE, "mode": 0o755}),
        ("data/a/", None, {"type": tarfile.DIRTYPE, "mode": 0o755}),
        ("data/a/zeros", bytes(300_000), {}),
        ("data/a/sparse", rnd.randbytes(5000) + bytes(200_000) + rnd.randbytes(5000), {}),
        ("data/a/empty", b"", {}),
        ("data/a/x", b"xattr-file\n", {"mode": 0o600,
                                        "pax_headers": {"SCHILY.xattr.user.color": "blue"}}),
        ("data/a/hl", None, {"type": tarfile.LNKTYPE, "linkname": "data/a/x"}),
        ("data/a/sl", None, {"type": tarfile.SYMTYPE, "linkname": "x"}),
        ("data/a/null", None, {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3,
                               "mode": 0o666}),
    ])
    big = bytearray(rnd.randbytes(8 * MIB))
    app = [("data/b/", None, {"type": tarfile.DIRTYPE, "mode": 0o755}),
           ("data/b/big", bytes(big), {})]
    big[4 * MIB : 4 * MIB + 64] = rnd.randbytes(64)
    app11 = [("data/b/", None, {"type": tarfile.DIRTYPE, "mode": 0o755}),
             ("data/b/big", bytes(big), {}),
             ("data/b/new", rnd.randbytes(20_000), {})]
    return [base, _tar(app)], [base, _tar(app11)]


@dataclass
class World:
    share: Path
    registry: Registry
    proxy: Proxy

    def podman(self, store: str, cmd: str) -> subprocess.CompletedProcess[str]:
        return trixie.run(f"{trixie.podman(store)} {cmd}", self.share)

    def pulled_bytes(self, since: int) -> int:
        return sum(r["bytes"] for r in self.proxy.requests()[since:] if "/blobs/" in r["path"])


def _cli(*args: str) -> None:
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    try:
        trixie.ensure_root()
    except trixie.TrixieUnavailable as exc:
        pytest.skip(str(exc))
    share = tmp_path_factory.mktemp("podman")
    try:
        busybox = build_busybox_layer(share / "busybox.tar")
    except LayerBuildError as exc:
        pytest.skip(str(exc))
    v10, v11 = releases()
    for tag, layers in (("1.0", v10), ("1.1", v11)):
        write_busybox_image(share / "src", tag, busybox, layers,
                            cmd=["/bin/busybox", "sh", "-c", SHOW])
    registry = Registry.start(share)
    proxy = Proxy.start(registry.host, share / "proxy.log")
    try:
        for tag in ("1.0", "1.1"):
            _cli("optimize", "--oci", "--no-optimize", "--zstdchunked", "--zstdchunked-flavor",
                 "containers", f"oci:{share}/src:{tag}", f"docker://{registry.host}/ours:{tag}",
                 "--dest-tls-verify=false")
            for repo, flags in (("sk", "--dest-compress-format zstd:chunked"), ("gz", "")):
                res = trixie.run(
                    f"skopeo copy -q {flags} oci:/share/src:{tag} "
                    f"docker://{registry.host}/{repo}:{tag} --dest-tls-verify=false", share)
                assert res.returncode == 0, res.stderr
        yield World(share, registry, proxy)
    finally:
        proxy.stop()
        registry.stop()


@pytest.fixture(scope="module")
def first_pulls(world: World) -> dict[str, tuple[str, str]]:
    """For ours, skopeo's and the gzip image: (podman pull's debug log, what the image prints)."""
    out = {}
    for repo in ("ours", "sk", "gz"):
        ref = f"{world.proxy.host}/{repo}:1.0"
        pull = world.podman(repo, f"--log-level=debug pull --tls-verify=false {ref}")
        assert pull.returncode == 0, pull.stderr[-2000:]
        run = world.podman(repo, f"run --rm --network=none {ref}")
        assert run.returncode == 0, run.stderr[-2000:]
        out[repo] = (pull.stderr, run.stdout)
    return out


FALLBACK = re.compile(r"falling back|fallback|failed to retrieve partial blob|convert", re.I)


def test_verify_reads_them_from_the_registry(world: World) -> None:
    done = subprocess.run([*CLI, "verify", "--tls-verify=false",
                           f"docker://{world.registry.host}/ours:1.1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("zstdchunked-containers") == 3


def test_podman_pulls_our_layers_partially(first_pulls: dict[str, tuple[str, str]]) -> None:
    log = first_pulls["ours"][0]
    differs = re.findall(r'Created zstd:chunked differ for blob \\?"(sha256:\w+)', log)
    partial = re.findall(r"Retrieved partial blob (sha256:\w+)", log)
    assert len(set(differs)) == 3 and set(partial) == set(differs), log[-3000:]
    assert not FALLBACK.findall(log), [line for line in log.splitlines() if FALLBACK.search(line)]


def test_podman_run_prints_what_the_originals_print(
    first_pulls: dict[str, tuple[str, str]],
) -> None:
    ours, skopeo, gzip = (first_pulls[r][1] for r in ("ours", "sk", "gz"))
    assert "xattr-file" in ours and " b/big" in ours
    # both partially pulled: the same tree, times set at the pull aside
    assert _pull_times(ours) == _pull_times(skopeo)
    # A partial pull by c/storage 1.57 differs from a full pull below the line, whoever
    # wrote the layer (skopeo's own zstd:chunked too): it skips device nodes
    # (storage_linux.go: "Ignore"), and symlinks and directories keep the times of the pull.
    files, _, tree = ours.partition("--\n")
    assert files == gzip.partition("--\n")[0]
    assert "null" not in tree and "null" in gzip.partition("--\n")[2]


def _pull_times(text: str) -> list[str]:
    """The lines with times other than the images' own (set by the pull) masked, sorted
    again: the listing was sorted with those times in it, so entries whose times the
    pull set may come in either order."""
    return sorted(re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\S* \+0000", _mask, text).splitlines())


def _mask(m: re.Match[str]) -> str:
    return m.group(0) if m.group(0).startswith("2023-11-14 22:13:20") else "<pull time>"


def test_xattrs_survive_the_partial_pull(world: World, first_pulls: object) -> None:
    """busybox cannot read xattrs: the pulled image is mounted and read with trixie's python."""
    got = {}
    for repo in ("ours", "gz"):
        res = world.podman(repo, f"image mount {world.proxy.host}/{repo}:1.0 > /tmp/m && "
                                 "python3 -c 'import os,sys; print(os.getxattr(sys.argv[1] + "
                                 "\"/data/a/x\", \"user.color\"))' $(cat /tmp/m)")
        assert res.returncode == 0, res.stderr[-2000:]
        got[repo] = res.stdout.strip()
    assert got == {"ours": "b'blue'", "gz": "b'blue'"}


def test_release_update_fetches_only_changed_chunks(world: World) -> None:
    """1.0 then 1.1 through the proxy: the bytes 1.1 costs, ours against skopeo's."""
    cost = {}
    for repo in ("ours", "sk"):
        store = f"dedup-{repo}"
        first = world.podman(store, f"pull -q --tls-verify=false {world.proxy.host}/{repo}:1.0")
        assert first.returncode == 0, first.stderr[-2000:]
        mark = len(world.proxy.requests())
        second = world.podman(store, f"--log-level=debug pull --tls-verify=false "
                                     f"{world.proxy.host}/{repo}:1.1")
        assert second.returncode == 0, second.stderr[-2000:]
        assert "Retrieved partial blob" in second.stderr
        cost[repo] = world.pulled_bytes(mark)
    layer = _changed_layer_size(world)
    print(f"1.1 after 1.0: ours {cost['ours']} bytes, skopeo {cost['sk']} bytes, "
          f"changed layer {layer} bytes")
    assert cost["ours"] <= 1.2 * cost["sk"]
    assert cost["ours"] <= 0.2 * layer


def _changed_layer_size(world: World) -> int:
    res = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{world.registry.host}/ours:1.1"],
                         capture_output=True, text=True, check=True)
    return int(json.loads(res.stdout)["layers"][-1]["size"])


def test_chunks_are_skopeos_chunks(world: World) -> None:
    """Our chunk boundaries are c/storage's, so a file dedups against layers skopeo wrote."""
    share = world.share
    _cli("optimize", "--oci", "--no-optimize", "--zstdchunked", "--zstdchunked-flavor",
         "containers", f"oci:{share}/src:1.0", f"oci:{share}/ours-oci:1.0")
    res = trixie.run("skopeo copy -q --dest-compress-format zstd:chunked "
                     "oci:/share/src:1.0 oci:/share/sk-oci:1.0", share)
    assert res.returncode == 0, res.stderr
    ours, theirs = (_chunk_digests(share / name, "data/b/big") for name in ("ours-oci", "sk-oci"))
    assert len(ours) > 50 and ours == theirs


def _chunk_digests(layout: Path, name: str) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob_path(layout, index["manifests"][-1]["digest"]).read_text())
    for layer in manifest["layers"]:
        with open(blob_path(layout, layer["digest"]), "rb") as f:
            entries = open_containers_layer(f).entries
        found = [e.get("chunkDigest", "") for e in entries if e["name"] == name]
        if found:
            return found
    raise AssertionError(f"{name} is in no layer of {layout}")
