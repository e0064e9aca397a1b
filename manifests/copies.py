"""The copies a stock delivery makes of a photo: what near-duplicate detection must catch
(a watermark, a crop, a mirror image, a small rotation, a smaller recompressed copy). The
dedup tests (tests/pipeline/test_dedup.py, test_neardup.py) and the quality benchmark
(benchmarks/dedup_quality.py) make their copies here, so they measure the same transforms."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def watermark(img: Image.Image) -> Image.Image:
    """Semi-transparent tiled text, the way stock previews are marked."""
    base = img.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    size = max(12, base.size[0] // 12)
    font = ImageFont.load_default(size=size)
    for y in range(0, base.size[1], size * 3):
        draw.text((size // 2, y), "(c) STOCKPHOTO", font=font, fill=(255, 255, 255, 110))
    return Image.alpha_composite(base, layer).convert("RGB")
