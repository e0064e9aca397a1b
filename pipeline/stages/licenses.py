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
from pipeline.stages.base import Reject, Stage, StageDoFn

# IPTC Photo Metadata 2023.1 "Data Mining" (PLUS vocabulary). Every PROHIBITED variant,
# including "see constraint" and "except search engine indexing", forbids AI training.
_PLUS_PROHIBITED = re.compile(rb"DMI-PROHIBITED[A-Z\-]*")
# W3C TDMRep in XMP: tdm:reservation="1" (attribute) or <tdm:reservation>1</...> (element).
_TDM_RESERVED = re.compile(rb"tdm:reservation\s*(=\s*[\"']1[\"']|>\s*1\s*<)")
# C2PA training-and-data-mining assertion (c2pa.training-mining / cawg.training-mining).
_C2PA_ASSERTION = re.compile(rb"(c2pa|cawg)\.training-mining")
_C2PA_RESTRICTED = re.compile(rb"notAllowed|constrained")
# An XMP packet, whatever prefixes it uses: <x:xmpmeta ...>...</x:xmpmeta> or a bare rdf:RDF.
_XMP_PACKET = re.compile(rb"<([\w.-]+:)?xmpmeta\b.*?</\1xmpmeta\s*>|<([\w.-]+:)?RDF\b.*?</\2RDF\s*>", re.S)
TDMREP_NS = "http://www.w3.org/ns/tdmrep/"
PLUS_NS = "http://ns.useplus.org/ldf/xmp/1.0/"


class UnreadableMetadata(ValueError):
    """A metadata block that may carry an opt-out cannot be parsed: the asset is refused."""


def _split(name: str) -> tuple[str, str]:
    return tuple(name[1:].split("}", 1)) if name.startswith("{") else ("", name)  # type: ignore[return-value]


def xmp_opt_out(packet: bytes) -> str | None:
    """Parse one XMP packet as XML with namespaces: a TDMRep reservation or a PLUS DataMining
    prohibition under any prefix. Raises UnreadableMetadata if it is not well-formed XML or
    declares a DTD or entities (never expanded)."""
    import xml.etree.ElementTree as ET

    if b"<!DOCTYPE" in packet or b"<!ENTITY" in packet:
        raise UnreadableMetadata("an XMP packet declares a DTD or entities")
    try:
        root = ET.fromstring(packet)
    except ET.ParseError as exc:
        raise UnreadableMetadata(f"an XMP packet is not well-formed XML ({exc})") from None
    for element in root.iter():
        ns, local = _split(element.tag)
        values = [element.text or "", *element.attrib.values()]
        if ns == TDMREP_NS and local == "reservation" and any(v.strip() == "1" for v in values):
            return "XMP TDMRep reservation = 1"
        if ns == PLUS_NS and local == "DataMining" and any("DMI-PROHIBITED" in v for v in values):
            return "XMP plus:DataMining prohibits data mining"
        for name, value in element.attrib.items():
            ns, local = _split(name)
            if ns == TDMREP_NS and local == "reservation" and value.strip() == "1":
                return "XMP TDMRep reservation = 1"
            if ns == PLUS_NS and local == "DataMining" and "DMI-PROHIBITED" in value:
                return "XMP plus:DataMining prohibits data mining"
    return None


def find_tdm_opt_out(data: bytes, extra_metadata: tuple[bytes, ...] = ()) -> str | None:
    """Describe the first "no text/data mining" mark in a file, or None.

    `extra_metadata` holds metadata blocks a decoder extracted (a PNG's compressed iTXt or
    zTXt XMP, a hex "Raw profile type xmp"), so marks invisible in the raw bytes are found.
    Every XMP packet (JPEG APP1, PNG text chunks, WebP, TIFF, GIF all carry it as XML) is
    parsed with namespaces, so a reservation under another prefix is found too; a packet
    that cannot be parsed raises UnreadableMetadata (fail closed).
    """
    for blob in (data, *extra_metadata):
        if not blob:
            continue
        # plain substring scans (memchr-fast) rule out the common case, a file with no mark
        # and no XMP at all, before any regular expression or parser looks at the bytes
        has_xmp = b"xmpmeta" in blob or b"RDF" in blob
        if not has_xmp and b"DMI-PROHIBITED" not in blob and b"tdm:reservation" not in blob \
                and b"training-mining" not in blob:
            continue
        match = _PLUS_PROHIBITED.search(blob)
        if match:
            return f"XMP plus:DataMining = {match.group(0).decode()}"
        if _TDM_RESERVED.search(blob):
            return "XMP tdm:reservation = 1 (TDMRep)"
        if _C2PA_ASSERTION.search(blob) and _C2PA_RESTRICTED.search(blob):
            return "C2PA training-mining assertion restricts AI training / data mining"
        if has_xmp:
            for packet in _XMP_PACKET.finditer(blob):
                mark = xmp_opt_out(packet.group(0))
                if mark:
                    return mark
    return None


class VerifyLicenses(StageDoFn):
    """Apply the license policy to manifest fields (no I/O)."""

    stage = Stage.LICENSE

    def __init__(self, policy: LicensePolicy):
        super().__init__()
        self.policy = policy

    def handle(self, asset: Asset) -> Asset:
        verdict = self.policy.evaluate(asset.entry)
        if verdict is not None:
            reason, detail = verdict
            raise Reject(RejectReason[reason], detail)
        return asset
