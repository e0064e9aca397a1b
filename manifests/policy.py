"""License policy: which licenses and uses a training run may take, as pure functions.

The policy is a small YAML file (see docs/policy.md). Evaluation returns `None` for an
allowed entry or a `(reason, detail)` pair naming the first rule the entry breaks.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import fsspec
import yaml

from manifests.schema import ManifestEntry

_KNOWN_KEYS = {
    "name",
    "description",
    "allowed_licenses",
    "known_licenses",
    "required_use",
    "attribution_required",
    "as_of",
}
_LICENSE_ID = re.compile(r"^(LicenseRef-[A-Za-z0-9.\-]+|[A-Za-z0-9.\-+]+)$")


class PolicyError(ValueError):
    """The policy file itself is invalid (a configuration error, not a row rejection)."""


@dataclass(frozen=True)
class LicensePolicy:
    """Allowed license ids, the use a row must grant, attribution set and as-of date.

    `known_licenses` lists licenses the policy recognises but does not allow, so that a
    row with a known-but-disallowed license is told apart from a typo or unknown id.
    """

    allowed_licenses: frozenset[str]
    required_use: str | None = "ml-training"
    attribution_required: frozenset[str] = frozenset()
    known_licenses: frozenset[str] = frozenset()
    as_of: dt.date = field(default_factory=dt.date.today)
    name: str = "policy"
    description: str = ""

    def evaluate(self, entry: ManifestEntry) -> tuple[str, str] | None:
        """First broken rule as (RejectReason name, detail), or None when training may use it."""
        lic = entry.license_id
        if lic not in self.allowed_licenses:
            if lic in self.known_licenses:
                return "LICENSE_DISALLOWED", f"license {lic} is not allowed by policy {self.name!r}"
            return "LICENSE_UNKNOWN", f"license {lic!r} is not known to policy {self.name!r}"
        if entry.license_start is not None and entry.license_start > self.as_of:
            return "LICENSE_NOT_YET_VALID", (
                f"license starts {entry.license_start.isoformat()}, after as_of {self.as_of.isoformat()}"
            )
        if entry.license_expiry is not None and entry.license_expiry < self.as_of:
            return "LICENSE_EXPIRED", (
                f"license expired {entry.license_expiry.isoformat()}, before as_of {self.as_of.isoformat()}"
            )
        if self.required_use and self.required_use not in entry.allowed_uses:
            granted = ", ".join(entry.allowed_uses) or "none"
            return "USE_NOT_ALLOWED", f"use {self.required_use!r} not granted (allowed_uses: {granted})"
        return None

    def needs_attribution(self, license_id: str) -> bool:
        return license_id in self.attribution_required

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "allowed_licenses": sorted(self.allowed_licenses),
            "known_licenses": sorted(self.known_licenses),
            "required_use": self.required_use,
            "attribution_required": sorted(self.attribution_required),
            "as_of": self.as_of.isoformat(),
        }


def _ids(data: Mapping[str, Any], key: str) -> frozenset[str]:
    value = data.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"policy {key!r} must be a list of license id strings")
    bad = [v for v in value if not _LICENSE_ID.match(v)]
    if bad:
        raise PolicyError(f"policy {key!r} has malformed license ids: {bad}")
    return frozenset(value)


def policy_from_dict(data: Mapping[str, Any]) -> LicensePolicy:
    """Build a policy from parsed YAML; unknown keys are errors (typos must not loosen a gate)."""
    if not isinstance(data, Mapping):
        raise PolicyError("policy must be a mapping")
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise PolicyError(f"unknown policy keys: {sorted(unknown)} (known: {sorted(_KNOWN_KEYS)})")
    allowed = _ids(data, "allowed_licenses")
    if not allowed:
        raise PolicyError("policy 'allowed_licenses' must list at least one license id")
    attribution = _ids(data, "attribution_required")
    as_of = data.get("as_of")
    if as_of is None:
        raise PolicyError("policy 'as_of' (ISO date) is required so that runs are reproducible")
    if isinstance(as_of, str):
        try:
            as_of = dt.date.fromisoformat(as_of)
        except ValueError:
            raise PolicyError(f"policy 'as_of' {as_of!r} is not an ISO date") from None
    if not isinstance(as_of, dt.date):
        raise PolicyError("policy 'as_of' must be an ISO date")
    required_use = data.get("required_use", "ml-training")
    if required_use is not None and not isinstance(required_use, str):
        raise PolicyError("policy 'required_use' must be a string or null")
    if isinstance(required_use, str) and not required_use.strip():
        # a blank use would silently turn the use check off: only an explicit null does that
        raise PolicyError("policy 'required_use' is blank: name the use (e.g. ml-training), or null for no use check")
    return LicensePolicy(
        allowed_licenses=allowed,
        required_use=required_use,
        attribution_required=attribution,
        known_licenses=_ids(data, "known_licenses") | allowed | attribution,
        as_of=as_of,
        name=str(data.get("name", "policy")),
        description=str(data.get("description", "")),
    )


def load_policy(url: str) -> LicensePolicy:
    """Read a policy YAML from any fsspec URL."""
    with fsspec.open(url, "rt", encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    return policy_from_dict(data)
