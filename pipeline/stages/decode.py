"""Safe image decode and normalisation (Pillow).

Limits are checked from the header before pixels are decoded (decompression bombs), JPEGs
are decoded at reduced DCT scale with `draft()` when the target is much smaller, every
mode (CMYK, palette, alpha, 16-bit, ...) becomes 8-bit RGB, EXIF orientation is applied,
and the result is a `resolution`² centre crop stored as JPEG.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import dedup_hash
from pipeline.config import DecodeConfig
from pipeline.records import Asset, RejectReason
from pipeline.stages.base import Reject, Stage, StageDoFn
from pipeline.stages.licenses import UnreadableMetadata, find_tdm_opt_out

_XMP_INFO_KEYS = ("xmp", "XML:com.adobe.xmp", "XMP")
_ORIENTATION = 0x0112  # EXIF Orientation tag
_TRANSPOSING = (5, 6, 7, 8)  # orientations that swap width and height on display


@dataclass(frozen=True)
class DecodedImage:
    jpeg: bytes
    pixel_sha256: str
    format: str
    width: int  # of the image as displayed (EXIF orientation applied): the frame that is cropped
    height: int
    mode: str
    phash: str | None = None  # perceptual hash of the full frame (16 hex), for near-dedup
    phash_mirror: str | None = None  # ... and of the horizontally mirrored full frame (flip-invariant dedup)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparent pixels are composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        top = 65535 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        arr = np.clip(arr * 255 // max(top, 1), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=1.0))
        arr = ((arr - lo) / (hi - lo or 1.0) * 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def centre_square(width: float, height: float) -> tuple[float, float, float]:
    """(left, top, side) of the centre square a `width` x `height` frame is cropped to; the
    one definition of the crop, shared by the pixels and by the boxes mapped onto them."""
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, side


def _centre_square(img: Image.Image, size: int) -> Image.Image:
    """Shorter-side resize + centre crop, done as one resample of the centre square.

    Resampling only the source box that survives the crop (Pillow's `box`; the filter still
    reads the pixels just outside it, as a full resize would) skips the columns or rows the
    crop throws away: a quarter of the work for a 4:3 photo.
    """
    left, top, side = centre_square(*img.size)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side), reducing_gap=3.0)


MIN_VISIBLE_FRACTION = 0.25  # a box with less of its area inside the crop is dropped
MIN_VISIBLE_PX = 1.0  # ... and so is one less than a curated pixel wide or tall inside it


def curated_box(bbox: tuple[float, float, float, float], width: int, height: int,
                resolution: int) -> tuple[int, int, int, int] | None:
    """A source-pixel box `(x0, y0, x1, y1)` of a `width` x `height` image (as displayed)
    in the curated frame: mapped through the same centre crop and resize as the pixels,
    clipped to [0, resolution], corners rounded half up. None when (nearly) outside the crop:
    under MIN_VISIBLE_FRACTION of its area, or under MIN_VISIBLE_PX wide or tall, inside it.
    """
    left, top, side = centre_square(width, height)
    scale = resolution / side
    x0, y0, x1, y1 = ((bbox[0] - left) * scale, (bbox[1] - top) * scale,
                      (bbox[2] - left) * scale, (bbox[3] - top) * scale)
    cx0, cy0 = min(max(x0, 0.0), resolution), min(max(y0, 0.0), resolution)
    cx1, cy1 = min(max(x1, 0.0), resolution), min(max(y1, 0.0), resolution)
    if cx1 - cx0 < MIN_VISIBLE_PX or cy1 - cy0 < MIN_VISIBLE_PX:
        return None
    if (cx1 - cx0) * (cy1 - cy0) < MIN_VISIBLE_FRACTION * (x1 - x0) * (y1 - y0):
        return None
    return tuple(int(math.floor(v + 0.5)) for v in (cx0, cy0, cx1, cy1))  # width >= 1 px survives rounding


def _metadata_blocks(info: dict) -> tuple[bytes, ...]:
    """XMP a decoder extracted (PNG iTXt/zTXt/tEXt under the XMP keys), and ImageMagick's hex
    "Raw profile type xmp" text chunk decoded. A raw profile that is not hex is unreadable."""
    blocks = []
    for key, value in info.items():
        if not isinstance(key, str):
            continue
        if key in _XMP_INFO_KEYS:
            blocks.append(value if isinstance(value, bytes) else str(value).encode("utf-8", "replace"))
        elif key.lower().startswith("raw profile type") and "xmp" in key.lower():
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            lines = text.strip().splitlines()
            try:
                blocks.append(bytes.fromhex("".join(lines[2:])))  # "xmp", the length, then hex
            except ValueError:
                raise UnreadableMetadata(f"PNG {key!r} chunk is not hex-encoded XMP") from None
    return tuple(blocks)


JPEG_MIN_PIXELS_PER_BYTE = 512  # 0.016 bits/pixel: 4x below the smallest complete baseline JPEG


def decode_image(data: bytes, cfg: DecodeConfig, hash_kind: str | None = None, mirror: bool = False) -> DecodedImage:
    """Decode and normalise one image or raise `Reject` with the specific reason.

    With `hash_kind` ("phash"/"dhash") the perceptual hash is taken from the whole frame,
    before the centre crop, so resizes that change the aspect ratio still match; with
    `mirror` too, the hash of the mirrored frame (a flipped copy matches through it).
    """
    if not data:
        raise Reject(RejectReason.EMPTY_FILE, "zero-byte file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise Reject(RejectReason.DECOMPRESSION_BOMB, str(exc)) from exc
        except Image.DecompressionBombWarning as exc:
            raise Reject(RejectReason.DECOMPRESSION_BOMB, str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise Reject(RejectReason.NOT_AN_IMAGE, "not a recognised image format") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise Reject(RejectReason.NOT_AN_IMAGE, f"cannot open: {exc}") from exc
        fmt = img.format or "unknown"
        width, height = img.size
        if width * height > cfg.max_pixels:
            raise Reject(RejectReason.DECOMPRESSION_BOMB,
                         f"{width}x{height} = {width * height:,} pixels > max_pixels {cfg.max_pixels:,}")
        if fmt == "JPEG" and len(data) * JPEG_MIN_PIXELS_PER_BYTE < width * height:
            # a complete baseline JPEG needs a few bits per 8x8 block at least; libjpeg pads a
            # body cut short with grey and only warns, so a tiny file claiming a huge frame would
            # decode "fine" to a flat image
            raise Reject(RejectReason.TRUNCATED_IMAGE,
                         f"{len(data):,} bytes cannot hold a complete {width}x{height} JPEG "
                         f"(at least {width * height // JPEG_MIN_PIXELS_PER_BYTE:,}): the body is cut short")
        if cfg.check_tdm:
            try:
                mark = find_tdm_opt_out(data, _metadata_blocks(img.info))
            except UnreadableMetadata as exc:
                raise Reject(RejectReason.METADATA_UNREADABLE, str(exc)) from None
            if mark:
                raise Reject(RejectReason.TDM_OPT_OUT, mark)
        if min(width, height) < cfg.min_side:
            raise Reject(RejectReason.TOO_SMALL, f"{width}x{height}: shorter side < min_side {cfg.min_side}")
        aspect = max(width, height) / min(width, height)
        if aspect > cfg.max_aspect_ratio:
            raise Reject(RejectReason.BAD_ASPECT_RATIO, f"{width}x{height}: aspect {aspect:.2f} > {cfg.max_aspect_ratio}")
        mode = img.mode
        if cfg.use_draft and fmt == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
            short = min(width, height)
            want = (math.ceil(width * cfg.resolution / short), math.ceil(height * cfg.resolution / short))
            img.draft(img.mode if img.mode in ("RGB", "L") else None, want)
        try:
            img.load()
        except Image.DecompressionBombError as exc:
            raise Reject(RejectReason.DECOMPRESSION_BOMB, str(exc)) from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            message = str(exc)
            if "truncated" in message or "broken data stream" in message or isinstance(exc, EOFError):
                raise Reject(RejectReason.TRUNCATED_IMAGE, f"truncated image data: {message}") from exc
            raise Reject(RejectReason.NOT_AN_IMAGE, f"decode failed: {message}") from exc
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        if img.getexif().get(_ORIENTATION) in _TRANSPOSING:  # record the displayed frame, which
            width, height = height, width  # manifest boxes refer to and the crop is cut from
        img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
    phash = phash_mirror = None
    if hash_kind:
        value, mirrored = dedup_hash.image_hashes(rgb, hash_kind)
        phash, phash_mirror = dedup_hash.hash_to_hex(value), dedup_hash.hash_to_hex(mirrored) if mirror else None
    square = _centre_square(rgb, cfg.resolution)
    pixels = square.tobytes()
    out = io.BytesIO()
    square.save(out, "JPEG", quality=cfg.jpeg_quality)
    return DecodedImage(out.getvalue(), hashlib.sha256(pixels).hexdigest(), fmt, width, height, mode, phash,
                        phash_mirror)


class DecodeImages(StageDoFn):
    """Decode, filter by size/aspect, reject TDM opt-outs, normalise; drops the source bytes."""

    stage = Stage.DECODE

    def __init__(self, cfg: DecodeConfig, hash_kind: str | None = "phash", mirror: bool = False):
        super().__init__()
        self.cfg = cfg
        self.hash_kind = hash_kind
        self.mirror = mirror

    def handle(self, asset: Asset) -> Asset:
        decoded = decode_image(asset.source_bytes or b"", self.cfg, self.hash_kind, self.mirror)
        return asset.replace(
            source_bytes=None,
            image=decoded.jpeg,
            pixel_sha256=decoded.pixel_sha256,
            source_format=decoded.format,
            source_width=decoded.width,
            source_height=decoded.height,
            source_mode=decoded.mode,
            phash=decoded.phash,
            phash_mirror=decoded.phash_mirror,
        )
