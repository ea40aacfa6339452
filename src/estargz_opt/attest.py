"""The conversion attestation (`optimize --attest`): an in-toto statement, attached to the
converted image as an OCI referrer, saying what it was made from and how.

It names the source and converted digests, per layer the source and converted digests
with their DiffIDs and TOC digests, the format and its options, the profile (the digest
of its prioritized paths per source layer, as compact JSON with sorted keys, and how many
files it prioritized) and
estargz-opt's version. It is not signed: the pipeline's own signer signs it with the
image, as it would any attestation.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from collections.abc import Mapping, Sequence
from typing import Any

from estargz_opt import descriptor as d
from estargz_opt.convert import ConvertResult
from estargz_opt.descriptor import Descriptor
from estargz_opt.digest import sha256_digest
from estargz_opt.format import LayerOptions
from estargz_opt.stores import Store

IN_TOTO_STATEMENT = "https://in-toto.io/Statement/v1"
IN_TOTO_MEDIA_TYPE = "application/vnd.in-toto+json"
PREDICATE_TYPE = "https://github.com/estargz-opt/estargz-opt/conversion/v1"
#: the OCI 1.1 empty config of an artifact manifest
EMPTY_CONFIG = (b"{}", "application/vnd.oci.empty.v1+json")


def statement(
    source: str,
    target: Descriptor,
    image: str,
    result: ConvertResult,
    layer: LayerOptions,
    prioritized: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """The statement for one conversion (a JSON object)."""
    options = dataclasses.asdict(layer)
    options.pop("prioritized", None)
    options.pop("workers", None)  # never changes the bytes
    return {
        "_type": IN_TOTO_STATEMENT,
        "subject": [{"name": image, "digest": {"sha256": target.digest.partition(":")[2]}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "source": {"digest": source},
            "converted": {"digest": target.digest},
            "format": layer.format.value,
            "options": {k: getattr(v, "value", v) for k, v in options.items()},
            "profile": {
                "digest": sha256_digest(
                    json.dumps(
                        {k: list(v) for k, v in prioritized.items()},
                        sort_keys=True,
                        separators=(",", ":"),
                    ).encode()
                ),
                "prioritizedFiles": sum(
                    lay.result.prioritized_files for lay in result.layers if lay.result
                ),
            },
            "layers": [
                {
                    "platform": lay.platform,
                    "source": {"digest": lay.source.digest},
                    "converted": {"digest": lay.target.digest},
                    "diffID": lay.diff_id or None,
                    "tocDigest": lay.result.toc_digest if lay.result else None,
                }
                for lay in result.layers
            ],
            "builder": {"name": "estargz-opt", "version": _version()},
        },
    }


def write(dst: Store, target: Descriptor, doc: dict[str, Any]) -> Descriptor:
    """The statement written to `dst` as an artifact manifest whose subject is `target`;
    its descriptor, for the store to list as a referrer."""
    blob = d.dump(doc)
    dst.write(blob)
    config, config_type = EMPTY_CONFIG
    dst.write(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": d.OCI_MANIFEST,
        "artifactType": IN_TOTO_MEDIA_TYPE,
        "config": {"mediaType": config_type, "digest": sha256_digest(config), "size": 2},
        "layers": [
            {"mediaType": IN_TOTO_MEDIA_TYPE, "digest": sha256_digest(blob), "size": len(blob)}
        ],
        "subject": {"mediaType": target.media_type, "digest": target.digest, "size": target.size},
        "annotations": {"in-toto.io/predicate-type": PREDICATE_TYPE},
    }
    data = d.dump(manifest)
    desc = Descriptor(
        d.OCI_MANIFEST, sha256_digest(data), len(data), artifact_type=IN_TOTO_MEDIA_TYPE
    )
    dst.write(data, source=desc)
    return desc


def _version() -> str:
    try:
        return importlib.metadata.version("estargz-opt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
