"""The daemonless layer unpacker (workload/unpack.py) against containerd's own applier.

The same layers go through containerd's diff service into overlayfs snapshots and
through `unpack_layers` into a directory; the two trees must be equal in every detail a
workload can see (type, mode, owner, mtime, content, link target, device number,
xattrs). Then hostile layers: nothing may be written, followed or read outside the root.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import imagefactory as f, tarfactory as tf
from support.trees import tree_print

from estargz_opt.descriptor import OCI_LAYER_GZIP, Descriptor
from estargz_opt.errors import BadInputError
from estargz_opt.stores.containerd.client import Client
from estargz_opt.workload.containerd.unpack import chain_ids, unpack
from estargz_opt.workload.unpack import (
    Layer,
    UnpackOptions,
    unpack_layers,
    unpack_overlay_layer,
)

pytestmark = pytest.mark.root

TESTS = Path(__file__).parent


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layers(tars: list[bytes]) -> list[Layer]:
    return [Layer([f.gzip_layer(t)], _sha(t), f"layer-{i}") for i, t in enumerate(tars)]


# Three layers: every kind of entry, a replaced file, a whiteout, an opaque directory, a
# hardlink, a directory replaced by a file, xattrs, set-id bits and odd owners.
L0 = tf.build_tar([
    tf.dir_("bin/"),
    tf.reg("bin/tool", b"#!/bin/sh\necho v1\n", mode=0o4755, uid=0, gid=0),
    tf.dir_("etc/"),
    tf.reg("etc/old.conf", b"old\n", uid=1000, gid=1000),
    tf.reg("etc/gone.conf", b"to be deleted\n"),
    tf.dir_("opq/"),
    tf.reg("opq/lower.txt", b"lower\n"),
    tf.dir_("opq/sub/"),
    tf.reg("opq/sub/deep.txt", b"deep\n"),
    tf.dir_("becomes-file/"),
    tf.reg("becomes-file/x", b"x\n"),
    tf.dir_("lib/"),
    tf.reg("lib/libc.so", secrets.token_bytes(70_000), mode=0o755),
    tf.symlink("lib64", "lib"),
    tf.reg("x.txt", b"xattr\n", xattrs={"user.estargz": "opt"}),
    tf.Entry("dev-null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
    tf.Entry("pipe", tarfile.FIFOTYPE, mode=0o640),
    tf.dir_("sticky/", mode=0o1777, uid=7, gid=8),
])
L1 = tf.build_tar([
    tf.dir_("bin/"),
    tf.reg("bin/tool", b"#!/bin/sh\necho v2\n", mode=0o755),  # replaced
    tf.hardlink("bin/tool-link", "bin/tool"),
    tf.dir_("etc/"),
    tf.reg("etc/.wh.gone.conf"),
    tf.dir_("opq/", mode=0o750),
    tf.reg("opq/.wh..wh..opq"),
    tf.reg("opq/upper.txt", b"upper\n"),
    tf.reg("becomes-file", b"now a file\n"),
    tf.reg("lib64/via-link.so", b"under the lib64 symlink\n"),  # a lower symlinked parent
    tf.symlink("here", "etc"),
    tf.reg("here/via-here.conf", b"through this layer's symlink\n"),
])
L2 = tf.build_tar([
    tf.dir_("etc/"),
    tf.reg("etc/old.conf", b"new\n", mode=0o600, uid=33, gid=44),
    tf.reg("etc/new.conf", b"fresh\n"),
    tf.reg(".wh.pipe"),
])


def _mounted_tree(mounts: list[dict]) -> dict[str, list[object]]:
    """tree_print of `mounts` mounted in a private mount namespace (gone with it)."""
    script = (
        "import json, sys, tempfile\n"
        "from estargz_opt.mount import Mount\n"
        "from estargz_opt.workload.mounts import make_rslave, mount_all\n"
        "from support.trees import tree_print\n"
        "make_rslave('/')\n"
        "d = tempfile.mkdtemp()\n"
        "mount_all([Mount(**m) for m in json.loads(sys.argv[1])], d)\n"
        "print(json.dumps(tree_print(d)))\n"
    )
    out = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", script, json.dumps(mounts)],
        check=True, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
    ).stdout
    return json.loads(out)


def _containerd_tree(containerd, client: Client, tars: list[bytes]) -> dict[str, list[object]]:
    """containerd's applier on `tars`; the merged tree, printed in a private mount namespace."""
    diff_ids = [_sha(t) for t in tars]
    with client.leases.hold(sync=True) as lease:
        layers = []
        for t in tars:
            blob = f.gzip_layer(t)
            client.content.write(
                f"estargz-opt-test-lunpack-{secrets.token_hex(6)}",
                blob,
                expected_digest=_sha(blob),
                expected_size=len(blob),
                lease=lease,
            )
            layers.append(Descriptor(media_type=OCI_LAYER_GZIP, digest=_sha(blob), size=len(blob)))
        top = unpack(client, layers, diff_ids, lease=lease)
        key = f"estargz-opt-test-view-{secrets.token_hex(6)}"
        mounts = client.snapshots().prepare(key, top, lease=lease)
        try:
            return _mounted_tree([{"type": m.type, "source": m.source, "target": m.target,
                                   "options": list(m.options)} for m in mounts])
        finally:
            client.snapshots().remove(key, missing_ok=True)
            for chain in reversed(chain_ids(diff_ids)):
                client.snapshots().remove(chain, missing_ok=True)


def test_unpack_matches_containerds_applier(containerd, client: Client, tmp_path: Path) -> None:
    tars = [L0, L1, L2]
    root = tmp_path / "root"
    root.mkdir()
    stats = unpack_layers(str(root), _layers(tars))
    mine = json.loads(json.dumps(tree_print(str(root))))
    theirs = _containerd_tree(containerd, client, tars)
    assert mine == theirs
    # and the facts the comparison rests on, spelled out
    assert (root / "bin/tool").read_text() == "#!/bin/sh\necho v2\n"
    assert os.stat(root / "bin/tool").st_ino == os.stat(root / "bin/tool-link").st_ino
    assert not (root / "etc/gone.conf").exists() and not (root / "pipe").exists()
    assert sorted(os.listdir(root / "opq")) == ["upper.txt"]
    assert (root / "becomes-file").read_text() == "now a file\n"
    # a lower layer's symlinked parent is not followed: a new directory hides it
    assert (root / "lib64/via-link.so").is_file() and not (root / "lib64").is_symlink()
    assert not (root / "lib/via-link.so").exists()
    assert stat.S_IMODE(os.stat(root / "sticky").st_mode) == 0o1777
    assert os.getxattr(root / "x.txt", "user.estargz") == b"opt"
    assert os.major(os.stat(root / "dev-null").st_rdev) == 1
    assert os.stat(root / "etc/old.conf")[4:6] == (33, 44)
    assert (root / "etc/via-here.conf").is_file()  # this layer's symlink: followed inside
    assert "opq/.wh..wh..opq" in stats.names[1] and stats.skipped_devices == 0


def test_overlay_layers_stack_to_what_containerd_applies(
    containerd, client: Client, tmp_path: Path
) -> None:
    """One directory per layer (the runc runner's cache), stacked as overlayfs lowerdirs
    under an empty upper: the merged tree is containerd's."""
    tars = [L0, L1, L2]
    dirs = []
    for i, layer in enumerate(_layers(tars)):
        d = tmp_path / f"layer{i}"
        d.mkdir()
        unpack_overlay_layer(str(d), layer)
        dirs.append(str(d))
    assert stat.S_ISCHR(os.lstat(tmp_path / "layer1/etc/gone.conf").st_mode)  # a whiteout
    assert os.getxattr(tmp_path / "layer1/opq", "trusted.overlay.opaque") == b"y"
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    options = [f"lowerdir={':'.join(reversed(dirs))}", f"upperdir={tmp_path / 'upper'}",
               f"workdir={tmp_path / 'work'}"]
    mine = _mounted_tree([{"type": "overlay", "source": "overlay", "options": options}])
    assert mine == _containerd_tree(containerd, client, tars)


def test_unprivileged_mode_skips_devices(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    stats = unpack_layers(str(root), _layers([L0]), UnpackOptions(privileged=False))
    assert stats.skipped_devices == 1 and not os.path.lexists(root / "dev-null")
    assert (root / "pipe").exists()


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory beside the root, with a file that must stay untouched."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "keep").write_text("host\n")
    yield d
    assert sorted(os.listdir(d)) == ["keep"], "the unpacker wrote outside its root"
    assert (d / "keep").read_text() == "host\n"


@pytest.mark.parametrize(
    "entries",
    [
        # ".." names are clamped at the root, as containerd does
        [tf.reg("../../outside/evil", b"x"), tf.reg("a/../../../outside/evil2", b"x")],
        # a symlinked parent directory pointing out, absolute and relative
        [tf.symlink("abs", "{outside}"), tf.reg("abs/evil", b"x")],
        [tf.symlink("rel", "../outside"), tf.reg("rel/evil", b"x")],
        [tf.symlink("a", "."), tf.symlink("a/b", "../../../outside"), tf.reg("a/b/evil", b"x")],
        # a symlink as the last component is replaced, never written through
        [tf.symlink("keep", "{outside}/keep"), tf.reg("keep", b"replaced")],
        # whiteouts through a symlinked parent, and ".wh..." (the parent itself)
        [tf.symlink("w", "{outside}"), tf.reg("w/.wh.keep"), tf.reg(".wh...")],
        [tf.symlink("o", "{outside}"), tf.reg("o/.wh..wh..opq")],
    ],
    ids=["dotdot", "abs-parent", "rel-parent", "chained", "last-symlink", "whiteout", "opaque"],
)
def test_nothing_is_written_outside_the_root(
    tmp_path: Path, outside: Path, entries: list[tf.Entry]
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for e in entries:
        e.linkname = e.linkname.replace("{outside}", str(outside))
    tar = tf.build_tar(entries)
    unpack_layers(str(root), _layers([tar]))
    # what was written went inside: ".." lands on the root, a symlink resolves in it
    for p in root.rglob("*"):
        assert p.resolve(strict=False).is_relative_to(root) or p.is_symlink()


def test_hardlinks_cannot_reach_outside(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for target in (f"{outside}/keep", "../outside/keep", "../../../etc/shadow"):
        tar = tf.build_tar([tf.hardlink("h", target)])
        with pytest.raises(BadInputError, match="not in the image"):
            unpack_layers(str(root), _layers([tar]))
    # through a symlinked parent: resolved inside the root, where there is no such file
    tar = tf.build_tar([tf.symlink("s", str(outside)), tf.hardlink("h", "s/keep")])
    with pytest.raises(BadInputError, match="not in the image"):
        unpack_layers(str(root), _layers([tar]))
    assert os.stat(outside / "keep").st_nlink == 1


def test_a_wrong_diff_id_or_a_bad_tar_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    layer = Layer([f.gzip_layer(L2)], _sha(b"something else"), "sha256:abc")
    with pytest.raises(BadInputError, match=r"unpacks to .* diff ID is"):
        unpack_layers(str(root), [layer])
    with pytest.raises(BadInputError):
        unpack_layers(str(root), [Layer([f.gzip_layer(L2)[:-30]], _sha(L2), "cut")])
    loop = tf.build_tar([tf.symlink("a", "b"), tf.symlink("b", "a"), tf.reg("a/x", b"")])
    with pytest.raises(BadInputError, match="too many levels"):
        unpack_layers(str(tmp_path / "root"), _layers([loop]))


def test_unpacked_layers_are_kept_shared_and_evicted_lru(tmp_path: Path) -> None:
    from estargz_opt.workload.runc.layers import UnpackedLayers

    streamed: list[str] = []

    def layer(tar: bytes, name: str) -> Layer:
        def chunks() -> Iterator[bytes]:
            streamed.append(name)
            yield f.gzip_layer(tar)
        return Layer(chunks(), _sha(tar), name)

    cache = UnpackedLayers(tmp_path / "cache")
    # a fill left by a run killed with SIGKILL (its owner pid does not exist)
    dead = cache.dir / f".unpack@{os.uname().nodename}@999999999@1@abc.tmp"
    dead.mkdir(parents=True)
    with cache.hold([layer(L0, "l0"), layer(L1, "l1")], UnpackOptions()) as dirs:
        assert not dead.exists(), "a dead run's fill was not reaped"
        assert (Path(dirs[0]) / "bin/tool").read_text().endswith("v1\n")
        assert stat.S_ISCHR(os.lstat(Path(dirs[1]) / "etc/gone.conf").st_mode)
    assert streamed == ["l0", "l1"]
    with cache.hold([layer(L0, "l0"), layer(L2, "l2")], UnpackOptions()) as dirs2:
        assert dirs2[0] == dirs[0]  # the same directory: not unpacked again
        assert streamed == ["l0", "l1", "l2"]
        # eviction to nothing removes every layer no run holds, and only those
        cache.max_size = 0
        cache.evict()
        assert not Path(dirs[1]).exists()
        assert Path(dirs2[0]).is_dir() and Path(dirs2[1]).is_dir()
    assert not Path(dirs2[0]).exists() and not Path(dirs2[1]).exists()  # evicted on release
    # a layer that fails its diff ID check leaves nothing
    bad = Layer([f.gzip_layer(L2)], _sha(b"other"), "bad")
    with pytest.raises(BadInputError), cache.hold([bad], UnpackOptions()):
        pass
    assert [p.name for p in cache.dir.iterdir() if p.is_dir()] == []
