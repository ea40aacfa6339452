"""What `optimize` made: `OptimizeResult`, and its JSON report (`optimize --json`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from estargz_opt.convert import ConvertResult, LayerReport
from estargz_opt.format.build import LayerResult
from estargz_opt.prioritize.profile import EXAMPLES, Profile
from estargz_opt.signatures import Signatures

if TYPE_CHECKING:
    from estargz_opt.workload.analyzer import Analysis


@dataclass(slots=True)
class OptimizeResult:
    """What `optimize` made: the new image's digest, per layer what happened, and the
    workload run or profile that ordered the files."""

    format: str
    source_digest: str
    digest: str
    extra_image: str | None
    result: ConvertResult
    warnings: list[str] = field(default_factory=list)
    #: the workload run, when optimize ran one
    analysis: Analysis | None = None
    #: the --record-in / --prefetch-list profile as matched to the host image
    profile: Profile | None = None
    #: the source's signatures, which the converted image does not carry
    signatures: Signatures = field(default_factory=Signatures)

    @property
    def layers(self) -> list[LayerReport]:
        """Per layer of every converted platform: source and target descriptors, what the
        engine did (None: reused as it was), whether the cache served it."""
        return self.result.layers

    def report(self) -> dict[str, Any]:
        """The result as a JSON object (what `optimize --json` prints)."""
        layers = []
        for lay in self.result.layers:
            r = lay.result
            layers.append(
                {
                    "platform": lay.platform,
                    "source": {
                        "digest": lay.source.digest,
                        "size": lay.source.size,
                        "mediaType": lay.source.media_type,
                    },
                    "target": {
                        "digest": lay.target.digest,
                        "size": lay.target.size,
                        "mediaType": lay.target.media_type,
                    },
                    "diffID": lay.diff_id or None,
                    "format": "reused" if r is None else self.format,
                    "prioritizedFiles": r.prioritized_files if r else 0,
                    "prefetchBytes": r.prefetch_size if r else None,
                    **self._profile_counts(lay.source.digest, r),
                    "cache": lay.cache,
                    "seconds": round(lay.seconds, 3),
                }
            )
        return {
            "source": self.source_digest,
            "target": self.digest,
            "layers": layers,
            "extraImage": self.extra_image,
            "warnings": self.warnings,
            "signatures": self.signatures.report(),
            "workload": None if self.analysis is None else self.analysis.report(),
            "profile": None
            if self.profile is None
            else {
                "files": self.profile.files,
                "matched": self.profile.matched,
                "missing": len(self.profile.missing),
                "missingExamples": self.profile.missing[:EXAMPLES],
            },
        }

    def _profile_counts(self, digest: str, r: LayerResult | None) -> dict[str, int]:
        """Of one layer: prioritized files that came from the profile, profile paths missing."""
        if self.profile is None:
            return {}
        listed = len(self.profile.prioritized.get(digest, ()))
        absent = len(r.missing_prioritized) if r else 0
        return {
            "profileFiles": listed - absent,
            "profileMissing": self.profile.missing_by_layer.get(digest, 0) + absent,
        }
