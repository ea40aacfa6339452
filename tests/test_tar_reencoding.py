"""Re-encoded tar headers are Go's, byte for byte, and every PAX record length is right.

Upstream's Build reads each header with Go's archive/tar and writes it back with
tar.Writer (the reader's Header.Format carried along), then tar-split's fork does the
same again; so ctr-remote's uncompressed payload is exactly what Go's writer makes of
Go's reading of the input. These tests hold our payload against that:

* against ctr-remote 0.14.3 itself (``image convert --oci --estargz`` and
  ``--zstdchunked`` in the private containerd): every entry's bytes (its PAX/GNU
  headers, header, content and padding), with the TOC and the landmark set aside, for
  tars in GNU, PAX and USTAR formats made by Python and by GNU tar, and for
  hypothesis-generated trees in each format; for zstd:chunked the DiffIDs are equal too;
* against tests/go/retar (Go's archive/tar, then Debian's tar-split) for many more
  hypothesis-generated trees, since it is fast;
* PAX records of every length up to 10,010 bytes (names, link names, xattrs and other
  records) read back exactly by GNU tar, Python's tarfile and Go's reader; the boundary
  lengths that a file system can hold are unpacked by containerd and run with ``ctr run``.

The one difference left by design, absolute names made relative, is kept out of the
inputs here (test_conformance and the README cover it).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from support.cli import invoke
from support.imagefactory import archive_for_ctr
from support.ociimage import OCIImage, image_target, import_image, read_manifest, write_oci_layout
from support.reference import ctr_remote_run
from support.tarbytes import (
    SET_ASIDE,
    build_retar,
    kept_entries,
    pax_records,
    retar,
    split_entries,
    try_retar,
)
from support.tarfactory import (
    GNU,
    PAX,
    Entry,
    clean_name,
    decompress_blob,
    dir_,
    hardlink,
    layer_trees,
    raw_header,
    reg,
    symlink,
)

from estargz_opt.errors import BadInputError
from estargz_opt.format import Format, LayerOptions, convert_layer

USTAR = tarfile.USTAR_FORMAT
FORMATS = {"pax": PAX, "gnu": GNU, "ustar": USTAR}
MTIME = 1_700_000_000
MAX_RECORD = 10_010
# Record texts (" key=value\n", the length field excluded) around each digit boundary.
BOUNDARY_TEXTS = (8, 9, 10, 11, 96, 97, 98, 99, 100, 101, 995, 996, 997, 998, 999, 1000, 1001)


# --- inputs ----------------------------------------------------------------------------------

def write_tar(entries: list[Entry]) -> bytes:
    return b"".join(e.encode() for e in entries) + bytes(1024)


def in_format(entries: list[Entry], fmt: int | None) -> list[Entry]:
    """entries written in fmt (None: each keeps its own), relative, and only those the
    format can hold (xattrs need PAX; tarfile refuses what USTAR cannot encode)."""
    out = []
    for e in entries:
        link = e.linkname.lstrip("/") if e.type == tarfile.LNKTYPE else e.linkname
        f = e.fmt if fmt is None else fmt
        e = replace(e, name=e.name.lstrip("/") or "./", linkname=link, fmt=f,
                    xattrs=e.xattrs if f == PAX else {})
        try:
            e.header()
        except ValueError:
            continue
        out.append(e)
    return out


def corner_entries() -> list[Entry]:
    """The header corner cases: long, split and non-ASCII names, long link names, devices,
    hardlinks, big and negative numbers, sub-second times, long and non-ASCII owners."""
    long_dir = "d/" + "p" * 98  # 101 bytes with its slash: USTAR still splits it
    return [
        dir_("./", mtime=MTIME), dir_("d/", mtime=MTIME),
        reg("\u00e9", b"e-acute: a 9-byte path record\n", mtime=MTIME),
        reg("caf\u00e9/\u65e5\u672c.txt", b"non-ASCII\n", uname="j\u00fcrgen", gname="gr\u00fcn"),
        reg("a" * 100, b"exactly 100\n"), reg("b" * 101, b"101\n"),
        dir_(long_dir + "/"), reg(long_dir + "/split.txt", b"splits into prefix/name\n"),
        reg("c" * 90 + "/" + "q" * 180, b"a 180-byte last component\n"),
        reg("d/" + "r" * 250 + "/" + "s" * 40, b"a 250-byte directory\n"),
        symlink("sym-long", "../" + "t" * 150), symlink("sym-\u00e9", "cible-\u00e9"),
        hardlink("hard-long", "b" * 101), hardlink("h" * 120, "\u00e9"),
        Entry("dev/null0", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        Entry("dev/sdz", tarfile.BLKTYPE, mode=0o660, devmajor=4095, devminor=1_048_575),
        Entry("dev/fifo", tarfile.FIFOTYPE, mode=0o600),
        reg("times/half", b"h", mtime=MTIME + 0.5), reg("times/tiny", b"t", mtime=MTIME + 1e-6),
        reg("times/pre-epoch", b"p", mtime=-1.5), reg("times/zero", b"z", mtime=0),
        reg("times/far", b"f", mtime=2**34), reg("times/farther", b"f", mtime=2**37 + 0.25),
        reg("ids/big", b"i", uid=3_000_000, gid=2_097_152, uname="big", gname="big"),
        reg("ids/max-octal", b"i", uid=2_097_151, gid=0),
        reg("ids/long-uname", b"u", uname="u" * 40, gname="g" * 33),
        reg("modes/setuid", b"s", mode=0o4755), reg("modes/all", b"a", mode=0o7777),
        reg("xattrs.txt", b"x", xattrs={"user.alpha": "caf\u00e9", "user.zeta": "z" * 300,
                                        "user.empty": ""}),
        reg("big.bin", os.urandom(3 * 4096 + 17)), reg("empty"),
    ]


def gnu_tar_inputs(tmp: Path) -> dict[str, bytes]:
    """Archives GNU tar writes of a real tree, in each of its formats."""
    root = tmp / "tree"
    (root / ("l" * 200) / "x").mkdir(parents=True)
    (root / "donn\u00e9es").mkdir()
    (root / "donn\u00e9es" / "\u00e9t\u00e9.txt").write_text("summer\n")
    (root / ("l" * 200) / "x" / ("n" * 150)).write_text("long path\n")
    (root / "plain.txt").write_text("plain\n")
    os.symlink("../" + "t" * 150, root / "sym-long")
    os.link(root / "plain.txt", root / "hard")
    os.mkfifo(root / "fifo")
    if os.geteuid() == 0:
        os.mknod(root / "null0", 0o20666, os.makedev(1, 3))
    os.setxattr(root / "plain.txt", "user.note", b"an xattr")
    for i, path in enumerate(sorted(root.rglob("*"), reverse=True)):
        stamp = (MTIME + i) * 10**9 + i * 123_456_789 % 10**9
        os.utime(path, ns=(stamp, stamp), follow_symlinks=False)
    shallow = tmp / "shallow"  # what ustar and v7 can hold
    shallow.mkdir()
    (shallow / "a.txt").write_text("a\n")
    os.symlink("a.txt", shallow / "s")
    os.link(shallow / "a.txt", shallow / "h")
    out = {}
    for fmt in ("gnu", "oldgnu", "posix", "ustar", "v7"):
        src = shallow if fmt in ("ustar", "v7") else root
        xattrs = ["--xattrs"] if fmt == "posix" else []  # (--xattrs would force posix)
        res = subprocess.run(["tar", f"--format={fmt}", *xattrs, "--sort=name", "-cf", "-",
                              "-C", str(src), "."], capture_output=True, check=True)
        out[f"gnutar-{fmt}"] = res.stdout
    return out


# --- the two converters ----------------------------------------------------------------------

def our_payload(tar_bytes: bytes, tmp: Path, fmt: Format = Format.ESTARGZ) -> tuple[bytes, str]:
    """(decompressed blob, DiffID) of our conversion of tar_bytes."""
    src, out = tmp / "in.tar", tmp / "out.layer"
    src.write_bytes(tar_bytes)
    result = convert_layer(src, out, LayerOptions(format=fmt, compression_level=1))
    return decompress_blob(out.read_bytes(), fmt.value), result.diff_id


def reference_layers(ctr_remote: Path, containerd, image: OCIImage, fmt: str,
                     target: str) -> tuple[list[bytes], list[str]]:
    """ctr-remote's converted layers of image, decompressed, and their config DiffIDs."""
    ctr_remote_run(ctr_remote, containerd, "image", "convert", "--oci", f"--{fmt}",
                   image.ref, target)
    manifest = read_manifest(containerd, image_target(containerd, target))

    def blob(digest: str) -> bytes:
        return containerd.ctr("content", "get", digest, input=b"").stdout

    config = json.loads(blob(manifest["config"]["digest"]))
    payloads = [decompress_blob(blob(layer["digest"]), fmt) for layer in manifest["layers"]]
    return payloads, config["rootfs"]["diff_ids"]


def compare_entries(label: str, ours: bytes, ref: bytes) -> list[str]:
    """Readable differences between two payloads' entries (empty when byte-identical)."""
    a, b = kept_entries(ours), kept_entries(ref)
    problems = []
    if [e.name for e in a] != [e.name for e in b]:
        problems.append(f"{label}: entry names differ:\n  ours {[e.name for e in a]}\n"
                        f"  ctr-remote {[e.name for e in b]}")
    for x, y in zip(a, b, strict=False):
        if x.raw != y.raw:
            at = next(i for i in range(min(len(x.raw), len(y.raw)) + 1)
                      if x.raw[i:i + 1] != y.raw[i:i + 1])
            blk = at - at % 512
            problems.append(f"{label}: entry {x.name!r} differs at byte {at} (offset {at % 512} "
                            f"of its block):\n  ours       {x.raw[blk:blk + 512]!r}\n"
                            f"  ctr-remote {y.raw[blk:blk + 512]!r}")
    return problems


def in_tar(tar_bytes: bytes) -> set[str]:
    """The distinct entry names of a tar (what both converters keep)."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {clean_name(m.name) for m in tar}


def check_against_ctr_remote(layers: dict[str, bytes], ctr_remote: Path, containerd,
                             tmp: Path, name: str) -> None:
    image = write_oci_layout(tmp / "layout", list(layers.values()), f"localhost/{name}:1")
    import_image(containerd, image, tmp / "image.tar")
    problems = []
    for fmt in ("estargz", "zstdchunked"):
        ref_payloads, ref_diff_ids = reference_layers(ctr_remote, containerd, image, fmt,
                                                      f"localhost/{name}:1-{fmt}")
        for i, (label, tar_bytes) in enumerate(layers.items()):
            work = tmp / f"{fmt}-{i}"
            work.mkdir()
            ours, diff_id = our_payload(tar_bytes, work, Format(fmt))
            count = len(kept_entries(ref_payloads[i]))
            assert count == len(in_tar(tar_bytes)), f"{label}: ctr-remote kept {count} entries"
            problems += compare_entries(f"{label} ({fmt})", ours, ref_payloads[i])
            if fmt == "zstdchunked" and diff_id != ref_diff_ids[i]:
                problems.append(f"{label} (zstdchunked): DiffID {diff_id} but ctr-remote's is "
                                f"{ref_diff_ids[i]}")
    assert not problems, "\n".join(problems[:12])


# --- against ctr-remote ----------------------------------------------------------------------

@pytest.mark.interop
def test_payload_equals_ctr_remote_for_corner_cases(ctr_remote: Path, containerd,
                                                    tmp_path: Path) -> None:
    layers = {f"python-{label}": write_tar(in_format(corner_entries(), fmt))
              for label, fmt in FORMATS.items()}
    layers.update(gnu_tar_inputs(tmp_path))
    # Guards: the inputs really are in the formats they are named after.
    assert layers["python-gnu"][257:265] == b"ustar  \0"
    assert layers["python-ustar"][257:265] == b"ustar\x0000"
    assert b"././@LongLink" in layers["gnutar-gnu"] and b"././@LongLink" in layers["python-gnu"]
    assert b"SCHILY.xattr.user.note" in layers["gnutar-posix"]
    assert len(in_format(corner_entries(), USTAR)) >= 20
    check_against_ctr_remote(layers, ctr_remote, containerd, tmp_path, "reencode-corners")


def _format_trees(fmt: int | None) -> st.SearchStrategy[list[Entry]]:
    """Several generated trees in one layer (ctr-remote is slow: batch the entries)."""
    trees = st.lists(layer_trees(max_entries=14), min_size=4, max_size=4)
    return trees.map(lambda ts: in_format([e for t in ts for e in t], fmt))


@pytest.mark.interop
@settings(max_examples=6, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(pax=_format_trees(PAX), gnu=_format_trees(GNU), ustar=_format_trees(USTAR),
       mixed=_format_trees(None))
def test_payload_equals_ctr_remote_for_generated_trees(
        pax: list[Entry], gnu: list[Entry], ustar: list[Entry], mixed: list[Entry],
        ctr_remote: Path, containerd, retar_bin: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("generated")
    # A marker entry keeps the layers distinct (ctr-remote fails on two equal layers: it
    # converts both at once under the same lock).
    layers = {label: write_tar([*entries, reg(f"layer-{label}", label.encode(), fmt=PAX)])
              for label, entries in (("pax", pax), ("gnu", gnu), ("ustar", ustar),
                                     ("mixed", mixed))}
    for label, raw in list(layers.items()):
        if try_retar(retar_bin, raw) is None:  # Go's writer (so ctr-remote) refuses it: so do we
            with pytest.raises(BadInputError, match="cannot re-encode tar entry"):
                our_payload(raw, tmp)
            del layers[label]
    check_against_ctr_remote(layers, ctr_remote, containerd, tmp, f"reencode-gen-{tmp.name}")


# --- against Go's archive/tar directly -------------------------------------------------------

@pytest.fixture(scope="session")
def retar_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = build_retar(tmp_path_factory.mktemp("retar"))
    if binary is None:
        pytest.skip("go or Debian's golang-github-vbatts-tar-split-dev is not installed")
    return binary


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tree=layer_trees(max_entries=20), fmt=st.sampled_from([PAX, GNU, USTAR, None]))
def test_payload_equals_go_for_generated_trees(tree: list[Entry], fmt: int | None,
                                               retar_bin: Path,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    # Upstream (and we) keep only the last entry of a name; retar re-encodes them all.
    entries = in_format(tree, fmt)
    last = {clean_name(e.name): i for i, e in enumerate(entries)}
    raw = write_tar([e for i, e in enumerate(entries) if last[clean_name(e.name)] == i])
    reference = try_retar(retar_bin, raw)
    if reference is None:  # Go's writer refuses it (ctr-remote fails): we refuse it too
        with pytest.raises(BadInputError, match="cannot re-encode tar entry"):
            our_payload(raw, tmp_path_factory.mktemp("go"))
        return
    ours, _ = our_payload(raw, tmp_path_factory.mktemp("go"))
    problems = compare_entries("generated", ours, reference)
    assert not problems, "\n".join(problems)


def test_payload_equals_go_for_corner_cases(retar_bin: Path, tmp_path: Path) -> None:
    inputs = {label: write_tar(in_format(corner_entries(), fmt)) for label, fmt in FORMATS.items()}
    inputs.update(gnu_tar_inputs(tmp_path))
    for label, raw in inputs.items():
        work = tmp_path / label
        work.mkdir()
        ours, _ = our_payload(raw, work)
        problems = compare_entries(label, ours, retar(retar_bin, raw))
        assert not problems, "\n".join(problems)


# --- PAX record lengths ----------------------------------------------------------------------

def _record_length(text: int) -> int:
    """The length of a record whose text (" key=value\\n") is text bytes: the length field
    counts its own digits, so texts of 9, 98, 99, 997... bytes take one digit more."""
    short = text + len(str(text))
    return short if len(str(short)) == len(str(text)) else short + 1


# Record lengths that exist: none of 1-4, 10, 100, 1000 or 10000 (a 9-byte text makes an
# 11-byte record, an 8-byte one a 9-byte record).
REACHABLE = frozenset(_record_length(text) for text in range(4, MAX_RECORD))


def _value_for(record_length: int, key: str) -> int | None:
    """The value length that makes "%d key=value\\n" exactly record_length bytes long."""
    if record_length not in REACHABLE:
        return None
    digits = len(str(record_length))
    value = record_length - digits - len(key) - 3
    return value if value > 0 else None


def _text_value(text_length: int, key: str) -> int:
    """The value length that makes the record text " key=value\\n" text_length bytes."""
    return text_length - len(key) - 3


def _filled(length: int, unique: str, slash_every: int = 0) -> str:
    """A non-ASCII string of exactly length bytes (ASCII when under 3), starting with
    unique; with slash_every, a '/' every that many bytes (path components)."""
    raw = bytearray((unique + "\u00e9").encode() + b"x" * length)[:length]
    if length < len(unique) + 2:
        raw = bytearray(unique.encode()[:length].rjust(length, b"y"))
    if slash_every:
        for i in range(slash_every, length - 1, slash_every + 1):
            raw[i] = ord("/")
    return raw.decode()


@dataclass
class PaxEntry(Entry):
    """An Entry written with exactly these PAX records."""

    pax: dict[str, str] = field(default_factory=dict)

    def header(self) -> bytes:
        info = self.tarinfo()
        info.pax_headers = dict(self.pax)
        return info.tobuf(PAX, "utf-8", "surrogateescape")


def record_length_entries(lengths: range) -> list[PaxEntry]:
    """One symlink per record length R: its path, linkpath, xattr and comment records are
    each exactly R bytes long, where the key leaves room for a value."""
    out = []
    for length in lengths:
        unique = f"{length}-"
        name = _filled(_value_for(length, "path") or 12, unique)
        target = _filled(_value_for(length, "linkpath") or 3, unique)
        pax = {"path": name, "linkpath": target}
        if (comment := _value_for(length, "c")) is not None:
            pax["c"] = "v" * comment
        if (xattr := _value_for(length, "SCHILY.xattr.user.k")) is not None:
            pax["SCHILY.xattr.user.k"] = "w" * xattr
        out.append(PaxEntry(name, tarfile.SYMTYPE, linkname=target, mode=0o777, mtime=MTIME,
                            pax=pax))
    return out


_GNU_TAR_LINE = re.compile(r"^\S+ +\S+ +\d+ \S+ \S+ (.*)$")


def _read_back_everywhere(payload: bytes, entries: list[PaxEntry], retar_bin: Path) -> None:
    """GNU tar, Python's tarfile and Go's reader all read entries back from payload."""
    want = {e.name: (e.linkname, {k: v for k, v in e.pax.items()
                                  if k not in ("path", "linkpath")}) for e in entries}
    got = {}
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        for m in tar:
            if m.name not in SET_ASIDE:
                got[m.name] = (m.linkname, {k: v for k, v in m.pax_headers.items()
                                            if k not in ("path", "linkpath")})
    assert got == want, "Python's tarfile reads other names, targets or records"

    res = subprocess.run(["tar", "--xattrs", "--quoting-style=literal", "-tvvf", "-"],
                         input=payload, capture_output=True)
    # A keyword of its own ("c" keeps records short) is reported and skipped, as it should.
    complaints = [line for line in res.stderr.decode().splitlines()
                  if line != "tar: Ignoring unknown extended header keyword 'c'"]
    assert res.returncode == 0 and not complaints, complaints[:5]
    listed: dict[str, tuple[str, list[str]]] = {}
    current = ""
    for line in res.stdout.decode("utf-8", "surrogateescape").splitlines():
        if line.startswith("  x: "):
            listed[current][1].append(line[5:])
            continue
        match = _GNU_TAR_LINE.match(line)
        assert match, line[:200]
        current, _, target = match.group(1).partition(" -> ")
        listed[current] = (target, [])
    for name, (target, records) in want.items():
        assert name in listed, f"GNU tar does not list {name[:40]!r}..."
        xattr = records.get("SCHILY.xattr.user.k")
        assert listed[name] == (target, [f"{len(xattr)} user.k"] if xattr is not None else []), \
            name[:40]

    # Go's reader (containerd unpacks with it) reads every header and writes the same bytes.
    assert split_entries(retar(retar_bin, payload)) == split_entries(payload)


# Record lengths 5..10,010 in parts of similar size, so that memory stays small.
_LENGTH_PARTS = (range(5, 4500), range(4500, 6400), range(6400, 7800), range(7800, 9000),
                 range(9000, MAX_RECORD + 1))


@pytest.mark.slow
@pytest.mark.parametrize("lengths", _LENGTH_PARTS, ids=lambda r: f"{r.start}-{r.stop - 1}")
def test_pax_records_of_every_length_read_back(lengths: range, retar_bin: Path,
                                               tmp_path: Path) -> None:
    entries = record_length_entries(lengths)
    ours, _ = our_payload(write_tar(entries), tmp_path)
    seen: dict[bytes, set[int]] = {}
    for length, key, _value in pax_records(ours):
        seen.setdefault(key, set()).add(length)
    for key in (b"c", b"path", b"linkpath", b"SCHILY.xattr.user.k"):
        possible = {n for n in lengths if _value_for(n, key.decode()) is not None}
        missing = possible - seen.get(key, set())
        assert not missing, f"no exact {key!r} record of lengths {sorted(missing)[:20]}"
    _read_back_everywhere(ours, entries, retar_bin)


def test_pax_record_length_sweep_covers_the_boundaries() -> None:
    """Guard for the sweep above: the buggy lengths of the old writer are all in it."""
    covered = {n for part in _LENGTH_PARTS for n in part}
    assert covered == set(range(5, MAX_RECORD + 1))
    assert REACHABLE & set(range(MAX_RECORD + 1)) == covered - {10, 100, 1000, 10_000}
    texts = {n - len(str(n)) for n in covered & REACHABLE}  # record length - its length field
    assert {9, 98, 99, 997, 998, 999, 9996, 9997, 9998, 9999} <= texts


def boundary_entries() -> tuple[list[PaxEntry], dict[str, str], dict[str, bytes]]:
    """Entries whose path, linkpath or xattr record text has each length of
    BOUNDARY_TEXTS, in names a file system can hold. Returns (entries, the listing the
    container must print, the xattr of each file)."""
    entries: list[PaxEntry] = [PaxEntry(d, tarfile.DIRTYPE, mode=0o755, mtime=MTIME)
                               for d in ("t/", "s/", "a/")]
    listing: dict[str, str] = {}
    xattrs: dict[str, bytes] = {}
    for text in BOUNDARY_TEXTS:
        n = _text_value(text, "path")
        name = _filled(n, f"{text}-") if n < 8 else "t/" + _filled(n - 2, f"{text}-", 200)
        for i, ch in enumerate(name):
            if ch == "/" and not any(e.name == name[: i + 1] for e in entries):
                entries.append(PaxEntry(name[: i + 1], tarfile.DIRTYPE, mode=0o755,
                                        mtime=MTIME, pax={"path": name[: i + 1]}))
        entries.append(PaxEntry(name, data=f"{text}\n".encode(), mtime=MTIME,
                                pax={"path": name}))
        listing[name] = f"F {name} {text}"
        if (link_len := _text_value(text, "linkpath")) > 0:
            link = _filled(link_len, f"{text}-")
            entries.append(PaxEntry(f"s/{text}", tarfile.SYMTYPE, linkname=link, mode=0o777,
                                    mtime=MTIME, pax={"linkpath": link}))
            listing[f"s/{text}"] = f"L s/{text} {link}"
        if (value := _text_value(text, "SCHILY.xattr.user.k")) > 0:
            xattrs[f"a/{text}"] = b"z" * value
            entries.append(PaxEntry(f"a/{text}", data=f"{text}\n".encode(), mtime=MTIME,
                                    pax={"SCHILY.xattr.user.k": "z" * value}))
            listing[f"a/{text}"] = f"F a/{text} {text}"
    return entries, listing, xattrs


def _list_script(tops: list[str]) -> str:
    """A shell loop printing 'F path content' or 'L path target' for everything under tops."""
    return (
        f"cd / && for p in $(busybox find {' '.join(tops)} -type f -o -type l | busybox sort);"
        ' do if [ -L "$p" ]; then echo "L $p $(busybox readlink "$p")";'
        ' else echo "F $p $(busybox cat "$p")"; fi; done'
    )


@pytest.mark.interop
def test_boundary_records_unpack_and_run_in_containerd(containerd, busybox_layer: Path,
                                                       tmp_path: Path) -> None:
    entries, listing, xattrs = boundary_entries()
    layer = write_tar(entries)
    records = {length - len(str(length)) for length, _k, _v in pax_records(layer)}
    assert set(BOUNDARY_TEXTS) <= records  # guard: the input has every boundary text
    tops = sorted({path.split("/")[0] for path in listing})
    config = {"Entrypoint": ["/bin/busybox", "sh", "-c", _list_script(tops)]}
    write_oci_layout(tmp_path / "src", [busybox_layer.read_bytes(), layer],
                     "localhost/pax-bounds:1", image_config=config)
    invoke("optimize", "--oci", "--no-optimize", "-q", f"oci:{tmp_path / 'src'}:1",
                f"oci:{tmp_path / 'out'}:1", check=True)
    ours = decompress_blob(_top_layer_blob(tmp_path / "out"), "estargz")
    got_records = {length - len(str(length)) for length, _k, _v in pax_records(ours)}
    assert set(BOUNDARY_TEXTS) <= got_records
    image = "docker.io/estargz-opt-test/pax-bounds:1"
    containerd.ctr("images", "import", str(archive_for_ctr(tmp_path / "out", "1", image,
                                                           tmp_path / "ctr.tar")))
    try:
        out = containerd.ctr("run", "--rm", image, f"pax-bounds-{os.getpid()}").stdout
        assert out.splitlines() == sorted(listing.values(), key=lambda s: s.split(" ")[1])
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        containerd.ctr("images", "mount", image, str(mnt))
        try:
            for path, value in xattrs.items():
                assert os.getxattr(mnt / path, "user.k") == value, path
        finally:
            containerd.ctr("images", "unmount", str(mnt))
    finally:
        subprocess.run(["ctr", "-a", containerd.address, "-n", "default", "images", "rm",
                        image], capture_output=True)


def _top_layer_blob(layout: Path) -> bytes:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" /
                           index["manifests"][0]["digest"][7:]).read_bytes())
    return (layout / "blobs" / "sha256" / manifest["layers"][-1]["digest"][7:]).read_bytes()


def _base256(value: int, width: int) -> bytes:
    raw = bytearray((value & ((1 << (8 * width)) - 1)).to_bytes(width, "big"))
    raw[0] |= 0x80
    return bytes(raw)


def test_negative_ids_modes_and_devices_are_refused(tmp_path: Path) -> None:
    """Go would write uid -1 in PAX or base-256; no unpacker can apply it: one line, no output."""
    for what, offset, typeflag in (("uid", 108, b"0"), ("gid", 116, b"0"), ("mode", 100, b"0"),
                                   ("device major", 329, b"3"), ("device minor", 337, b"4")):
        header = raw_header(b"neg", typeflag, 0, gnu=True, extra={offset: _base256(-5, 8)})
        src = tmp_path / f"{offset}.tar"
        src.write_bytes(header + bytes(1024))
        out = tmp_path / f"{offset}.esgz"
        res = invoke("layer", "convert", str(src), str(out), check=False)
        assert res.returncode == 1, res
        assert res.stderr == (f"estargz-opt: error: cannot re-encode tar entry 'neg': "
                              f"negative {what} -5\n"), res.stderr
        assert not out.exists()


def test_gnu_name_of_almost_one_mib_stays_gnu(tmp_path: Path) -> None:
    """A GNU long name stays a ././@LongLink entry of the same size; the layer verifies."""
    name = "/".join(["n" * 250] * 4190)[: (1 << 20) - 2] + "z"
    src = tmp_path / "long.tar"
    src.write_bytes(write_tar([reg(name, b"deep\n", fmt=GNU)]))
    out = tmp_path / "long.esgz"
    invoke("layer", "convert", str(src), str(out), "--compression-level", "1", check=True)
    invoke("layer", "verify", str(out), check=True)
    payload = decompress_blob(out.read_bytes(), "estargz")
    entry = next(e for e in split_entries(payload) if e.name.startswith("nnn"))
    assert entry.raw[156:157] == b"L" and entry.raw[257:265] == b"ustar  \0"
    assert entry.raw[512:512 + len(name) + 1] == name.encode() + b"\0"


# --- gzip levels -1 and -2 -------------------------------------------------------------------

def _level_blob(src: Path, out: Path, level: int) -> bytes:
    invoke("layer", "convert", str(src), str(out), "--compression-level", str(level), check=True)
    invoke("layer", "verify", str(out), check=True)
    return out.read_bytes()


def test_gzip_levels_minus_one_and_minus_two(tmp_path: Path) -> None:
    """-1 is Go's DefaultCompression (flate 6); -2 Huffman-only: no LZ77 matches, so it
    compresses repetitive text far less than level 1 but more than storing."""
    src = tmp_path / "in.tar"
    src.write_bytes(write_tar([reg(f"f{i}", b"the same line again\n" * 4000) for i in range(3)]))
    blobs = {level: _level_blob(src, tmp_path / f"{level}.esgz", level) for level in (-2, -1, 0,
                                                                                       1, 6)}
    assert blobs[-1] == blobs[6]
    assert len(blobs[1]) < len(blobs[-2]) < len(blobs[0])
    for level in (-2, -1):  # Go's gzip header: XFL 0 for every level but 1 and 9
        assert blobs[level][:10] == bytes.fromhex("1f8b08000000000000ff")
    assert kept_entries(decompress_blob(blobs[-2], "estargz")) == kept_entries(
        decompress_blob(blobs[6], "estargz"))
    res = invoke("layer", "convert", str(src), str(tmp_path / "x"), "--compression-level",
                      "-3", check=False)
    assert res.returncode == 1 and "must be -2 to 9" in res.stderr and res.stderr.count("\n") == 1
    assert "Huffman-only" in invoke("layer", "convert", "--help", check=True).stdout
    assert "Huffman-only" in invoke("optimize", "--help", check=True).stdout


@pytest.mark.parametrize("level", ["-1", "-2"])
def test_optimize_accepts_negative_gzip_levels(level: str, tmp_path: Path) -> None:
    write_oci_layout(tmp_path / "src", [write_tar([reg("a.txt", b"a\n" * 1000)])],
                     "localhost/levels:1")
    out = tmp_path / "out"
    invoke("optimize", "--oci", "--no-optimize", "-q", "--estargz-compression-level", level,
                f"oci:{tmp_path / 'src'}:1", f"oci:{out}:1", check=True)
    layer = tmp_path / "layer.esgz"
    layer.write_bytes(_top_layer_blob(out))
    invoke("layer", "verify", str(layer), check=True)
    assert layer.read_bytes()[8] == 0  # XFL of Go's gzip at levels other than 1 and 9


def test_what_go_cannot_reencode_is_refused(retar_bin: Path, tmp_path: Path) -> None:
    """A USTAR directory whose 122-byte name tarfile stored as prefix + empty name: Go's
    writer cannot split it again and USTAR is the format it must keep, so ctr-remote fails;
    we refuse it in one line and write nothing."""
    raw = write_tar(in_format([dir_("d/" + "p" * 120 + "/")], USTAR))
    assert try_retar(retar_bin, raw) is None
    src, out = tmp_path / "in.tar", tmp_path / "out.esgz"
    src.write_bytes(raw)
    res = invoke("layer", "convert", str(src), str(out), check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("estargz-opt: error: cannot re-encode tar entry 'd/ppp")
    assert not out.exists()
