"""Tar payloads at the byte level, for comparing re-encoded layers byte for byte.

Independent of estargz_opt's own tar code: a payload is cut into entries (each entry's
PAX/GNU long-name headers, its header, content and padding), and PAX extended headers
are parsed strictly (a record's length must be exact).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BLOCK = 512
SET_ASIDE = frozenset({"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"})
_META = frozenset(b"xgLK")
_HEADER_ONLY = frozenset(b"123456")
RETAR_SOURCE = Path(__file__).resolve().parents[1] / "go" / "retar"
TAR_SPLIT_GOPATH = Path("/usr/share/gocode")  # Debian's golang-github-vbatts-tar-split-dev


@dataclass(frozen=True)
class RawEntry:
    name: str  # from the main header's name field (enough to recognise the set-aside ones)
    raw: bytes  # every byte of the entry: meta headers, header, content, padding


def _number(field: bytes) -> int:
    if field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.strip(b" \0")
    return int(text, 8) if text else 0


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def split_entries(payload: bytes) -> list[RawEntry]:
    """The payload's entries in order, up to the first zero block or the end."""
    out: list[RawEntry] = []
    pos = start = 0
    while pos + BLOCK <= len(payload):
        blk = payload[pos : pos + BLOCK]
        if blk == bytes(BLOCK):
            break
        flag, size = blk[156], _number(blk[124:136])
        pos += BLOCK
        if flag in _META:
            pos += _padded(size)
            continue
        if flag not in _HEADER_ONLY:
            pos += _padded(size)
        name = blk[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        out.append(RawEntry(name, payload[start:pos]))
        start = pos
    assert pos <= len(payload), "payload ends inside an entry"
    return out


def kept_entries(payload: bytes) -> list[RawEntry]:
    """The entries with the TOC and the landmarks set aside."""
    return [e for e in split_entries(payload) if e.name not in SET_ASIDE]


def pax_records(payload: bytes) -> list[tuple[int, bytes, bytes]]:
    """(record length, key, value) of every PAX record, each length checked exactly."""
    records = []
    pos = 0
    while pos + BLOCK <= len(payload):
        blk = payload[pos : pos + BLOCK]
        if blk == bytes(BLOCK):
            break
        flag, size = blk[156], _number(blk[124:136])
        pos += BLOCK
        if flag == ord("x"):
            data = payload[pos : pos + size]
            at = 0
            while at < len(data):
                space = data.index(b" ", at)
                length = int(data[at:space])
                record = data[at : at + length]
                assert record.endswith(b"\n") and len(record) == length, (
                    f"PAX record at {pos + at} claims {length} bytes: {record[:60]!r}"
                )
                key, _, value = record[space - at + 1 : -1].partition(b"=")
                records.append((length, key, value))
                at += length
        if flag in _META or flag not in _HEADER_ONLY:
            pos += _padded(size)
    return records


def build_retar(out_dir: Path) -> Path | None:
    """Build tests/go/retar (Go's archive/tar, then tar-split's fork, as upstream's Build
    re-encodes headers); None when Go or Debian's tar-split source is missing."""
    go = shutil.which("go")
    if go is None or not (TAR_SPLIT_GOPATH / "src/github.com/vbatts/tar-split").is_dir():
        return None
    binary = out_dir / "retar"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(TAR_SPLIT_GOPATH),
           "GOCACHE": str(out_dir / "gocache"), "GOFLAGS": ""}
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=RETAR_SOURCE, env=env,
                   check=True, capture_output=True, timeout=300)
    return binary


def try_retar(binary: Path, tar_bytes: bytes) -> bytes | None:
    """What Go's reader and writer (twice) make of tar_bytes, without EOF blocks; None
    when Go's archive/tar refuses it."""
    res = subprocess.run([str(binary)], input=tar_bytes, capture_output=True, timeout=300)
    return res.stdout if res.returncode == 0 else None


def retar(binary: Path, tar_bytes: bytes) -> bytes:
    out = try_retar(binary, tar_bytes)
    assert out is not None, "Go's archive/tar refused it"
    return out
