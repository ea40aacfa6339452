"""The three uses docs/api.md shows, as one script that `make lint` type-checks
(mypy --strict): optimize a registry image with a record, convert one layer, verify an
image and read the result.

Run it as: python docs/examples/api_usage.py REGISTRY/REPO:TAG RECORD LAYER.tar.gz
"""

from __future__ import annotations

import sys
from pathlib import Path

import estargz_opt as eo


def optimize_with_record(image: str, record: Path) -> str:
    """Convert IMAGE to IMAGE-esgz on its registry, files of RECORD first."""
    request = eo.OptimizeRequest.from_options(
        f"docker://{image}",
        f"docker://{image}-esgz",
        oci=True,
        profiles=[eo.ProfileSource(eo.ProfileKind.RECORD, record)],
    )
    result = eo.optimize(request)
    for layer in result.layers:
        print(layer.source.digest, "->", layer.target.digest)
    return result.digest


def convert_one_layer(layer: Path, out: Path) -> str:
    """Convert one layer file to zstd:chunked with two files first."""
    options = eo.LayerOptions(
        format=eo.Format.ZSTDCHUNKED, prioritized=("usr/bin/python3", "app/main.py")
    )
    done = eo.convert_layer(layer, out, options)
    print("skipped:", done.layer.missing_prioritized)
    return done.layer.toc_digest


def verify_image(image: str) -> bool:
    """Check every layer of IMAGE; print what fails."""
    report = eo.verify(f"docker://{image}", platforms=["linux/amd64"])
    for layer in report.layers:
        for error in layer.errors:
            print(f"layer {layer.index} ({layer.digest}): {error}")
    return report.ok


def main(argv: list[str]) -> int:
    image, record, layer = argv[1], Path(argv[2]), Path(argv[3])
    try:
        print(optimize_with_record(image, record))
        print(convert_one_layer(layer, layer.with_suffix(".zst")))
        return 0 if verify_image(f"{image}-esgz") else 1
    except eo.OptionsError as exc:  # options that contradict each other
        print("bad options:", exc, file=sys.stderr)
        return 2
    except eo.EstargzOptError as exc:  # anything else a user can act on
        print("failed:", exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
