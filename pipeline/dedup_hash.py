"""Perceptual hashes of images as 64-bit ints, their hex form and Hamming distances.

The first job of near-dup dedup (docs/dedup.md): `dedup_search` finds pairs of these hashes
within a radius, `dedup_cluster` turns the pairs into clusters. No Beam.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

HASH_BITS = 64
HASH_KINDS = ("phash", "dhash")
_THUMBNAIL = {"phash": (32, 32), "dhash": (9, 8)}  # what imagehash shrinks to (hash_size 8)


def image_hash(image: Image.Image, kind: str = "phash") -> int:
    """64-bit perceptual hash of a decoded image as an int (bit 63 = first imagehash bit).

    imagehash is the reference implementation people compare against, so we use it and only
    change the representation: an int packs into a uint64 array, a bool matrix does not.
    """
    import imagehash  # local import: nothing heavy at import time

    if kind == "phash":
        h = imagehash.phash(image, hash_size=8)
    elif kind == "dhash":
        h = imagehash.dhash(image, hash_size=8)
    else:
        raise ValueError(f"unknown hash kind {kind!r}; expected one of {HASH_KINDS}")
    return int(str(h), 16)


def image_hashes(image: Image.Image, kind: str = "phash") -> tuple[int, int]:
    """(hash, mirror hash): the image's hash and its horizontally mirrored frame's, for
    flip-invariant near dedup (docs/dedup.md). Both come from one grey thumbnail, the one
    imagehash shrinks to: the first equals `image_hash(image)` bit for bit, the second is the
    hash of the mirrored thumbnail (one resize for both, not a second full-frame resize)."""
    if kind not in _THUMBNAIL:
        raise ValueError(f"unknown hash kind {kind!r}; expected one of {HASH_KINDS}")
    thumb = image.convert("L").resize(_THUMBNAIL[kind], Image.Resampling.LANCZOS)
    return image_hash(thumb, kind), image_hash(thumb.transpose(Image.Transpose.FLIP_LEFT_RIGHT), kind)


def image_hash_from_bytes(data: bytes, kind: str = "phash") -> int:
    """Hash encoded image bytes (see `image_hashes_from_bytes`)."""
    return image_hashes_from_bytes(data, kind)[0]


def image_hashes_from_bytes(data: bytes, kind: str = "phash") -> tuple[int, int]:
    """(hash, mirror hash) of encoded image bytes. JPEG `draft` decodes at reduced scale: the
    hash only looks at a 32x32 (pHash) or 9x8 (dHash) thumbnail, so full-resolution decoding
    is wasted work."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            img.draft("RGB", (256, 256))
        img.load()
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
            if img.mode == "RGBA":
                # composite on white so transparent regions hash like a flattened export
                background = Image.new("RGB", img.size, (255, 255, 255))
                background.paste(img, mask=img.getchannel("A"))
                img = background
        return image_hashes(img, kind)


def hash_to_hex(value: int) -> str:
    """16-hex-digit string, the form stored in `Asset.phash` and the ledger."""
    return f"{int(value) & 0xFFFFFFFFFFFFFFFF:016x}"


def hex_to_hash(text: str) -> int:
    """Inverse of `hash_to_hex`; rejects anything that is not a 64-bit hex value."""
    value = int(text, 16)
    if not 0 <= value < 1 << HASH_BITS:
        raise ValueError(f"not a 64-bit hash: {text!r}")
    return value


def popcount(x: np.ndarray) -> np.ndarray:
    """Bits set per uint64 (Hamming weight)."""
    return np.bitwise_count(x)


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Hamming distance between uint64 hashes (element-wise)."""
    return popcount(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))
