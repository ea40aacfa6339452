#!/usr/bin/env python3
"""Fuzz target: the layer reader (open, verify, tar) and the tar parser (convert), by hypothesis.

Seeds are real blobs of each format and real source tars (plain, gzip, zstd). Each case
mutates one: byte flips, overwritten runs, truncation, insertion, zeroed runs, a spliced
copy; or rewrites its TOC JSON (fields set to hostile values, entries dropped or swapped)
and re-packs it so that the case reaches past the TOC digest into the payload checks.

Each case must end in success or an EstargzOptError whose message is one line (what the
CLI prints): any other exception is a traceback, and fails the run; so does a case over
30 s (SIGALRM). Memory is measured by the caller (tests/test_fuzz.py, with wait4).

Usage: python tests/support/fuzz_reader.py [--seconds 40] [--seed N]; prints "cases: N ...".
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the support package
from estargz_opt.errors import EstargzOptError
from estargz_opt.format import (
    Format,
    LayerOptions,
    convert_layer,
    estargz,
    open_layer,
    tarfmt,
    zstdchunked,
)
from support import tarfactory as tf

CASE_LIMIT_S = 30


class Hang(Exception):
    """A case ran over CASE_LIMIT_S."""


@dataclass
class Seed:
    name: str
    data: bytes
    kind: str  # a Format value, or "source"
    toc_json: bytes = b""
    toc_blob: bytes | None = None


@dataclass
class Tally:
    cases: int = 0
    ok: int = 0
    refused: int = 0
    by_seed: dict[str, int] = field(default_factory=dict)


def make_seeds(work: Path) -> list[Seed]:
    entries = [
        tf.dir_("a/"),
        tf.reg("a/f", tf.content("text", 5000, 1)),
        tf.reg("a/empty"),
        tf.symlink("a/s", "f"),
        tf.hardlink("a/h", "a/f"),
        tf.dir_("b/"),
        tf.reg("b/r", tf.content("random", 2500, 2), mode=0o755, uid=7),
        tf.Entry("b/c", b"3", devmajor=1, devminor=3),
    ]
    seeds = []
    for fmt in (Format.ESTARGZ, Format.EXTERNAL_TOC, Format.ZSTDCHUNKED):
        for prio in ([], ["a/h"]):
            conv = tf.convert(work, entries, fmt, prioritized=prio, chunk_size=2048,
                              name=f"{fmt}-{len(prio)}")
            seeds.append(Seed(f"{fmt}{'-prio' if prio else ''}", conv.blob, str(fmt),
                              conv.toc_json, conv.result.toc_blob))
    raw = tf.build_tar(entries)
    seeds.append(Seed("tar", raw, "source"))
    seeds.append(Seed("tar.gz", tf.gzip_bytes(raw), "source"))
    seeds.append(Seed("tar.zst", tf.zstd_bytes(raw), "source"))
    return seeds


# ----------------------------------------------------------------------------- mutations

HOSTILE = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.sampled_from([0, 1, 511, 512, 1 << 31, (1 << 63) - 1, 1 << 64]),
    st.text(max_size=20),
    st.sampled_from(["../../etc/passwd", "/", "", "sha256:" + "0" * 64, "chunk", "reg"]),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
TOC_KEYS = ["name", "type", "size", "offset", "innerOffset", "chunkOffset", "chunkSize",
            "chunkDigest", "digest", "linkName", "mode", "devMajor", "xattrs", "modtime"]


@st.composite
def byte_mutations(draw: st.DrawFn, size: int) -> list[tuple[str, int, int, int]]:
    ops = st.tuples(
        st.sampled_from(["flip", "set", "truncate", "insert", "zero", "splice"]),
        st.integers(0, max(size - 1, 0)),
        st.integers(1, 600),
        st.integers(0, 255),
    )
    return draw(st.lists(ops, min_size=1, max_size=4))


def apply_bytes(data: bytes, ops: list[tuple[str, int, int, int]]) -> bytes:
    b = bytearray(data)
    for op, at, n, v in ops:
        at = min(at, len(b))
        if op == "flip" and at < len(b):
            b[at] ^= v or 0x80
        elif op == "set":
            b[at : at + n] = bytes([v]) * len(b[at : at + n])
        elif op == "truncate":
            del b[at:]
        elif op == "insert":
            b[at:at] = bytes([v]) * n
        elif op == "zero":
            b[at : at + n] = bytes(len(b[at : at + n]))
        elif op == "splice":
            src = v * len(b) // 256
            b[at:at] = b[src : src + n]
    return bytes(b)


@st.composite
def toc_rewrites(draw: st.DrawFn, toc_json: bytes) -> bytes:
    doc = json.loads(toc_json)
    entries: list[dict[str, Any]] = doc["entries"]
    for _ in range(draw(st.integers(1, 3))):
        if not entries:
            break
        i = draw(st.integers(0, len(entries) - 1))
        what = draw(st.sampled_from(["set", "drop", "swap", "dup"]))
        if what == "set":
            entries[i][draw(st.sampled_from(TOC_KEYS))] = draw(HOSTILE)
        elif what == "drop":
            del entries[i]
        elif what == "swap":
            j = draw(st.integers(0, len(entries) - 1))
            entries[i], entries[j] = entries[j], entries[i]
        else:
            entries.insert(i, dict(entries[i]))
    if draw(st.booleans()):
        doc["version"] = draw(HOSTILE)
    return json.dumps(doc).encode()


def repack(seed: Seed, toc_json: bytes) -> tuple[bytes, bytes | None]:
    """The seed's payload with another TOC, packed as its format packs one."""
    blob = seed.data
    if seed.kind == str(Format.ZSTDCHUNKED):
        toc_offset = struct.unpack_from("<Q", blob, len(blob) - 40)[0]
        payload = blob[: toc_offset - 8]
        c = zstandard.ZstdCompressor().compress(toc_json)
        footer = struct.pack("<QQQQ", len(payload) + 8, len(c), len(toc_json), 1) + b"GnUlInUx"
        return (payload + zstdchunked.skippable_frame(c)
                + zstdchunked.skippable_frame(footer)), None
    member = estargz.gzip_member(estargz.toc_tar(toc_json), 1)
    if seed.kind == str(Format.EXTERNAL_TOC):
        return blob, member
    payload = blob[: tf.gzip_footer_toc_offset(blob)]
    return payload + member + estargz.footer(len(payload)), None


# ----------------------------------------------------------------------------- the target


def exercise(seed: Seed, data: bytes, toc_blob: bytes | None, work: Path) -> bool:
    """Run the reader or the converter on data; True on success, False on a clean refusal."""
    path = work / "case.bin"
    path.write_bytes(data)
    try:
        if seed.kind == "source":
            for _ in tarfmt.iter_entries(io.BytesIO(data), len(data)):
                pass
            convert_layer(path, work / "case.out", LayerOptions(prioritized=["a/h", "b/r"]))
        else:
            with open_layer(path, external_toc=toc_blob) as layer:
                layer.verify(workers=2)
                layer.write_tar(_Discard())
        return True
    except EstargzOptError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"not a one-line error: {message!r}"
        return False


class _Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(b)


def _alarm(_signum: int, _frame: object) -> None:
    raise Hang(f"a case ran over {CASE_LIMIT_S} s")


def fuzz(seconds: float, seed_value: int | None) -> Tally:
    tally = Tally()
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory(prefix="estargz-opt-fuzz-") as tmp:
        work = Path(tmp)
        seeds = make_seeds(work)

        def one(seed: Seed, data: bytes, toc_blob: bytes | None) -> None:
            signal.alarm(CASE_LIMIT_S)
            try:
                ok = exercise(seed, data, toc_blob, work)
            finally:
                signal.alarm(0)
            tally.cases += 1
            tally.by_seed[seed.name] = tally.by_seed.get(seed.name, 0) + 1
            if ok:
                tally.ok += 1
            else:
                tally.refused += 1

        @st.composite
        def cases(draw: st.DrawFn) -> tuple[Seed, bytes, bytes | None]:
            seed = draw(st.sampled_from(seeds))
            toc_blob = seed.toc_blob
            data = seed.data
            if seed.toc_json and draw(st.booleans()):
                data, new_toc = repack(seed, draw(toc_rewrites(seed.toc_json)))
                toc_blob = new_toc or toc_blob
                if draw(st.booleans()):
                    return seed, data, toc_blob
            target = draw(st.sampled_from(["blob", "toc"])) if toc_blob else "blob"
            if target == "toc" and toc_blob is not None:
                toc_blob = apply_bytes(toc_blob, draw(byte_mutations(len(toc_blob))))
            else:
                data = apply_bytes(data, draw(byte_mutations(len(data))))
            return seed, data, toc_blob

        deadline = time.monotonic() + seconds
        rounds = 0
        while time.monotonic() < deadline:
            batch = settings(
                max_examples=100,
                deadline=None,
                database=None,
                phases=[Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
                derandomize=False,
            )

            @batch
            @given(cases())
            def run(case: tuple[Seed, bytes, bytes | None]) -> None:
                if time.monotonic() < deadline:
                    one(*case)

            if seed_value is not None:
                run = _seeded(run, seed_value + rounds)
            run()
            rounds += 1
    return tally


def _seeded(fn: Callable[[], None], value: int) -> Callable[[], None]:
    from hypothesis import seed

    return seed(value)(fn)  # type: ignore[no-any-return]


def warm_up() -> None:
    """Draw one text: hypothesis builds its Unicode table and caches it on disk."""

    @settings(max_examples=1, database=None)
    @given(st.text(min_size=1))
    def touch(_text: str) -> None:
        pass

    touch()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--warm-up", action="store_true",
                    help="only build hypothesis' cached Unicode table, then exit")
    args = ap.parse_args()
    if args.warm_up:
        warm_up()
        return 0
    t0 = time.monotonic()
    tally = fuzz(args.seconds, args.seed)
    print(f"cases: {tally.cases} ok: {tally.ok} refused: {tally.refused} "
          f"seconds: {time.monotonic() - t0:.1f} per-seed: {json.dumps(tally.by_seed)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.gettempdir())
    sys.exit(main())
