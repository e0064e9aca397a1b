import datetime as dt

import pytest

from manifests.schema import RowError, parse_entry

BASE = {"asset_id": "a1", "uri": "images/a.jpg", "caption": "A dog on a beach.", "license_id": "CC-BY-2.0"}


def reason_of(row) -> str:
    with pytest.raises(RowError) as err:
        parse_entry(row)
    return err.value.reason


def test_minimal_row_and_unknown_fields_kept_as_provenance():
    entry = parse_entry(dict(BASE, vendor_batch="2026-10", license_expiry="2030-01-31"))
    assert entry.asset_id == "a1" and entry.captions == ("A dog on a beach.",)
    assert entry.extra == {"vendor_batch": "2026-10"}
    assert entry.license_expiry == dt.date(2030, 1, 31)


def test_caption_and_captions_combine_and_csv_lists_split():
    entry = parse_entry(dict(BASE, captions="first one;second one", allowed_uses="ml-training|research"))
    assert entry.captions == ("A dog on a beach.", "first one", "second one")
    assert entry.allowed_uses == ("ml-training", "research")
    entry = parse_entry(dict(BASE, captions='["x y z"]'))
    assert entry.captions[-1] == "x y z"


@pytest.mark.parametrize("drop", ["asset_id", "uri", "license_id"])
def test_missing_required_field(drop):
    row = {k: v for k, v in BASE.items() if k != drop}
    assert reason_of(row) == "MISSING_FIELD"


def test_missing_caption_field_is_missing_but_blank_caption_is_left_to_filters():
    row = {k: v for k, v in BASE.items() if k != "caption"}
    assert reason_of(row) == "MISSING_FIELD"
    assert parse_entry(dict(BASE, caption="   ")).captions == ()  # CAPTION_EMPTY comes from the filter


@pytest.mark.parametrize("field,value,reason", [
    ("captions", 5, "BAD_FIELD_TYPE"),
    ("captions", ["ok", 3], "BAD_FIELD_TYPE"),
    ("uri", {"nested": 1}, "BAD_FIELD_TYPE"),
    ("sha256", "abc", "BAD_FIELD_TYPE"),
    ("width", -3, "BAD_FIELD_TYPE"),
    ("license_expiry", "31/12/2030", "BAD_DATE"),
    ("license_start", 20300101, "BAD_DATE"),
])
def test_bad_values_get_specific_reasons(field, value, reason):
    assert reason_of(dict(BASE, **{field: value})) == reason


def test_non_object_row_is_malformed():
    assert reason_of(["not", "a", "dict"]) == "MALFORMED_ROW"


def test_to_json_round_trips_dates():
    entry = parse_entry(dict(BASE, license_start="2020-01-01", sha256="A" * 64))
    data = entry.to_json()
    assert data["license_start"] == "2020-01-01" and data["sha256"] == "a" * 64
