"""TOC parity with the reference converter, ctr-remote 0.14.3.

For the same input layer and the same prioritized paths, the TOC that
``estargz-opt layer convert`` writes must list the same entries, in the same
order, with the same metadata as the TOC that ctr-remote writes. Only two
things may differ:

* ``offset`` and ``innerOffset``: they depend on the compressed bytes, and
  our deflate/zstd encoders are not Go's;
* ``userName``/``groupName`` elision: ctr-remote cuts the layer into
  GOMAXPROCS parts, each with its own Writer, and a Writer omits a name equal
  to the last one *it* wrote for that uid/gid. So the comparison fills a
  missing name from the last name seen for that uid/gid earlier in the same
  TOC, as the stargz reader does (without the reader's 0.14.3 bug of looking
  group names up by gid in the user-name map).

How the reference is driven: an OCI image made of three layers (Debian's
busybox-static, a synthetic PAX layer full of corner cases, a GNU-format
layer) is imported into the private containerd, then converted with
``ctr-remote image convert --oci --estargz|--zstdchunked`` and, for the
prioritized cases, ``--estargz-record-in``/``--zstdchunked-record-in`` with a
record file (JSON lines ``{"path", "manifestDigest", "layerIndex"}``).
ctr-remote 0.14.3's ``convert`` reads only the paths from that record, applies
the *whole* list to *every* layer and skips paths a layer does not have
(``WithAllowPrioritizeNotFound``). So our converter gets the same whole list
for every layer; a layer's missing paths are skipped on both sides (every
layer has at least one listed path, so both use ``.prefetch.landmark``). The
TOC of each converted layer comes from
``ctr-remote images get-toc-digest --dump-toc``.

The umoci-style layer (``usr/bin/tool`` without ``usr/`` or ``usr/bin/``
entries) has its own image, busybox below it. Without prioritized files both
TOCs must match. With ``usr/bin/tool`` prioritized, ``ctr-remote image
optimize`` (whose analyzer runs the image and records the files it opens)
must abort with ``not found``, while we convert, verify, and put
``usr/bin/tool`` first, then ``.prefetch.landmark``.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from support.cli import invoke
from support.ociimage import OCIImage, image_target, import_image, read_manifest, write_oci_layout
from support.reference import ctr_remote_run
from support.tocs import LANDMARK, NO_LANDMARK, describe_mismatch, normalize

pytestmark = pytest.mark.interop

MIB = 1 << 20
MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
FORMATS = ("estargz", "zstdchunked")

SYN_LONG_NAME = "long/" + "n" * 70 + "/" + "m" * 60 + ".txt"
GNU_LONG_NAME = "gnu/" + "g" * 120 + ".bin"

# Prioritized paths, per layer of the parity image (bottom first). The record
# says which layer each comes from; ctr-remote's convert ignores that (see
# the module docstring).
PRIORITIZED = (
    ("bin/busybox", "bin/sh"),
    # A deep file whose parents all have entries (two of them without a
    # trailing slash, the root is "./"), a hardlink whose target lives deeper
    # (the target and its parents move first), the 9 MiB file and the
    # duplicated name (its later entry is the one that moves).
    ("deep/a/b/c/leaf.txt", "links/hard", "data/big.bin", "data/dup.txt"),
    (GNU_LONG_NAME,),
)
UMOCI_TOOL = "usr/bin/tool"


# --- layer builders ---------------------------------------------------------

class _ExactNameInfo(tarfile.TarInfo):
    """Writes the name as given: tarfile appends "/" to every directory name."""

    def get_info(self):
        info = super().get_info()
        info["name"] = self.name
        return info


class _Tar:
    """Collects tar entries; :meth:`bytes` writes them in order."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self.fmt = fmt
        self.entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(self, name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE,
            exact: bool = False, mode: int | None = None, uid: int = 0, gid: int = 0,
            uname: str = "root", gname: str = "root", mtime: float = MTIME,
            linkname: str = "", pax: dict[str, str] | None = None,
            dev: tuple[int, int] = (0, 0)) -> None:
        info = (_ExactNameInfo if exact else tarfile.TarInfo)(name)
        info.type = kind
        info.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
        info.uid, info.gid, info.uname, info.gname = uid, gid, uname, gname
        info.mtime = mtime
        info.linkname = linkname
        info.devmajor, info.devminor = dev
        if pax:
            info.pax_headers = dict(pax)
        if kind == tarfile.REGTYPE:
            info.size = len(data)
            self.entries.append((info, data))
        else:
            self.entries.append((info, None))

    def dir(self, name: str, **kw) -> None:
        self.add(name, kind=tarfile.DIRTYPE, **kw)

    def bytes(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=self.fmt) as tar:
            for info, data in self.entries:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def synthetic_tar(seed: int = 4242) -> bytes:
    """A PAX layer with the corner cases of the TOC format and of ordering."""
    rnd = random.Random(seed)
    t = _Tar()
    t.dir("./")  # root entry: moved first once anything is prioritized
    t.add(LANDMARK, b"\x0f")  # an old landmark: dropped
    t.dir("data/")
    t.add("data/dup.txt", data=b"first version, replaced later\n", mode=0o600)
    t.add("data/big.bin", rnd.randbytes(9 * MIB))  # chunks 4 + 4 + 1 MiB
    t.add("data/four.bin", rnd.randbytes(4 * MIB))  # exactly one chunk: chunkSize set
    t.add("data/empty-a")
    t.dir("deep/")
    t.dir("deep/a", exact=True)  # no trailing slash
    t.dir("deep/a/b/")
    t.dir("deep/a/b/c", exact=True, mode=0o750)
    t.add("deep/a/b/c/target.txt", b"hardlink target\n", uid=1000, gid=1000,
          uname="alice", gname="staff")
    t.add("deep/a/b/c/leaf.txt", b"deep leaf\n" * 50, uid=1000, gid=100,
          uname="alice", gname="users")
    t.dir("links/")
    t.add("links/sym", kind=tarfile.SYMTYPE, linkname="../deep/a/b/c/target.txt", mode=0o777)
    t.add("links/hard", kind=tarfile.LNKTYPE, linkname="deep/a/b/c/target.txt")
    t.dir("dev/")
    t.add("dev/null0", kind=tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
    t.add("dev/pipe", kind=tarfile.FIFOTYPE, mode=0o620)
    t.add("xattrs.txt", b"two xattrs\n", pax={
        "SCHILY.xattr.user.zeta": "last key",
        "SCHILY.xattr.user.alpha": "first key, caf\u00e9",
    })
    t.dir("long/")
    t.dir("long/" + "n" * 70 + "/")
    t.add(SYN_LONG_NAME, b"long name\n")
    assert len(SYN_LONG_NAME) > 100
    t.dir("donn\u00e9es/")
    t.add("donn\u00e9es/caf\u00e9-\u00fc-\u65e5\u672c.txt", "caf\u00e9 content\n".encode())
    t.dir("weird/")
    t.add("weird/<a&b>.txt", b"html-escaped in the JSON\n")
    t.add("weird/x>y", b"")
    # Owners whose names change between entries: exercises the elision.
    t.dir("owners/")
    t.add("owners/u1", b"1", uid=1000, gid=1000, uname="alice", gname="staff")
    t.add("owners/u2", b"2", uid=1000, gid=1000, uname="bob", gname="staff")
    t.add("owners/u3", b"3", uid=1000, gid=1000, uname="alice", gname="wheel")
    t.add("owners/u4", b"4", uid=1000, gid=1000, uname="", gname="")
    t.add("owners/u5", b"5", uid=2000, gid=2000, uname="carol", gname="carol")
    t.add("owners/u6", b"6", uid=1000, gid=2000, uname="alice", gname="carol")
    t.add("owners/u7", b"7", uid=0, gid=0, uname="root", gname="root")
    # Modification times: zero, sub-second (PAX), before and just after the epoch.
    t.dir("times/")
    t.add("times/epoch", b"e", mtime=0)
    t.add("times/half", b"h", mtime=MTIME + 0.5)
    t.add("times/quarter", b"q", mtime=MTIME + 123.25)
    t.add("times/near-epoch", b"n", mtime=0.75)
    t.add("times/pre-epoch", b"p", mtime=-1)
    t.add("./dotslash.txt", b"a name with ./\n")
    t.add("data/empty-b", uid=2000, gid=2000, uname="carol", gname="carol")
    # The duplicate: the later entry wins, at its (later) position.
    t.add("data/dup.txt", data=b"second version, this one wins\n", mode=0o640, mtime=MTIME + 5)
    return t.bytes()


def gnu_tar(seed: int = 77) -> bytes:
    """A GNU-format layer: long names and link names (././@LongLink), base-256 ids."""
    rnd = random.Random(seed)
    t = _Tar(tarfile.GNU_FORMAT)
    t.dir("gnu/")
    t.add(GNU_LONG_NAME, rnd.randbytes(5000), mode=0o755)
    t.add("gnu/lnk", kind=tarfile.SYMTYPE, linkname="../" + "t" * 150, mode=0o777)
    t.add("gnu/big-ids", b"big ids\n", uid=3_000_000, gid=3_000_001,
          uname="biguser", gname="biggroup")
    t.add("gnu/sda1", kind=tarfile.BLKTYPE, mode=0o660, dev=(8, 1))
    t.dir("gnu/" + "h" * 110 + "/")
    t.add("gnu/" + "h" * 110 + "/inner.txt", b"in a long dir\n")
    assert len(GNU_LONG_NAME) > 100
    return t.bytes()


def umoci_tar() -> bytes:
    """Files under usr/ without entries for usr/ or usr/bin/ (as umoci writes)."""
    t = _Tar()
    t.dir("etc/")
    t.add("etc/tool.conf", b"verbose = true\n")
    t.add(UMOCI_TOOL, b"tool: not really a program\n", mode=0o755)
    t.add("usr/share/doc/tool/README", b"no parent entries either\n")
    return t.bytes()


# --- the two converters -----------------------------------------------------


def write_record(path: Path, image: OCIImage, per_layer: tuple[tuple[str, ...], ...]) -> Path:
    """A record file as ``ctr-remote optimize --record-out`` writes it."""
    with open(path, "w") as f:
        for index, paths in enumerate(per_layer):
            for p in paths:
                f.write(json.dumps({"path": p, "manifestDigest": image.manifest_digest,
                                    "layerIndex": index}, separators=(",", ":")) + "\n")
    return path


def reference_tocs(ctr_remote: Path, containerd, image: OCIImage, fmt: str, target: str,
                   record: Path | None) -> list[dict]:
    """Convert *image* with ctr-remote; return the TOC of each layer, bottom first."""
    zstd = fmt == "zstdchunked"
    args = ["image", "convert", "--oci", "--zstdchunked" if zstd else "--estargz"]
    if record is not None:
        args += ["--zstdchunked-record-in" if zstd else "--estargz-record-in", str(record)]
    res = ctr_remote_run(ctr_remote, containerd, *args, image.ref, target)
    printed = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    target_digest = image_target(containerd, target)
    assert printed == target_digest, f"ctr-remote printed {res.stdout!r}; {target} is at " \
        f"{target_digest}"
    manifest = read_manifest(containerd, target_digest)
    layers = manifest["layers"]
    assert len(layers) == len(image.layer_digests), manifest
    tocs = []
    for layer in layers:
        assert TOC_DIGEST_ANNOTATION in layer.get("annotations", {}), layer
        dump = ["images", "get-toc-digest", "--dump-toc"]
        if zstd:
            dump.append("--zstdchunked")
        out = ctr_remote_run(ctr_remote, containerd, *dump, layer["digest"]).stdout
        tocs.append(json.loads(out))
    return tocs


def our_convert(src: Path, out: Path, fmt: str, prioritized: Path | None) -> tuple[dict, dict]:
    """Convert *src* with estargz-opt; return (convert report, TOC)."""
    args = ["layer", "convert", str(src), str(out), "--format", fmt]
    if prioritized is not None:
        args += ["--prioritized-files", str(prioritized)]
    report = json.loads(invoke(*args, check=True).stdout)
    toc = json.loads(invoke("layer", "toc", str(out), check=True).stdout)
    return report, toc


# --- comparison -------------------------------------------------------------


# --- fixtures ---------------------------------------------------------------

@dataclass(frozen=True)
class ParityImage:
    image: OCIImage
    names: tuple[str, ...]  # layer labels, bottom first


@pytest.fixture(scope="module")
def parity_image(containerd, busybox_layer: Path, tmp_path_factory) -> ParityImage:
    base = tmp_path_factory.mktemp("parity")
    tars = [busybox_layer.read_bytes(), synthetic_tar(), gnu_tar()]
    image = write_oci_layout(base / "layout", tars, "localhost/parity:1")
    import_image(containerd, image, base / "image.tar")
    return ParityImage(image, ("busybox", "synthetic", "gnu"))


@pytest.fixture(scope="module")
def umoci_image(containerd, busybox_layer: Path, tmp_path_factory) -> OCIImage:
    base = tmp_path_factory.mktemp("umoci")
    # The analyzer of `ctr-remote image optimize` runs this; cat opens the
    # files, so they are recorded (bin/busybox in layer 0, the rest in 1).
    config = {"Entrypoint": ["/bin/busybox", "cat", "/" + UMOCI_TOOL, "/etc/tool.conf"]}
    image = write_oci_layout(base / "layout", [busybox_layer.read_bytes(), umoci_tar()],
                             "localhost/parity-umoci:1", image_config=config)
    import_image(containerd, image, base / "image.tar")
    return image


# --- tests ------------------------------------------------------------------

@pytest.mark.parametrize("prioritized", [False, True], ids=["no-prio", "prio"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_toc_matches_ctr_remote(fmt: str, prioritized: bool, parity_image: ParityImage,
                                containerd, ctr_remote: Path, tmp_path: Path) -> None:
    image = parity_image.image
    record = prio_file = None
    if prioritized:
        record = write_record(tmp_path / "record.jsonl", image, PRIORITIZED)
        union = [p for paths in PRIORITIZED for p in paths]
        prio_file = tmp_path / "prioritized.txt"
        prio_file.write_text("".join(p + "\n" for p in union))
    target = f"localhost/parity:1-{fmt}-{'prio' if prioritized else 'plain'}"
    ref_tocs = reference_tocs(ctr_remote, containerd, image, fmt, target, record)

    reports = []
    for index, (name, blob) in enumerate(zip(parity_image.names, image.layer_blobs,
                                             strict=True)):
        _, our_toc = our_convert(blob, tmp_path / f"{name}.out", fmt, prio_file)
        ours, ref = normalize(our_toc), normalize(ref_tocs[index])
        # The landmark is the same on both sides (a guard for the test itself).
        expect = LANDMARK if prioritized else NO_LANDMARK
        names = [e["name"] for e in ref["entries"]]
        assert expect in names, f"ctr-remote's {name} TOC lacks {expect}"
        report = describe_mismatch(f"layer {index} ({name}), {fmt}, "
                                   f"{'prioritized' if prioritized else 'no prioritized files'}",
                                   ours, ref)
        if report:
            reports.append(report)
    if reports:
        pytest.fail("\n\n".join(reports), pytrace=False)


def test_parity_layers_cover_the_corner_cases() -> None:
    """Guard: the synthetic and GNU layers really contain what the parity
    test claims to exercise (tarfile could silently normalise some of it)."""
    syn_raw, gnu_raw = synthetic_tar(), gnu_tar()
    with tarfile.open(fileobj=io.BytesIO(syn_raw)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]  # tarfile strips directories' trailing "/"
    assert names[0] == "."
    assert b"./\x00" in syn_raw and b"deep/a\x00" in syn_raw and b"deep/a/b/\x00" in syn_raw
    assert names.count("data/dup.txt") == 2
    assert LANDMARK in names
    assert any(m.ischr() for m in members) and any(m.isfifo() for m in members)
    assert any(m.islnk() and m.linkname == "deep/a/b/c/target.txt" for m in members)
    xattr = next(m for m in members if m.name == "xattrs.txt")
    assert sum(k.startswith("SCHILY.xattr.") for k in xattr.pax_headers) == 2
    for name in ("times/half", "times/near-epoch", "times/pre-epoch"):
        assert "mtime" in next(m for m in members if m.name == name).pax_headers, name
    with tarfile.open(fileobj=io.BytesIO(gnu_raw)) as tar:
        gnu = tar.getmembers()
    assert any(m.name == GNU_LONG_NAME for m in gnu)
    assert b"././@LongLink" in gnu_raw and gnu_raw[257:265] == b"ustar  \x00"


@pytest.mark.parametrize("fmt", FORMATS)
def test_umoci_layer_without_prioritized_files(fmt: str, umoci_image: OCIImage, containerd,
                                               ctr_remote: Path, tmp_path: Path) -> None:
    ref_tocs = reference_tocs(ctr_remote, containerd, umoci_image, fmt,
                              f"localhost/parity-umoci:1-{fmt}", None)
    _, our_toc = our_convert(umoci_image.layer_blobs[1], tmp_path / "umoci.out", fmt, None)
    report = describe_mismatch(f"umoci layer, {fmt}, no prioritized files",
                               normalize(our_toc), normalize(ref_tocs[1]))
    if report:
        pytest.fail(report, pytrace=False)


def test_umoci_layer_prioritized(umoci_image: OCIImage, containerd, ctr_remote: Path,
                                 tmp_path: Path) -> None:
    if shutil.which("runc") is None:
        pytest.skip("ctr-remote optimize runs the image: runc is not installed")
    # The reference: optimize runs the image, records bin/busybox and
    # usr/bin/tool, and cannot move usr/bin/tool because usr/bin has no entry.
    res = ctr_remote_run(ctr_remote, containerd, "image", "optimize", "--oci", "--period", "5",
                         "--record-out", str(tmp_path / "record.jsonl"),
                         umoci_image.ref, "localhost/parity-umoci:1-opt", check=False)
    assert res.returncode != 0, (
        f"ctr-remote optimize was expected to fail on the umoci layer\n"
        f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    # The analyzer did run and recorded the file in the umoci layer (index 1).
    record = tmp_path / "record.jsonl"
    assert record.is_file(), f"optimize wrote no record; stderr:\n{res.stderr}"
    recorded = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    assert {"path": UMOCI_TOOL, "manifestDigest": umoci_image.manifest_digest,
            "layerIndex": 1} in recorded, recorded
    assert "not found" in res.stderr, res.stderr
    assert 'file: "usr/bin": not found' in res.stderr, res.stderr

    # Ours converts, verifies and puts the file first, then the landmark.
    prio = tmp_path / "prioritized.txt"
    prio.write_text(UMOCI_TOOL + "\n")
    src = umoci_image.layer_blobs[1]
    for fmt in FORMATS:
        out = tmp_path / f"umoci-{fmt}.out"
        report, toc = our_convert(src, out, fmt, prio)
        invoke("layer", "verify", str(out), "--toc-digest", report["tocDigest"], check=True)
        names = [e["name"] for e in toc["entries"]]
        assert names[:2] == [UMOCI_TOOL, LANDMARK], names
        # Nothing invented, nothing lost: the rest is the input in order.
        with tarfile.open(src) as tar:
            inputs = [m.name for m in tar.getmembers()]
        assert [n.rstrip("/") for n in names[2:]] == [n for n in inputs if n != UMOCI_TOOL], \
            names
        assert not any(PurePosixPath(n) in (PurePosixPath("usr"), PurePosixPath("usr/bin"))
                       for n in names), names


def test_reference_convert_skips_unmovable_paths(umoci_image: OCIImage, containerd,
                                                 ctr_remote: Path, tmp_path: Path) -> None:
    """Pins what the parity test relies on: 0.14.3's ``convert`` applies the
    record's paths to every layer and silently skips those it cannot move
    (usr/bin/tool stays in place here), where ``optimize`` aborts."""
    record = write_record(tmp_path / "record.jsonl", umoci_image,
                          (("bin/busybox",), (UMOCI_TOOL,)))
    tocs = reference_tocs(ctr_remote, containerd, umoci_image, "estargz",
                          "localhost/parity-umoci:1-recorded", record)
    busybox_names = [e["name"] for e in tocs[0]["entries"]]
    assert busybox_names[:3] == ["bin/", "bin/busybox", LANDMARK], busybox_names
    umoci_names = [e["name"] for e in tocs[1]["entries"]]
    with tarfile.open(umoci_image.layer_blobs[1]) as tar:
        inputs = [m.name for m in tar.getmembers()]
    assert umoci_names[0] == LANDMARK, umoci_names
    assert [n.rstrip("/") for n in umoci_names[1:]] == inputs, umoci_names
