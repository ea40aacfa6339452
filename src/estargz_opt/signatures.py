"""Signatures of a source image, found so that a conversion never drops them silently.

A signature signs a manifest's digest; converting changes every digest, so a signature
copied onto the converted image would not verify, and none is ever copied. What is found
is named in a warning with the re-sign step, and reported (`optimize --json`:
`signatures`), so that a pipeline can apply its own policy. Looked for, on each source
manifest or index whose digest changed:
- cosign's tag scheme, `sha256-<hex>.sig`;
- OCI 1.1 referrers whose artifact type is a signature's (cosign, sigstore bundle,
  notation), through the store's `Referring` capability (referrers API, or the
  `sha256-<hex>` tag-schema index; in a layout, its manifests whose subject it is).

The data is informational: a store that cannot answer, or answers garbage, makes a
warning that says the check was incomplete, never a failed conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from estargz_opt.constants import COSIGN_SIGNATURE_SUFFIX, SIGNATURE_ARTIFACT_TYPES
from estargz_opt.descriptor import Descriptor
from estargz_opt.digest import digest_tag
from estargz_opt.errors import EstargzOptError
from estargz_opt.reference import ImageRef, RegistryRef
from estargz_opt.stores import Referring, Store

#: the kinds reported
COSIGN_TAG = "cosign-tag"
REFERRER = "oci-referrer"


@dataclass(frozen=True, slots=True)
class Signature:
    """One signature of a source manifest: which, how attached, and where."""

    subject: str  # the source digest it signs
    kind: str  # COSIGN_TAG or REFERRER
    name: str  # the tag, or the referrer manifest's digest


@dataclass(slots=True)
class Signatures:
    """What the source's signatures check found; `unchecked` names the source digests
    whose check failed (and why), so that "none found" is never claimed for them."""

    found: list[Signature] = field(default_factory=list)
    unchecked: dict[str, str] = field(default_factory=dict)
    #: the other referrers (SBOMs, provenance) of each source digest, to carry along
    attachments: dict[str, list[Descriptor]] = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        return sorted({s.kind for s in self.found})

    def report(self) -> dict[str, Any]:
        return {
            "found": bool(self.found),
            "kinds": self.kinds,
            "signatures": [
                {"subject": s.subject, "kind": s.kind, "name": s.name} for s in self.found
            ],
            "unchecked": dict(self.unchecked),
        }

    def warnings(self, converted: Mapping[str, Descriptor], dst: str | None) -> list[str]:
        """One warning per signed source digest, naming what signs it and the command
        that signs its converted digest; one per digest that could not be checked."""
        out = []
        for subject, target in converted.items():
            new = target.digest
            names = [f"{s.kind} {s.name}" for s in self.found if s.subject == subject]
            if names:
                out.append(
                    f"source {subject} is signed ({', '.join(names)}); signatures are not "
                    f"copied, they would not verify on the converted {new}: re-sign it "
                    f"(cosign sign {dst or 'REPOSITORY'}@{new}" + (")" if dst else " once pushed)")
                )
        out += [
            f"could not check source {subject} for signatures: {why}"
            for subject, why in self.unchecked.items()
        ]
        return out


def find(store: Store, subjects: list[str]) -> Signatures:
    """The signatures of `subjects` in `store`; a store without the `Referring`
    capability (containerd, archives) has none to find."""
    result = Signatures()
    if not isinstance(store, Referring):
        return result
    for subject in subjects:
        try:
            tag = digest_tag(subject, COSIGN_SIGNATURE_SUFFIX)
            if store.has_tag(tag):
                result.found.append(Signature(subject, COSIGN_TAG, tag))
            for ref in store.referrers(subject):
                if ref.artifact_type in SIGNATURE_ARTIFACT_TYPES:
                    result.found.append(Signature(subject, REFERRER, ref.digest))
                else:
                    result.attachments.setdefault(subject, []).append(ref)
        except EstargzOptError as exc:
            result.unchecked[subject] = str(exc)
    return result


def image_name(ref: ImageRef) -> str | None:
    """How cosign names the destination's repository (`docker://h/r:t` -> `h/r`);
    None elsewhere: cosign signs what is in a registry, once pushed."""
    if isinstance(ref, RegistryRef):
        return f"{ref.registry}/{ref.repository}"
    return None
