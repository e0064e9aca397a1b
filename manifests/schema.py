"""Manifest row schema: validate a raw row (dict) at the edge into a frozen `ManifestEntry`.

Validation is pure: it never touches the network or files, so it can run anywhere
(in a Beam worker, in a notebook, in a vendor's own pre-flight check).

`objects` (optional) are labelled boxes for grounded tasks: `[{"label": str, "bbox":
[x0, y0, x1, y1]}]` in source pixels of the image as displayed (EXIF orientation applied).
A malformed list rejects the row (`BAD_FIELD_TYPE`, naming the object) rather than reaching
a later stage; boxes partly or wholly outside the image are legal here (the crop decides).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Mapping

# Field names accepted for each canonical field (first match wins).
ALIASES: dict[str, tuple[str, ...]] = {
    "asset_id": ("asset_id", "id", "image_id"),
    "uri": ("uri", "url", "path"),
    "caption": ("caption", "text"),
    "captions": ("captions",),
    "license_id": ("license_id", "license_spdx", "license"),
    "license_name": ("license_name",),
    "license_url": ("license_url",),
    "licensor": ("licensor", "contributor", "author", "creator"),
    "allowed_uses": ("allowed_uses",),
    "license_start": ("license_start",),
    "license_expiry": ("license_expiry", "license_end"),
    "sha256": ("sha256",),
    "width": ("width",),
    "height": ("height",),
    "objects": ("objects",),
}
REQUIRED = ("asset_id", "uri", "license_id")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LIST_SPLIT = re.compile(r"[;|]")
MAX_OBJECTS = 256  # boxes per row; more is a delivery error, not an annotation
MAX_LABEL_CHARS = 200


class RowError(ValueError):
    """A row that cannot become a `ManifestEntry`; `reason` is a RejectReason name."""

    def __init__(self, reason: str, detail: str, asset_id: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.asset_id = asset_id


@dataclass(frozen=True)
class LabelledBox:
    """One annotated object. `label` is text (data, never a control token); `bbox` is
    (x0, y0, x1, y1) in source pixels, x0 < x1 and y0 < y1, numbers as the vendor gave them."""

    label: str
    bbox: tuple[float, float, float, float]

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "bbox": list(self.bbox)}


@dataclass(frozen=True)
class ManifestEntry:
    """One validated manifest row. `extra` keeps unknown fields as provenance (JSON-safe)."""

    asset_id: str
    uri: str
    captions: tuple[str, ...]
    license_id: str
    license_name: str | None = None
    license_url: str | None = None
    licensor: str | None = None
    allowed_uses: tuple[str, ...] = ()
    license_start: dt.date | None = None
    license_expiry: dt.date | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    objects: tuple[LabelledBox, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Every manifest field, JSON-serialisable (dates as ISO strings). `objects` appears only
        when the row has some, so rows without boxes serialise exactly as before the field existed."""
        data = {
            "asset_id": self.asset_id,
            "uri": self.uri,
            "captions": list(self.captions),
            "license_id": self.license_id,
            "license_name": self.license_name,
            "license_url": self.license_url,
            "licensor": self.licensor,
            "allowed_uses": list(self.allowed_uses),
            "license_start": self.license_start.isoformat() if self.license_start else None,
            "license_expiry": self.license_expiry.isoformat() if self.license_expiry else None,
            "sha256": self.sha256,
            "width": self.width,
            "height": self.height,
            "extra": dict(self.extra),
        }
        if self.objects:
            data["objects"] = [o.to_json() for o in self.objects]
        return data


def _pick(row: Mapping[str, Any], name: str) -> tuple[str | None, Any]:
    for alias in ALIASES[name]:
        if alias in row and not _is_blank(row[alias]):
            return alias, row[alias]
    return None, None


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and value != value:  # NaN from CSV/Parquet
        return True
    return isinstance(value, str) and value.strip() == ""


def _text(name: str, value: Any, asset_id: str | None) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError("BAD_FIELD_TYPE", f"{name} must be a string, got {type(value).__name__}", asset_id)
    return str(value).strip()


def _opt_text(row: Mapping[str, Any], name: str, asset_id: str | None) -> str | None:
    _, value = _pick(row, name)
    return None if value is None else _text(name, value, asset_id)


def _list_of_text(name: str, value: Any, asset_id: str | None) -> tuple[str, ...]:
    """Lists arrive as real lists (JSONL/Parquet) or as strings in CSV: a JSON list or `a;b`."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise RowError("BAD_FIELD_TYPE", f"{name}: not a JSON list ({exc.msg})", asset_id) from None
        else:
            value = [part for part in _LIST_SPLIT.split(stripped) if part.strip()]
    if hasattr(value, "tolist"):  # numpy arrays from Parquet
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise RowError("BAD_FIELD_TYPE", f"{name} must be a list of strings", asset_id)
    out = []
    for item in value:
        if not isinstance(item, str):
            raise RowError("BAD_FIELD_TYPE", f"{name} items must be strings, got {type(item).__name__}", asset_id)
        out.append(item)
    return tuple(out)


def _date(name: str, value: Any, asset_id: str | None) -> dt.date | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if not isinstance(value, str):
        raise RowError("BAD_DATE", f"{name} must be an ISO date string, got {type(value).__name__}", asset_id)
    try:
        return dt.date.fromisoformat(value.strip()[:10])
    except ValueError:
        raise RowError("BAD_DATE", f"{name}={value!r} is not an ISO date (YYYY-MM-DD)", asset_id) from None


def _dimension(name: str, value: Any, asset_id: str | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise RowError("BAD_FIELD_TYPE", f"{name} must be a positive integer", asset_id)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or value <= 0:
        raise RowError("BAD_FIELD_TYPE", f"{name} must be a positive integer, got {value!r}", asset_id)
    return value


def parse_objects(value: Any, asset_id: str | None = None) -> tuple[LabelledBox, ...]:
    """`objects` from JSONL/Parquet (a list of mappings) or CSV (a JSON list in one cell);
    raises `RowError` naming the bad object. Keys other than `label` and `bbox` are ignored."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError("BAD_FIELD_TYPE", f"objects: not a JSON list ({exc.msg})", asset_id) from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise RowError("BAD_FIELD_TYPE", f"objects must be a list of {{label, bbox}}, got {type(value).__name__}",
                       asset_id)
    if len(value) > MAX_OBJECTS:
        raise RowError("BAD_FIELD_TYPE", f"objects: {len(value)} entries, at most {MAX_OBJECTS}", asset_id)
    return tuple(_labelled_box(item, f"objects[{i}]", asset_id) for i, item in enumerate(value))


def _labelled_box(item: Any, where: str, asset_id: str | None) -> LabelledBox:
    if not isinstance(item, Mapping):
        raise RowError("BAD_FIELD_TYPE", f"{where} must be an object with label and bbox", asset_id)
    label = item.get("label")
    if isinstance(label, str):  # one line of printable text: a label is a phrase inside a prompt
        label = unicodedata.normalize("NFC", label)
        label = " ".join("".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in label).split())
    if not isinstance(label, str) or not label:
        raise RowError("BAD_FIELD_TYPE", f"{where}.label must be a non-empty string", asset_id)
    if len(label) > MAX_LABEL_CHARS:
        raise RowError("BAD_FIELD_TYPE", f"{where}.label is {len(label)} characters, at most {MAX_LABEL_CHARS}",
                       asset_id)
    bbox = item.get("bbox")
    if hasattr(bbox, "tolist"):  # a numpy array from Parquet
        bbox = bbox.tolist()
    if isinstance(bbox, (list, tuple)):  # numpy scalars -> Python numbers
        bbox = [v.item() if hasattr(v, "item") and not isinstance(v, (int, float)) else v for v in bbox]
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_finite_number(v) for v in bbox):
        raise RowError("BAD_FIELD_TYPE", f"{where}.bbox must be 4 finite numbers [x0, y0, x1, y1]", asset_id)
    x0, y0, x1, y1 = bbox
    if not (x0 < x1 and y0 < y1):
        raise RowError("BAD_FIELD_TYPE", f"{where}.bbox {list(bbox)} needs x0 < x1 and y0 < y1", asset_id)
    return LabelledBox(label, (x0, y0, x1, y1))


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_safe(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN / Infinity are not JSON: stored as null (docs/manifests.md)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def parse_entry(row: Mapping[str, Any]) -> ManifestEntry:
    """Validate one raw manifest row; raise `RowError` with a specific reason."""
    if not isinstance(row, Mapping):
        raise RowError("MALFORMED_ROW", f"row is a {type(row).__name__}, not an object")
    _, raw_id = _pick(row, "asset_id")
    asset_id = None if raw_id is None or isinstance(raw_id, (bool, dict, list)) else str(raw_id).strip()
    for name in REQUIRED:
        if _pick(row, name)[1] is None:
            raise RowError("MISSING_FIELD", f"required field {name!r} is missing or empty", asset_id)
    asset_id = _text("asset_id", raw_id, asset_id)
    _, uri = _pick(row, "uri")
    uri = _text("uri", uri, asset_id)

    captions: list[str] = []
    cap_key, caption = _pick(row, "caption")
    if caption is not None:
        captions.append(_text("caption", caption, asset_id) if not isinstance(caption, str) else caption)
    caps_key, many = _pick(row, "captions")
    if many is not None:
        captions.extend(_list_of_text("captions", many, asset_id))
    if cap_key is None and caps_key is None and not any(a in row for a in ALIASES["caption"] + ALIASES["captions"]):
        raise RowError("MISSING_FIELD", "required field 'caption' (or 'captions') is missing", asset_id)

    _, uses = _pick(row, "allowed_uses")
    sha = _opt_text(row, "sha256", asset_id)
    if sha is not None:
        sha = sha.lower()
        if not _SHA256.match(sha):
            raise RowError("BAD_FIELD_TYPE", f"sha256 {sha!r} is not 64 hex digits", asset_id)
    _, start = _pick(row, "license_start")
    _, expiry = _pick(row, "license_expiry")
    _, width = _pick(row, "width")
    _, height = _pick(row, "height")
    _, objects = _pick(row, "objects")

    used = {_pick(row, name)[0] for name in ALIASES} | {name for name in ALIASES if name in row}
    extra = {str(k): _json_safe(v) for k, v in row.items() if k not in used}
    return ManifestEntry(
        asset_id=asset_id,
        uri=uri,
        captions=tuple(captions),
        license_id=_text("license_id", _pick(row, "license_id")[1], asset_id),
        license_name=_opt_text(row, "license_name", asset_id),
        license_url=_opt_text(row, "license_url", asset_id),
        licensor=_opt_text(row, "licensor", asset_id),
        allowed_uses=_list_of_text("allowed_uses", uses, asset_id) if uses is not None else (),
        license_start=_date("license_start", start, asset_id),
        license_expiry=_date("license_expiry", expiry, asset_id),
        sha256=sha,
        width=_dimension("width", width, asset_id),
        height=_dimension("height", height, asset_id),
        objects=parse_objects(objects, asset_id) if objects is not None else (),
        extra=extra,
    )
