#!/usr/bin/env python3
"""A fleet converting images that share a base, with and without a shared `--cache-ref`.

N images share a two-layer base of about BASE MB (half random, half text, so gzip level 9
has real work) and differ in a small top layer. Each image is converted by its own
process with a fresh HOME, local cache and TMPDIR (a separate machine), one after the
other, into its own repository of one loopback TLS docker-registry with token auth
(tests/support/fleet.py): once without a remote cache, once with `--cache-ref`, in the
same run. Printed: the total wall time of each fleet, the ratio, and the base layers'
upload bytes (blob commits of the base digests in the registry's access log, times their
sizes) in units of one copy of the converted base.

Usage: .venv/bin/python bench/bench_fleet.py [--images 10] [--base-mb 200]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.fleet import Machine, TokenRegistry, finished
from support.imagefactory import simple_layer, write_layout


def _base_layer(name: str, mb: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    files: dict[str, bytes | None] = {f"{name}/": None}
    for i in range(mb):
        half = rnd.randbytes(1 << 19)
        words = " ".join(rnd.choice(["lib", "usr", "conf", "data", str(i)])
                         for _ in range(1 << 16)).encode()[: 1 << 19]
        files[f"{name}/f{i:04d}"] = half + words
    return simple_layer(files)


def _fleet(reg: TokenRegistry, root: Path, images: list[Path], tag: str,
           cache_ref: str | None, *more: str) -> tuple[float, list[dict[str, object]]]:
    reports = []
    started = time.monotonic()
    for n, image in enumerate(images):
        extra = ["--cache-ref", cache_ref, *more] if cache_ref else []
        m = Machine(root / f"{tag}{n}", reg)
        report, _ = finished(m.optimize(f"oci:{image}:v1",
                                        f"docker://{reg.host}/{tag}/img{n}:v1", *extra),
                             timeout=3600)
        reports.append(report)
    return time.monotonic() - started, reports


def _base_upload_bytes(log: str, base: dict[str, int]) -> int:
    total = 0
    for m in re.finditer(r'"PUT /v2/[^ ]*/blobs/uploads/[^ "]*digest=sha256(?::|%3A)([0-9a-f]{64})',
                         log):
        total += base.get("sha256:" + m.group(1), 0)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--base-mb", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        half = args.base_mb // 2
        base = [_base_layer("usr", half, 1), _base_layer("opt", args.base_mb - half, 2)]
        images = []
        for n in range(args.images):
            d = root / "src" / f"img{n}"
            write_layout(d, "v1", [*base, simple_layer({"app/": None,
                                                        "app/main": os.urandom(100_000)})])
            images.append(d)
        reg = TokenRegistry.start(root / "reg")
        try:
            mark = len(reg.log())
            plain_s, plain = _fleet(reg, root, images, "plain", None)
            log_plain = reg.log()[mark:]
            mark = len(reg.log())
            cached_s, cached = _fleet(reg, root, images, "cached",
                                      f"docker://{reg.host}/fleet/cache")
            log_cached = reg.log()[mark:]
            mark = len(reg.log())
            fast_s, fast = _fleet(reg, root, images, "fast", f"docker://{reg.host}/fleet/fast",
                                  "--cache-ref-trust", "digest-only")
            log_fast = reg.log()[mark:]
        finally:
            reg.stop()
    sizes = {str(lay["target"]["digest"]): int(lay["target"]["size"])  # type: ignore[index]
             for lay in plain[0]["layers"][:2]}  # type: ignore[index]
    one_copy = sum(sizes.values())
    same = all(r["target"] == p["target"] == f["target"]
               for r, p, f in zip(cached, plain, fast, strict=True))
    states = [[lay["cache"] for lay in r["layers"][:2]] for r in cached]  # type: ignore[index]
    print(f"images: {args.images}, base: {args.base_mb} MB of tar, "
          f"{one_copy / 1e6:.1f} MB converted")
    print("| fleet | total wall s | base upload bytes (copies) |")
    print("|---|---|---|")
    for name, secs, log in (("no --cache-ref", plain_s, log_plain),
                            ("--cache-ref", cached_s, log_cached),
                            ("--cache-ref --cache-ref-trust=digest-only", fast_s, log_fast)):
        up = _base_upload_bytes(log, sizes)
        print(f"| {name} | {secs:.1f} | {up} ({up / one_copy:.2f}) |")
    print(f"digest-only ratio: {fast_s / plain_s:.2f}x")
    print(f"ratio: {cached_s / plain_s:.2f}x; same digests: {same}; base cache states: "
          f"{states}")
    lookups = len(re.findall(r'"(?:HEAD|GET) /v2/fleet/cache/manifests/', log_cached))
    print(f"cache manifest lookups (HEAD/GET): {lookups} for {args.images} runs of 3 layers")


if __name__ == "__main__":
    main()
