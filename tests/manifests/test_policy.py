import datetime as dt

import pytest

from manifests.policy import PolicyError, load_policy, policy_from_dict
from manifests.schema import parse_entry

POLICY = {
    "name": "t",
    "as_of": "2026-01-01",
    "allowed_licenses": ["CC-BY-2.0", "LicenseRef-acme-2024"],
    "known_licenses": ["CC-BY-ND-2.0"],
    "attribution_required": ["CC-BY-2.0"],
}


def entry(**kw):
    row = {"asset_id": "x", "uri": "a.jpg", "caption": "a cat", "license_id": "CC-BY-2.0",
           "allowed_uses": ["ml-training"]}
    row.update(kw)
    return parse_entry(row)


@pytest.mark.parametrize("fields,reason", [
    ({}, None),
    ({"license_id": "CC-BY-ND-2.0"}, "LICENSE_DISALLOWED"),
    ({"license_id": "LicenseRef-nobody"}, "LICENSE_UNKNOWN"),
    ({"license_id": "LicenseRef-acme-2024", "license_expiry": "2025-12-31"}, "LICENSE_EXPIRED"),
    ({"license_id": "LicenseRef-acme-2024", "license_expiry": "2026-01-01"}, None),
    ({"license_start": "2026-01-02"}, "LICENSE_NOT_YET_VALID"),
    ({"allowed_uses": ["editorial"]}, "USE_NOT_ALLOWED"),
    ({"allowed_uses": []}, "USE_NOT_ALLOWED"),
])
def test_evaluate(fields, reason):
    verdict = policy_from_dict(POLICY).evaluate(entry(**fields))
    assert (verdict[0] if verdict else None) == reason


def test_attribution_and_as_of_parsed():
    policy = policy_from_dict(POLICY)
    assert policy.as_of == dt.date(2026, 1, 1)
    assert policy.needs_attribution("CC-BY-2.0") and not policy.needs_attribution("LicenseRef-acme-2024")


@pytest.mark.parametrize("change", [
    {"allowed_licence": ["x"]},  # typo'd key must not loosen the gate silently
    {"as_of": None},
    {"as_of": "yesterday"},
    {"allowed_licenses": []},
    {"allowed_licenses": "CC-BY-2.0"},
    {"required_use": 3},
])
def test_invalid_policies_are_errors(change):
    data = dict(POLICY, **change)
    if change.get("as_of", "") is None:
        del data["as_of"]
    with pytest.raises(PolicyError):
        policy_from_dict(data)


def test_shipped_policies_load(demo_dir):
    root = demo_dir.parent / "policies"
    research = load_policy(str(root / "research-noncommercial.yaml"))
    commercial = load_policy(str(root / "commercial.yaml"))
    nc = entry(license_id="CC-BY-NC-2.0")
    assert research.evaluate(nc) is None
    assert commercial.evaluate(nc)[0] == "LICENSE_DISALLOWED"
    for policy in (research, commercial):
        assert policy.evaluate(entry(license_id="CC-BY-NC-ND-2.0"))[0] == "LICENSE_DISALLOWED"
