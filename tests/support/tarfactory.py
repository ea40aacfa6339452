"""Build real tar files for the layer-format tests, and read layers back independently.

Everything here is written against the format description (the eStargz and zstd:chunked specs), not
against the engine, so the tests can check the engine's output with code that does not share
its bugs:

* ``Entry`` / ``build_tar`` write tars with Python's ``tarfile`` header encoder, one entry at a
  time so that PAX and GNU headers can be mixed inside one archive.
* ``layer_trees`` is a hypothesis strategy for whole input layers.
* ``file_tree`` reduces any tar (input, ``write_tar`` output or a decompressed blob) to the
  comparable tree of files.
* ``extract_toc_json``, ``decompress_blob``, ``member_starts`` and ``read_payload`` parse the
  converted blobs byte by byte (footers, gzip members, zstd frames) without the engine.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import io
import json
import math
import posixpath
import random
import re
import struct
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import zstandard
from hypothesis import strategies as st

PAX = tarfile.PAX_FORMAT
GNU = tarfile.GNU_FORMAT

BLOCK = 512
RECORD = 10240

LANDMARK = ".prefetch.landmark"
NO_LANDMARK = ".no.prefetch.landmark"
TOC_NAME = "stargz.index.json"
SKIPPED_NAMES = frozenset({LANDMARK, NO_LANDMARK, TOC_NAME})
LANDMARK_DIGEST = "sha256:dc0e9c3658a1a3ed1ec94274d8b19925c93e1abb7ddba294923ad9bde30f8cb8"
EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
USIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
ZSTD_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"
ZSTD_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"

GZIP_FOOTER_SIZE = 51
EXTERNAL_FOOTER_SIZE = 46
ZSTD_FOOTER_SIZE = 48  # 8-byte skippable-frame header + 40-byte payload
ZSTD_SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_FOOTER_MAGIC = b"GnUlInUx"

TYPE_NAMES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.DIRTYPE: "dir",
    tarfile.FIFOTYPE: "fifo",
}


def json_text(name: str) -> str:
    """A tar name (decoded with surrogateescape) as it reads back from the TOC JSON: Go
    replaces each invalid UTF-8 byte with U+FFFD."""
    raw = name.encode("utf-8", "surrogateescape")
    out, i = [], 0
    while i < len(raw):
        for n in (4, 3, 2, 1):
            try:
                out.append(raw[i : i + n].decode("utf-8"))
                i += n
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append("\ufffd")
            i += 1
    return "".join(out)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + sha256_hex(data)


def clean_name(name: str) -> str:
    """The layer's notion of a path: Go ``path.Clean("/"+name)`` without the leading slash."""
    return posixpath.normpath("/" + name).lstrip("/")


# ---------------------------------------------------------------------------------------------
# Writing tars


@dataclass
class Entry:
    """One tar entry as the test wants it written."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: int | float = 1_600_000_000
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)
    fmt: int = PAX

    @property
    def clean(self) -> str:
        return clean_name(self.name)

    def tarinfo(self) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(self.name)
        ti.type = self.type
        ti.size = len(self.data) if self.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
        ti.mode = self.mode
        ti.uid, ti.gid = self.uid, self.gid
        ti.uname, ti.gname = self.uname, self.gname
        ti.mtime = self.mtime
        ti.linkname = self.linkname
        ti.devmajor, ti.devminor = self.devmajor, self.devminor
        if self.xattrs:
            ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in self.xattrs.items()}
        return ti

    def header(self) -> bytes:
        return self.tarinfo().tobuf(self.fmt, "utf-8", "surrogateescape")

    def encode(self) -> bytes:
        out = self.header()
        if self.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and self.data:
            out += self.data + pad(len(self.data))
        return out


def pad(n: int) -> bytes:
    return b"\0" * (-n % BLOCK)


def build_tar(entries: Iterable[Entry], *, eof: bool = True, record_pad: bool = False) -> bytes:
    """Serialize entries as one tar stream (each entry keeps its own header format)."""
    out = bytearray()
    for e in entries:
        out += e.encode()
    if eof:
        out += b"\0" * (2 * BLOCK)
        if record_pad:
            out += b"\0" * (-len(out) % RECORD)
    return bytes(out)


def reg(name: str, data: bytes = b"", **kw: Any) -> Entry:
    return Entry(name, tarfile.REGTYPE, data, **kw)


def dir_(name: str, **kw: Any) -> Entry:
    kw.setdefault("mode", 0o755)
    return Entry(name, tarfile.DIRTYPE, **kw)


def symlink(name: str, target: str, **kw: Any) -> Entry:
    kw.setdefault("mode", 0o777)
    return Entry(name, tarfile.SYMTYPE, linkname=target, **kw)


def hardlink(name: str, target: str, **kw: Any) -> Entry:
    return Entry(name, tarfile.LNKTYPE, linkname=target, **kw)


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


def zstd_bytes(data: bytes, level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(data)


def content(kind: str, size: int, seed: int) -> bytes:
    """Deterministic file content of a given size: random, zeros or compressible text."""
    if kind == "random":
        return random.Random(seed).randbytes(size)
    if kind == "zeros":
        return b"\0" * size
    words = b"lorem ipsum dolor sit amet %d consectetur adipiscing elit\n" % seed
    return (words * (size // len(words) + 1))[:size]


def sample_entries(chunk_size: int = 1024) -> list[Entry]:
    """A fixed layer that exercises every entry type and header feature at least once."""
    cs = chunk_size
    return [
        dir_("./"),
        dir_("./bin/", uid=0, gid=0, mtime=0),
        reg("./bin/sh", content("random", 3 * cs - 72, 1), mode=0o4755, uname="root", gname="root"),
        hardlink("./bin/bash", "./bin/sh"),
        symlink("./bin/rbash", "bash"),
        dir_("etc/", mode=0o1777, uid=1000, gid=1000, uname="alice", gname="staff"),
        reg("etc/empty", b"", mtime=1_600_000_000.25),
        reg("etc/exact", content("text", cs, 2), uid=1000, gid=1000, uname="alice", gname="staff"),
        reg("etc/double", content("zeros", 2 * cs, 3)),
        reg("etc/small", b"hello\n", xattrs={"user.z": "last", "user.a": "bar"}),
        symlink("etc/abs", "/usr/share/zoneinfo/UTC"),
        Entry("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        Entry("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=1048575),
        Entry("run/fifo", tarfile.FIFOTYPE, mode=0o600),
        reg(
            "opt/" + "long-directory-name/" * 6 + "ünïcødé-файл.txt",
            b"long name\n",
            fmt=GNU,
            uid=3_000_000,
            gid=3_000_001,
            uname="jörg",
            gname="grüppe",
        ),
        reg("opt/" + "x" * 120 + "/pax-long", content("text", 700, 4), mtime=0),
        symlink("opt/longlink", "/" + "t" * 150, fmt=GNU),
        reg("/abs/file", b"absolute names are normalized\n", mode=0o2750),
    ]


# ---------------------------------------------------------------------------------------------
# Hypothesis strategies

_ALPHABET = 'abcxyz019_-.~ éü日本\t\n\\"\x01<&\u2028'
_component = st.text(_ALPHABET, min_size=0, max_size=8)
_long_component = st.text(_ALPHABET, min_size=101, max_size=140).filter(
    lambda s: s.strip(".") != ""
)
_unames = st.sampled_from(["", "root", "alice", "bob", "jörg", "nobody"])
_xattr_keys = st.sampled_from(["user.a", "user.mime_type", "user.zz", "trusted.t", "security.s"])
_xattr_values = st.text("abc=\n é<>&", min_size=0, max_size=12)


@st.composite
def _ids(draw: st.DrawFn) -> tuple[int, int, str, str]:
    small = st.sampled_from([0, 0, 1, 1000, 65534, 4294967294])
    uid = draw(st.one_of(small, st.integers(0, 3_000_000)))
    gid = draw(st.one_of(small, st.integers(0, 3_000_000)))
    return uid, gid, draw(_unames), draw(_unames)


def sizes(chunk_size: int) -> st.SearchStrategy[int]:
    cs = chunk_size
    edges = [0, 1, cs - 1, cs, cs + 1, 2 * cs, 3 * cs + 7]
    return st.one_of(st.sampled_from(edges), st.integers(0, 4 * cs))


@st.composite
def layer_trees(draw: st.DrawFn, chunk_size: int = 1024, max_entries: int = 14) -> list[Entry]:
    """A list of tar entries forming a plausible layer.

    Covers every supported type, PAX and GNU headers (mixed per entry), names with './' and
    '/' prefixes, long and non-ASCII names, directories that exist only implicitly (no entry of
    their own), hardlinks to earlier files, duplicates of earlier files, xattrs, big ids and
    sub-second mtimes.
    """
    archive_fmt = draw(st.sampled_from(["pax", "gnu", "mixed"]))
    entries: list[Entry] = []
    dirs = [""]  # clean dir paths usable as parents
    files: dict[str, int] = {}  # clean name of a regular file -> index of its latest entry
    linked: set[str] = set()  # files some hardlink points at (never duplicated afterwards)

    def fmt() -> int:
        if archive_fmt == "pax":
            return PAX
        if archive_fmt == "gnu":
            return GNU
        return draw(st.sampled_from([PAX, GNU]))

    def raw(clean: str, is_dir: bool = False) -> str:
        prefix = draw(st.sampled_from(["", "", "./", "/"]))
        return prefix + clean + ("/" if is_dir else "")

    def meta(f: int) -> dict[str, Any]:
        uid, gid, uname, gname = draw(_ids())
        mtime: int | float = draw(
            st.one_of(
                st.sampled_from([0, 1_600_000_000]),
                st.integers(0, 2**33 - 1),
                st.integers(-(2**31), 2**35),  # before 1970 / after 2242: base-256 or PAX
            )
        )
        xattrs: dict[str, str] = {}
        if f == PAX:
            if mtime > 0 and draw(st.booleans()):
                mtime = mtime + draw(st.sampled_from([0.25, 0.75, 0.125]))
            xattrs = draw(st.dictionaries(_xattr_keys, _xattr_values, max_size=2))
        return dict(
            mode=draw(st.integers(0, 0o7777)),
            uid=uid,
            gid=gid,
            uname=uname,
            gname=gname,
            mtime=mtime,
            xattrs=xattrs,
            fmt=f,
        )

    if draw(st.booleans()):
        entries.append(dir_("./", **meta(fmt())))

    n = draw(st.integers(0, max_entries))
    for i in range(n):
        kind = draw(
            st.sampled_from(
                [
                    "reg",
                    "reg",
                    "reg",
                    "dir",
                    "implicit_dir",
                    "symlink",
                    "hardlink",
                    "dup",
                    "char",
                    "block",
                    "fifo",
                ]
            )
        )
        parent = draw(st.sampled_from(dirs))
        comp = draw(st.one_of(_component, _long_component)) if i % 4 == 3 else draw(_component)
        base = f"{kind[0]}{i}-{comp}"  # the index keeps names unique
        clean = f"{parent}/{base}" if parent else base
        f = fmt()

        if kind == "implicit_dir":
            dirs.append(clean)
            continue
        if kind == "dir":
            dirs.append(clean)
            entries.append(dir_(raw(clean, is_dir=True), **meta(f)))
            continue
        if kind in ("hardlink", "dup") and not files:
            kind = "reg"
        if kind == "dup":
            candidates = sorted(set(files) - linked)
            if not candidates:
                kind = "reg"
            else:
                old = entries[files[draw(st.sampled_from(candidates))]]
                size = draw(sizes(chunk_size))
                data = content(draw(st.sampled_from(["random", "text"])), size, i)
                entries.append(replace(old, name=raw(old.clean), data=data, **meta(f)))
                files[old.clean] = len(entries) - 1
                continue
        if kind == "reg":
            size = draw(sizes(chunk_size))
            data = content(draw(st.sampled_from(["random", "zeros", "text"])), size, i)
            files[clean] = len(entries)
            entries.append(reg(raw(clean), data, **meta(f)))
        elif kind == "hardlink":
            target = entries[files[draw(st.sampled_from(sorted(files)))]]
            linked.add(target.clean)
            entries.append(hardlink(raw(clean), target.name, **meta(f)))
        elif kind == "symlink":
            target = draw(
                st.one_of(
                    st.sampled_from(["/usr/bin/env", "../up", "./same", "rel/x", "/" + "L" * 150]),
                    st.text(_ALPHABET, min_size=1, max_size=20),
                )
            )
            entries.append(symlink(raw(clean), target, **meta(f)))
        elif kind in ("char", "block"):
            t = tarfile.CHRTYPE if kind == "char" else tarfile.BLKTYPE
            entries.append(
                Entry(
                    raw(clean),
                    t,
                    devmajor=draw(st.integers(0, 4095)),
                    devminor=draw(st.integers(0, 1_048_575)),
                    **meta(f),
                )
            )
        else:
            entries.append(Entry(raw(clean), tarfile.FIFOTYPE, **meta(f)))
    return entries


# ---------------------------------------------------------------------------------------------
# Reading tars back


@dataclass(frozen=True)
class Node:
    type: str
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    mtime: int
    xattrs: tuple[tuple[str, str], ...]
    linkname: str
    dev: tuple[int, int] | None
    sha256: str | None


def _open_tar(src: str | Path | bytes | BinaryIO) -> tarfile.TarFile:
    if isinstance(src, bytes | bytearray | memoryview):
        src = io.BytesIO(bytes(src))
    if isinstance(src, str | Path):
        return tarfile.open(src, mode="r:")
    return tarfile.open(fileobj=src, mode="r:")


def tar_members(src: str | Path | bytes | BinaryIO) -> list[tuple[tarfile.TarInfo, bytes]]:
    """All members with their data, in stream order (nothing skipped)."""
    out = []
    with _open_tar(src) as tf:
        for ti in tf:
            data = b""
            if ti.isreg():
                fh = tf.extractfile(ti)
                assert fh is not None
                data = fh.read()
                assert len(data) == ti.size, f"{ti.name}: short data"
            out.append((ti, data))
    return out


def file_tree(src: str | Path | bytes | BinaryIO) -> dict[str, Node]:
    """The comparable tree of a tar: clean name -> Node. Later duplicates win.

    Landmarks and ``stargz.index.json`` are skipped. ``mtime`` is whole seconds (truncated),
    hardlink targets are cleaned like names; symlink targets are kept raw.
    """
    tree: dict[str, Node] = {}
    for ti, data in tar_members(src):
        name = clean_name(ti.name)
        if name in SKIPPED_NAMES:
            continue
        kind = TYPE_NAMES.get(ti.type)
        assert kind is not None, f"{ti.name}: unexpected tar type {ti.type!r}"
        xattrs = tuple(
            sorted(
                (k[len("SCHILY.xattr.") :], v)
                for k, v in ti.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            )
        )
        link = ti.linkname
        if kind == "hardlink":
            link = clean_name(link)
        tree[name] = Node(
            type=kind,
            mode=ti.mode & 0o7777,
            uid=ti.uid,
            gid=ti.gid,
            uname=ti.uname,
            gname=ti.gname,
            mtime=int(ti.mtime),
            xattrs=xattrs,
            linkname=link,
            dev=(ti.devmajor, ti.devminor) if kind in ("char", "block") else None,
            sha256=sha256_hex(data) if kind == "reg" else None,
        )
    return tree


def tree_of_entries(entries: Iterable[Entry]) -> dict[str, Node]:
    return file_tree(build_tar(entries))


def expected_toc_names(entries: Iterable[Entry]) -> list[str]:
    """Clean names of the input after de-duplication (later wins, at its later position)."""
    order: dict[str, None] = {}
    for e in entries:
        c = e.clean
        if c in SKIPPED_NAMES:
            continue
        order.pop(c, None)
        order[c] = None
    return list(order)


# ---------------------------------------------------------------------------------------------
# Reading converted blobs without the engine


def fmt_value(fmt: Any) -> str:
    return getattr(fmt, "value", fmt)


def is_zstd(fmt: Any) -> bool:
    return fmt_value(fmt) == "zstdchunked"


def is_external(fmt: Any) -> bool:
    return fmt_value(fmt) == "estargz-external-toc"


def _gunzip_one_member(data: bytes | memoryview) -> tuple[bytes, int]:
    d = zlib.decompressobj(31)
    out = d.decompress(data)
    assert d.eof, "gzip member is not terminated"
    return out, len(data) - len(d.unused_data)


def _toc_json_from_tar(tar_bytes: bytes) -> bytes:
    hdr = tar_bytes[:BLOCK]
    name = hdr[:100].rstrip(b"\0")
    assert name == TOC_NAME.encode(), f"first TOC tar entry is {name!r}"
    size = int(hdr[124:136].rstrip(b"\0 ") or b"0", 8)
    return tar_bytes[BLOCK : BLOCK + size]


def gzip_footer_toc_offset(blob: bytes) -> int:
    footer = blob[-GZIP_FOOTER_SIZE:]
    return int(footer[16:32], 16)


def zstd_footer(blob: bytes) -> tuple[int, int, int, int]:
    """(tocOff, compressed length, uncompressed length, manifest type) of a zstd:chunked blob."""
    payload = blob[-40:]
    assert payload[32:] == ZSTD_FOOTER_MAGIC
    return struct.unpack("<QQQQ", payload[:32])


def extract_toc_json(blob: bytes, fmt: Any, toc_blob: bytes | None = None) -> bytes:
    """The exact TOC JSON bytes stored in (or next to) a converted blob."""
    if is_external(fmt):
        assert toc_blob is not None, "external-TOC layer without a TOC blob"
        tar_bytes, used = _gunzip_one_member(toc_blob)
        assert used == len(toc_blob), "external TOC blob is more than one gzip member"
        return _toc_json_from_tar(tar_bytes)
    if is_zstd(fmt):
        off, clen, ulen, _ = zstd_footer(blob)
        data = zstandard.ZstdDecompressor().decompress(blob[off : off + clen], max_output_size=ulen)
        assert len(data) == ulen
        return data
    off = gzip_footer_toc_offset(blob)
    tar_bytes, used = _gunzip_one_member(memoryview(blob)[off:])
    assert off + used == len(blob) - GZIP_FOOTER_SIZE, "TOC member does not end at the footer"
    return _toc_json_from_tar(tar_bytes)


def toc_entries(toc_json: bytes) -> list[dict[str, Any]]:
    doc = json.loads(toc_json)
    assert doc["version"] == 1
    return doc["entries"]


def decompress_blob(blob: bytes, fmt: Any) -> bytes:
    """The whole blob decompressed: multi-member gzip, or zstd across frames."""
    if is_zstd(fmt):
        r = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True)
        return r.read()
    return gzip.decompress(blob)


def member_starts(blob: bytes, fmt: Any) -> list[int]:
    """Start offsets of every gzip member / zstd frame of the payload (before TOC/footer)."""
    mv = memoryview(blob)
    if is_zstd(fmt):
        end = zstd_footer(blob)[0] - 8
    elif is_external(fmt):
        end = len(blob) - EXTERNAL_FOOTER_SIZE
    else:
        end = gzip_footer_toc_offset(blob)
    starts, pos = [], 0
    while pos < end:
        starts.append(pos)
        if is_zstd(fmt):
            assert bytes(mv[pos : pos + 4]) == ZSTD_MAGIC, f"no zstd frame at {pos}"
            d = zstandard.ZstdDecompressor().decompressobj()
            d.decompress(mv[pos:end])
            pos = end - len(d.unused_data)
        else:
            pos += _gunzip_one_member(mv[pos:end])[1]
    assert pos == end
    return starts


def read_payload(blob: bytes, fmt: Any, offset: int, inner: int, length: int) -> bytes:
    """``length`` decompressed bytes starting ``inner`` bytes into the member at ``offset``."""
    need = inner + length
    if is_zstd(fmt):
        r = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(blob[offset:]), read_across_frames=True
        )
        out = b""
        while len(out) < need:
            chunk = r.read(need - len(out))
            if not chunk:
                break
            out += chunk
        return out[inner:need]
    mv = memoryview(blob)
    out, pos = b"", offset
    while len(out) < need and pos < len(blob):
        data, used = _gunzip_one_member(mv[pos:])
        out += data
        pos += used
    return out[inner:need]


def gzip_member_headers(blob: bytes, starts: Iterable[int]) -> set[bytes]:
    return {blob[s : s + 10] for s in starts}


# ---------------------------------------------------------------------------------------------
# Hand-made broken tars


def _octal(n: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, n)


def raw_header(
    name: bytes,
    typeflag: bytes,
    size: int,
    *,
    gnu: bool = False,
    extra: dict[int, bytes] | None = None,
) -> bytes:
    """One 512-byte header built field by field (for headers tarfile refuses to write)."""
    h = bytearray(BLOCK)

    def put(off: int, val: bytes) -> None:
        h[off : off + len(val)] = val

    put(0, name[:100])
    put(100, _octal(0o644, 8))
    put(108, _octal(0, 8))
    put(116, _octal(0, 8))
    put(124, _octal(size, 12))
    put(136, _octal(1_600_000_000, 12))
    put(148, b" " * 8)
    put(156, typeflag)
    put(257, b"ustar  \0" if gnu else b"ustar\x0000")
    for off, val in (extra or {}).items():
        put(off, val)
    put(148, b"%06o\0 " % sum(h))
    return bytes(h)


def gnu_sparse_tar() -> bytes:
    """A normal file followed by a GNU sparse file (typeflag 'S', one 512-byte data region)."""
    sparse_map = _octal(0, 12) + _octal(BLOCK, 12)  # region at offset 0, 512 bytes
    hdr = raw_header(
        b"sparse.img",
        b"S",
        BLOCK,
        gnu=True,
        extra={386: sparse_map, 482: b"\0", 483: _octal(1 << 20, 12)},
    )
    return build_tar([reg("before", b"ok\n")], eof=False) + hdr + b"s" * BLOCK + b"\0" * 1024


def go_marshal_indent(doc: Any) -> bytes:
    """What Go's ``json.MarshalIndent(doc, "", "\\t")`` emits (HTML-safe escaping)."""
    text = json.dumps(doc, indent="\t", separators=(",", ": "), ensure_ascii=False)
    text = (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )
    return text.encode()


RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


# ---------------------------------------------------------------------------------------------
# Ordering model (spec §1.2, with our product's tolerance of missing paths)


def expected_order(
    entries: Iterable[Entry], prioritized: Iterable[str]
) -> tuple[list[str], list[str]]:
    """(clean names in layer order incl. the landmark, prioritized paths that were missing).

    Each prioritized path moves after its existing ancestors (top-down; ancestors without a tar
    entry are skipped, never synthesized) and, for a hardlink, after its target (and the
    target's ancestors). Then the landmark (`.no.prefetch.landmark` first if nothing moved),
    then the rest in de-duplicated input order.
    """
    entries = list(entries)
    prioritized = list(prioritized)
    index = {e.clean: e for e in entries if e.clean not in SKIPPED_NAMES}
    rest = expected_toc_names(entries)
    out: list[str] = []
    picked: set[str] = set()
    missing: list[str] = []

    def ancestors(name: str) -> list[str]:
        chain = []
        while name:
            name = posixpath.dirname(name)
            chain.append(name)
        return chain[::-1]

    def move(name: str) -> None:
        if name in picked or name not in index:
            return
        for a in ancestors(name):
            move(a)
        e = index[name]
        if e.type == tarfile.LNKTYPE:
            move(clean_name(e.linkname))
        if name not in picked:
            picked.add(name)
            out.append(name)

    for p in prioritized:
        c = clean_name(p)
        if c not in index:
            missing.append(p)
            continue
        move(c)
    out.append(LANDMARK if out else NO_LANDMARK)
    out.extend(n for n in rest if n not in picked)
    return out, missing


# ---------------------------------------------------------------------------------------------
# Running the engine


@dataclass
class Converted:
    result: Any
    blob: bytes
    toc_json: bytes
    path: Path

    @property
    def entries(self) -> list[dict[str, Any]]:
        return toc_entries(self.toc_json)

    def main_entries(self) -> list[dict[str, Any]]:
        """TOC entries without the `chunk` continuation entries."""
        return [e for e in self.entries if e["type"] != "chunk"]


def write_source(path: Path, tar_bytes: bytes, compression: str = "tar") -> Path:
    if compression == "gz":
        tar_bytes = gzip_bytes(tar_bytes)
    elif compression == "zst":
        tar_bytes = zstd_bytes(tar_bytes)
    else:
        assert compression == "tar"
    path.write_bytes(tar_bytes)
    return path


def convert(
    workdir: Path,
    src: list[Entry] | bytes,
    fmt: Any,
    *,
    compression: str = "tar",
    name: str = "layer",
    **opts: Any,
) -> Converted:
    """Write ``src`` (entries or raw tar bytes) into ``workdir`` and convert it with the engine."""
    from estargz_opt.format import LayerOptions, convert_layer

    tar_bytes = src if isinstance(src, bytes) else build_tar(src)
    srcp = write_source(workdir / f"{name}.src", tar_bytes, compression)
    out = workdir / f"{name}.out"
    result = convert_layer(srcp, out, LayerOptions(format=fmt, **opts))
    blob = out.read_bytes()
    return Converted(result, blob, extract_toc_json(blob, fmt, result.toc_blob), out)


def go_modtime(mtime: float) -> str | None:
    """The TOC modtime Go writes: omitted when Unix() is 0, else rounded to the second."""
    if int(mtime) == 0:
        return None
    t = datetime.datetime.fromtimestamp(math.floor(mtime + 0.5), datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def check_toc_metadata(toc: list[dict[str, Any]], entries: Iterable[Entry]) -> None:
    """Each TOC entry describes its (surviving) input entry exactly: the snapshotter builds
    the filesystem from the TOC alone, so wrong metadata there is wrong files for users."""
    latest = {json_text(e.clean): e for e in entries if e.clean not in SKIPPED_NAMES}
    for te in toc:
        if te["type"] == "chunk":
            continue
        if te["type"] == "reg":
            assert "digest" in te, te
        name = clean_name(te["name"])
        if name in (LANDMARK, NO_LANDMARK):
            continue
        src = latest[name]
        where = f"TOC entry {te['name']!r}"
        # raw header name; only a leading "/" may be normalized away ("/" becomes "./")
        assert (te["name"].lstrip("/") or "./") == (json_text(src.name).lstrip("/") or "./")
        assert te["type"] == TYPE_NAMES[src.type], where
        assert te.get("mode", 0) == src.mode, where
        assert (te.get("uid", 0), te.get("gid", 0)) == (src.uid, src.gid), where
        assert te.get("modtime") == go_modtime(src.mtime), where
        assert te.get("size", 0) == (len(src.data) if te["type"] == "reg" else 0), where
        if te["type"] == "hardlink":
            assert clean_name(te["linkName"]) == clean_name(json_text(src.linkname)), where
        else:
            assert te.get("linkName", "") == json_text(src.linkname), where
        assert (te.get("devMajor", 0), te.get("devMinor", 0)) == (src.devmajor, src.devminor)
        got_x = {k: base64.b64decode(v) for k, v in te.get("xattrs", {}).items()}
        assert got_x == {k: v.encode() for k, v in src.xattrs.items()}, where


def check_layer(
    conv: Converted, fmt: Any, entries: list[Entry], prioritized: Iterable[str] = ()
) -> None:
    """Every invariant a converted layer must satisfy, whatever its format."""
    from estargz_opt.format import open_layer

    res, blob = conv.result, conv.blob
    want_tree = tree_of_entries(entries)

    # descriptor facts
    assert res.digest == sha256_digest(blob)
    assert res.size == len(blob)
    assert res.toc_digest == sha256_digest(conv.toc_json)
    assert res.annotations[TOC_DIGEST_ANNOTATION] == res.toc_digest
    stream = decompress_blob(blob, fmt)
    assert res.diff_id == sha256_digest(stream)
    assert res.uncompressed_size == len(stream)
    assert res.annotations[USIZE_ANNOTATION] == str(len(stream))
    if is_external(fmt):
        assert res.toc_blob is not None
    else:
        assert res.toc_blob is None

    # the decompressed blob is itself the layer tar (TOC entry last for in-blob gzip TOC)
    assert file_tree(stream) == want_tree
    names_in_stream = [ti.name for ti, _ in tar_members(stream)]
    if is_zstd(fmt) or is_external(fmt):
        assert TOC_NAME not in names_in_stream
    else:
        assert names_in_stream[-1] == TOC_NAME
        assert names_in_stream.count(TOC_NAME) == 1
        assert stream.endswith(b"\0" * 1024)

    # TOC: one entry per (de-duplicated) input entry plus the landmark, in the spec's order
    toc = conv.entries
    main = conv.main_entries()
    order, missing = expected_order(entries, prioritized)
    assert [clean_name(e["name"]) for e in main] == [json_text(n) for n in order]
    assert list(res.missing_prioritized) == missing
    assert [clean_name(ti.name) for ti, _ in tar_members(stream) if ti.name != TOC_NAME] == order

    check_toc_metadata(conv.entries, entries)
    if b"\\ufffd" not in conv.toc_json:  # (Go's invalid-UTF-8 escape has no parsed form)
        assert conv.toc_json == go_marshal_indent(json.loads(conv.toc_json))

    # every payload byte is where the TOC says, with the digests it claims
    starts = set(member_starts(blob, fmt))
    current: dict | None = None
    for e in toc:
        if e["type"] == "reg":
            current = e
            node = want_tree.get(clean_name(e["name"]))
            if node is not None:
                assert e["digest"] == "sha256:" + node.sha256
            size = e.get("size", 0)
        elif e["type"] == "chunk":
            assert current is not None and e["name"] == current["name"]
            size = current["size"]
        else:
            assert "chunkDigest" not in e
            continue
        if size == 0:
            assert "offset" not in e and "chunkDigest" not in e
            continue
        off, inner = e.get("offset", 0), e.get("innerOffset", 0)
        assert off in starts, f"{e['name']}: offset {off} is not a member/frame start"
        coff = e.get("chunkOffset", 0)
        clen = e.get("chunkSize") or size - coff
        data = read_payload(blob, fmt, off, inner, clen)
        assert e["chunkDigest"] == sha256_digest(data), f"{e['name']}@{coff}"

    # the engine's reader agrees
    with open_layer(conv.path, toc_digest=res.toc_digest, external_toc=res.toc_blob) as layer:
        assert layer.toc.version == 1
        assert [e.name for e in layer.toc.entries] == [e["name"] for e in toc]
        assert [e.type for e in layer.toc.entries] == [e["type"] for e in toc]
        layer.verify()
        buf = io.BytesIO()
        layer.write_tar(buf)
    out = buf.getvalue()
    assert len(out) % 512 == 0 and out.endswith(b"\0" * 1024), "write_tar lacks EOF blocks"
    assert file_tree(out) == want_tree
