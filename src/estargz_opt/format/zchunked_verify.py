"""Reading and checking a containers-flavour zstd:chunked blob the way c/storage will.

c/storage falls back to a full pull (silently, to a user) when the annotations do not
describe the blob, the TOC is over 150 MiB, the tar-split's headers disagree with the
TOC, or the tar the tar-split rebuilds does not have the config's DiffID. Each of those
is an error here, with the reason; so are TOC offsets or digests that do not match the
frames they point at (c/storage would fail the pull on them).
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from estargz_opt.constants import MAX_TOC_SIZE
from estargz_opt.digest import digest_of, hasher, sha256_digest
from estargz_opt.errors import BadInputError, EstargzOptError
from estargz_opt.format import tarfmt, zchunked
from estargz_opt.format.codec import PIECE, decode_all
from estargz_opt.format.zstdchunked import SOURCE_WINDOW_LOG_MAX, ZstdStream, _decoder
from estargz_opt.jsonlimits import loads_object

STARGZ_TOC_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
MAX_TARSPLIT_SIZE = 1 << 30  # a bound on the decoded tar-split we hold in memory
_FRAME_HEADER = zchunked.SKIPPABLE_HEADER.size


def is_containers_path(path: str | os.PathLike[str]) -> bool:
    """Whether the blob ends with c/storage's footer magic (the stargz flavour's differs)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return size >= zchunked.FOOTER_SIZE and (
                os.pread(f.fileno(), 8, size - 8) == zchunked.FOOTER_MAGIC
            )
    except OSError:
        return False


@dataclass(slots=True)
class ContainersLayer:
    """The parsed tail of a blob: footer, TOC (raw and decoded) and tar-split records."""

    size: int
    footer: zchunked.FooterData
    toc_raw: bytes
    toc: dict[str, Any]
    tarsplit_raw: bytes
    tarsplit: list[dict[str, Any]]

    @property
    def entries(self) -> list[dict[str, Any]]:
        return list(self.toc["entries"])


def _frame(fd: int, offset: int, length: int, size: int, what: str) -> bytes:
    """The payload of the skippable frame whose payload starts at offset."""
    if offset < _FRAME_HEADER or offset + length > size:
        raise BadInputError(f"{what} position {offset}:{length} lies outside the blob")
    head = os.pread(fd, _FRAME_HEADER, offset - _FRAME_HEADER)
    magic, n = zchunked.SKIPPABLE_HEADER.unpack(head)
    if magic != zchunked.SKIPPABLE_MAGIC or n != length:
        raise BadInputError(f"{what} at {offset} is not in a skippable frame of {length} bytes")
    return os.pread(fd, length, offset)


def _unzstd(raw: bytes, limit: int, what: str) -> bytes:
    d = _decoder(SOURCE_WINDOW_LOG_MAX)
    try:
        out = d.decompress(raw, max_length=limit + 1)
    except Exception as exc:
        raise BadInputError(f"corrupt zstd {what} ({exc})") from None
    if len(out) > limit or not d.eof:
        raise BadInputError(f"the {what} does not decode to its stated {limit} bytes")
    return out


def open_containers_layer(f: BinaryIO) -> ContainersLayer:
    fd = f.fileno()
    size = os.fstat(fd).st_size
    footer = zchunked.FooterData.parse(os.pread(fd, zchunked.FOOTER_SIZE, size - 64))
    _frame(fd, size - zchunked.FOOTER_SIZE, zchunked.FOOTER_SIZE, size, "footer")
    if footer.manifest_type != zchunked.MANIFEST_TYPE_CRFS:
        raise BadInputError(f"manifest type {footer.manifest_type} is not 1 (CRFS)")
    for n, what in ((footer.toc_size, "compressed"), (footer.toc_plain_size, "uncompressed")):
        if n > MAX_TOC_SIZE:
            raise BadInputError(
                f"the TOC is {n} bytes {what}, over c/storage's {MAX_TOC_SIZE}-byte limit "
                "(podman would pull the layer whole)"
            )
    toc_raw = _frame(fd, footer.toc_offset, footer.toc_size, size, "TOC")
    toc = loads_object(_unzstd(toc_raw, footer.toc_plain_size, "TOC"), "zstd:chunked TOC")
    if toc.get("version") != 1 or not isinstance(toc.get("entries"), list):
        raise BadInputError("the TOC is not a version-1 TOC with entries")
    if footer.tarsplit_plain_size > MAX_TARSPLIT_SIZE:
        raise BadInputError(f"the tar-split is over {MAX_TARSPLIT_SIZE} bytes")
    ts_raw = _frame(fd, footer.tarsplit_offset, footer.tarsplit_size, size, "tar-split")
    want = toc.get("tarSplitDigest")
    if want != sha256_digest(ts_raw):
        raise BadInputError(f"tar-split digest {sha256_digest(ts_raw)} != TOC's {want}")
    for e in toc["entries"]:
        if not (isinstance(e, dict) and isinstance(e.get("name"), str)):
            raise BadInputError(f"malformed TOC entry {str(e)[:80]!r}")
        for key in ("size", "offset", "endOffset", "chunkSize", "chunkOffset", "mode"):
            if not isinstance(e.get(key, 0), int):
                raise BadInputError(f"TOC entry {e['name']!r} has a non-integer {key}")
    lines = _unzstd(ts_raw, footer.tarsplit_plain_size, "tar-split").splitlines()
    records = [loads_object(line, "tar-split record") for line in lines if line.strip()]
    for i, rec in enumerate(records):
        if not (
            rec.get("type") in (1, 2)
            and isinstance(rec.get("payload") or "", str)
            and isinstance(rec.get("size", 0), int)
        ):
            raise BadInputError(f"malformed tar-split record {i}")
    return ContainersLayer(size, footer, toc_raw, toc, ts_raw, records)


@dataclass(slots=True)
class ContainersReport:
    entries: int = 0
    chunks: int = 0
    diff_id: str = ""
    uncompressed_size: int = 0
    errors: list[str] = field(default_factory=list)


def check_annotations(layer: ContainersLayer, ann: Mapping[str, str]) -> list[str]:
    """The annotations c/storage reads, against the blob's own bytes."""
    errors = []
    if ann.get(STARGZ_TOC_ANNOTATION):
        errors.append(
            f"both {STARGZ_TOC_ANNOTATION} and {zchunked.MANIFEST_CHECKSUM} are set: "
            "c/storage refuses such a layer"
        )
    expect = {
        zchunked.MANIFEST_CHECKSUM: sha256_digest(layer.toc_raw),
        zchunked.MANIFEST_POSITION: layer.footer.manifest_position(),
        zchunked.TARSPLIT_POSITION: layer.footer.tarsplit_position(),
    }
    for key, value in expect.items():
        if ann.get(key) != value:
            errors.append(f"annotation {key} {ann.get(key)!r} != the blob's {value}")
    return errors


def verify_containers_layer(
    path: str | os.PathLike[str], ann: Mapping[str, str] | None, diff_id: str | None
) -> ContainersReport:
    """Every check c/storage makes of a partial pull, and the frames the TOC points at."""
    report = ContainersReport()
    with open(path, "rb") as f:
        try:
            layer = open_containers_layer(f)
        except (EstargzOptError, ValueError) as exc:
            report.errors.append(f"unreadable containers zstd:chunked layer: {exc}")
            return report
        if ann is not None:
            report.errors.extend(check_annotations(layer, ann))
        entries = layer.entries
        report.entries = sum(1 for e in entries if e.get("type") != "chunk")
        report.chunks = sum(1 for e in entries if e.get("type") in ("reg", "chunk"))
        with tempfile.TemporaryFile() as tar:
            try:
                report.diff_id, report.uncompressed_size = _payload(f, layer, tar)
                if diff_id and report.diff_id != diff_id:
                    report.errors.append(
                        f"DiffID {report.diff_id} != the config's {diff_id}: "
                        "c/storage would refuse the partial pull"
                    )
                report.errors.extend(_tarsplit_vs_tar(layer, tar))
                report.errors.extend(_toc_vs_headers(layer, tar))
                report.errors.extend(_toc_vs_frames(f, layer))
            except (EstargzOptError, ValueError) as exc:
                report.errors.append(str(exc))
    return report


def _payload(f: BinaryIO, layer: ContainersLayer, out: BinaryIO) -> tuple[str, int]:
    """Decode the frames before the TOC into out; the DiffID and size of that tar."""
    end = layer.footer.toc_offset - _FRAME_HEADER
    diff = hasher()
    n = 0
    for piece in decode_all(ZstdStream(0, SOURCE_WINDOW_LOG_MAX), _read_range(f, 0, end)):
        diff.update(piece)
        out.write(piece)
        n += len(piece)
    out.flush()  # the checks read it by descriptor
    return digest_of(diff), n


def _read_range(f: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    while start < end:
        data = os.pread(f.fileno(), min(PIECE, end - start), start)
        if not data:
            raise BadInputError("the blob ends early")
        start += len(data)
        yield data


def _tarsplit_vs_tar(layer: ContainersLayer, tar: BinaryIO) -> list[str]:
    """Rebuild the tar from the tar-split (segments, then file contents by CRC) against the
    decoded payload: this is the tar whose digest c/storage compares with the DiffID."""
    fd = tar.fileno()
    size = os.fstat(fd).st_size
    pos = 0
    for i, rec in enumerate(layer.tarsplit):
        kind = rec.get("type")
        if kind == 2:
            raw = base64.b64decode(rec.get("payload") or "", validate=True)
            if os.pread(fd, len(raw), pos) != raw:
                return [f"tar-split record {i} (segment) differs from the tar at offset {pos}"]
            pos += len(raw)
        elif kind == 1:
            n = int(rec.get("size") or 0)
            crc: int | None = None
            for data in _read_range(tar, pos, pos + n):
                crc = zchunked.crc64(data, crc)
            want = base64.b64decode(rec["payload"]) if rec.get("payload") else None
            got = None if crc is None else crc.to_bytes(8, "big")
            if want != got and not (want == bytes(8) and got is None):
                return [f"tar-split CRC of {rec.get('name')!r} does not match its content"]
            pos += n
        else:
            return [f"tar-split record {i} has unknown type {kind!r}"]
    if pos != size:
        return [f"the tar-split rebuilds {pos} bytes of a {size}-byte tar"]
    return []


def _toc_vs_headers(layer: ContainersLayer, tar: BinaryIO) -> list[str]:
    """c/storage's ensureTOCMatchesTarSplit: every header has its TOC entry, field by field."""
    pending: dict[str, dict[str, Any]] = {}
    for ent in layer.entries:
        if ent.get("type") != "chunk":
            if ent.get("name") in pending:
                return [f"TOC has two entries for {ent.get('name')!r}"]
            pending[str(ent.get("name"))] = ent
    tar.seek(0)
    for hdr in tarfmt.iter_entries(tar, os.fstat(tar.fileno()).st_size):
        e: dict[str, Any] | None = pending.pop(hdr.name) if hdr.name in pending else None
        if e is None:
            return [f"tar-split has an entry for {hdr.name!r} missing in the TOC"]
        want = zchunked.header_metadata(hdr)
        for key in (*zchunked.HEADER_FIELDS, *want):
            if _norm(key, e.get(key)) != _norm(key, want.get(key)):
                return [
                    f"TOC and tar-split disagree on {key} of {hdr.name!r}: "
                    f"{e.get(key)!r} != {want.get(key)!r}"
                ]
    if pending:
        return [f"TOC has entries not in the tar-split: {sorted(pending)[:5]}"]
    return []


def _norm(key: str, value: Any) -> Any:
    if key in ("modtime", "accesstime", "changetime"):
        return None if value in (None, "", "1970-01-01T00:00:00Z") else value
    return value or None


def _toc_vs_frames(f: BinaryIO, layer: ContainersLayer) -> list[str]:
    """Each file's frames decode to its chunks and content, as the TOC's digests say."""
    entries = layer.entries
    end_of_payload = layer.footer.toc_offset - _FRAME_HEADER
    i = 0
    while i < len(entries):
        e = entries[i]
        group = [e]
        i += 1
        while i < len(entries) and entries[i].get("type") == "chunk":
            group.append(entries[i])
            i += 1
        if e.get("type") != "reg" or not e.get("size"):
            continue
        whole = hasher()
        got_size = 0
        end = int(e.get("endOffset") or 0)
        if not 0 < int(e.get("offset") or 0) < end <= end_of_payload:
            return [f"TOC offsets of {e.get('name')!r} lie outside the payload"]
        for j, c in enumerate(group):
            start = int(c.get("offset") or 0)
            stop = int(group[j + 1].get("offset") or 0) if j + 1 < len(group) else end
            part = hasher()
            n = 0
            stream = ZstdStream(start)
            for piece in decode_all(stream, _read_range(f, start, stop)):
                whole.update(piece)
                part.update(piece)
                n += len(piece)
            got_size += n
            if len(group) > 1 and (
                c.get("chunkDigest") != digest_of(part) or c.get("chunkSize") != n
            ):
                return [f"chunk {j} of {e.get('name')!r} does not match its TOC digest or size"]
        if got_size != e.get("size") or digest_of(whole) != e.get("digest"):
            return [f"the frames of {e.get('name')!r} do not hold its content"]
    return []
