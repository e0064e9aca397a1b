"""License gate: the policy check on manifest fields, and embedded "no data mining" marks.

The manifest check runs before any byte is fetched (cheap, and a disallowed asset is
never downloaded). The embedded-mark check runs on the fetched bytes: an IPTC/PLUS
`DataMining` prohibition, a TDMRep reservation, or a C2PA training-mining assertion
that is not plainly "allowed" rejects the asset (fail closed).
"""

from __future__ import annotations

import re

from manifests.policy import LicensePolicy
from pipeline.records import Asset, RejectReason
from pipeline.stages.base import Reject, StageDoFn

# IPTC Photo Metadata 2023.1 "Data Mining" (PLUS vocabulary). Every PROHIBITED variant,
# including "see constraint" and "except search engine indexing", forbids AI training.
_PLUS_PROHIBITED = re.compile(rb"DMI-PROHIBITED[A-Z\-]*")
# W3C TDMRep in XMP: tdm:reservation="1" (attribute) or <tdm:reservation>1</...> (element).
_TDM_RESERVED = re.compile(rb"tdm:reservation\s*(=\s*[\"']1[\"']|>\s*1\s*<)")
# C2PA training-and-data-mining assertion (c2pa.training-mining / cawg.training-mining).
_C2PA_ASSERTION = re.compile(rb"(c2pa|cawg)\.training-mining")
_C2PA_RESTRICTED = re.compile(rb"notAllowed|constrained")


def find_tdm_opt_out(data: bytes, extra_metadata: tuple[bytes, ...] = ()) -> str | None:
    """Describe the first "no text/data mining" mark in a file, or None.

    `extra_metadata` holds metadata blocks a decoder extracted (e.g. a PNG's compressed
    iTXt XMP), so marks that are not visible in the raw bytes are still found.
    """
    for blob in (data, *extra_metadata):
        if not blob:
            continue
        # plain substring scans (memchr-fast) rule out the common case, a file with no mark
        # at all, before any regular expression looks at the bytes
        if b"DMI-PROHIBITED" not in blob and b"tdm:reservation" not in blob and b"training-mining" not in blob:
            continue
        match = _PLUS_PROHIBITED.search(blob)
        if match:
            return f"XMP plus:DataMining = {match.group(0).decode()}"
        if _TDM_RESERVED.search(blob):
            return "XMP tdm:reservation = 1 (TDMRep)"
        if _C2PA_ASSERTION.search(blob) and _C2PA_RESTRICTED.search(blob):
            return "C2PA training-mining assertion restricts AI training / data mining"
    return None


class VerifyLicenses(StageDoFn):
    """Apply the license policy to manifest fields (no I/O)."""

    stage = "license"

    def __init__(self, policy: LicensePolicy):
        super().__init__()
        self.policy = policy

    def handle(self, asset: Asset) -> Asset:
        verdict = self.policy.evaluate(asset.entry)
        if verdict is not None:
            reason, detail = verdict
            raise Reject(RejectReason[reason], detail)
        return asset
