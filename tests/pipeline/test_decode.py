"""Safe decode on real photos and every awkward input we know of."""

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DecodeConfig
from pipeline.records import RejectReason
from pipeline.stages.base import Reject
from pipeline.stages.decode import decode_image
from pipeline.stages.licenses import find_tdm_opt_out

CFG = DecodeConfig()


@pytest.fixture(scope="module")
def photo(demo_dir) -> Image.Image:
    return Image.open(sorted((demo_dir / "images").glob("*.jpg"))[0]).convert("RGB")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def reject_reason(data: bytes, cfg: DecodeConfig = CFG) -> RejectReason:
    with pytest.raises(Reject) as err:
        decode_image(data, cfg)
    return err.value.reason


def as_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def test_real_photo_normalised_to_square_jpeg(demo_dir):
    for path in sorted((demo_dir / "images").glob("*.jpg"))[:5]:
        out = decode_image(path.read_bytes(), CFG)
        img = Image.open(io.BytesIO(out.jpeg))
        assert img.format == "JPEG" and img.size == (256, 256) and img.mode == "RGB"
        assert out.width * out.height > 256 * 256 and len(out.pixel_sha256) == 64


def test_draft_decode_matches_full_decode(photo):
    data = encode(photo, "JPEG", quality=95)
    fast = as_array(decode_image(data, CFG).jpeg)
    full = as_array(decode_image(data, DecodeConfig(use_draft=False)).jpeg)
    assert np.abs(fast - full).mean() < 4.0  # same picture; draft only changes the DCT scale


@pytest.mark.parametrize("convert", [
    lambda im: encode(im.convert("CMYK"), "JPEG"),
    lambda im: encode(im.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
    lambda im: encode(im.convert("RGBA"), "PNG"),
    lambda im: encode(im.convert("LA"), "PNG"),
    lambda im: encode(im.convert("L"), "JPEG"),
    lambda im: encode(im, "WEBP", quality=90),
    lambda im: encode(im, "BMP"),
    lambda im: encode(im, "TIFF"),
])
def test_every_mode_becomes_rgb(photo, convert):
    out = decode_image(convert(photo), CFG)
    assert Image.open(io.BytesIO(out.jpeg)).mode == "RGB"


def test_sixteen_bit_png_keeps_its_tones(photo):
    grey = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    img16 = Image.fromarray(grey.astype(np.uint16))
    out = as_array(decode_image(encode(img16, "PNG"), CFG).jpeg)
    ref = as_array(decode_image(encode(photo.convert("L"), "PNG"), CFG).jpeg)
    assert np.abs(out - ref).mean() < 3.0


def test_transparent_pixels_become_white(photo):
    rgba = photo.convert("RGBA")
    rgba.putalpha(0)
    out = as_array(decode_image(encode(rgba, "PNG"), CFG).jpeg)
    assert out.mean() > 250


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    wide = photo.resize((400, 300))
    marked = decode_image(encode(wide, "JPEG", exif=exif.tobytes(), quality=95), DecodeConfig(resolution=64))
    upright = decode_image(encode(wide.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95),
                           DecodeConfig(resolution=64))
    assert np.abs(as_array(marked.jpeg) - as_array(upright.jpeg)).mean() < 6.0


def test_misnamed_and_format_sniffed_by_content(photo):
    out = decode_image(encode(photo, "PNG"), CFG)  # bytes are PNG whatever the file is called
    assert out.format == "PNG"


@pytest.mark.parametrize("make,reason", [
    (lambda im: b"", RejectReason.EMPTY_FILE),
    (lambda im: b"GIF89a but not really" * 10, RejectReason.NOT_AN_IMAGE),
    (lambda im: b"%PDF-1.4\n" + b"0" * 500, RejectReason.NOT_AN_IMAGE),
    (lambda im: encode(im, "JPEG")[:3000], RejectReason.TRUNCATED_IMAGE),
    (lambda im: encode(im.resize((100, 90)), "JPEG"), RejectReason.TOO_SMALL),
    (lambda im: encode(im.resize((900, 200)), "JPEG"), RejectReason.BAD_ASPECT_RATIO),
])
def test_bad_inputs(photo, make, reason):
    assert reject_reason(make(photo)) == reason


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, payload):
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")
    header = chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0]))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decompression_bombs_refused_from_the_header():
    assert reject_reason(_png_header_only(30000, 30000)) == RejectReason.DECOMPRESSION_BOMB
    # below Pillow's own limit but above ours
    assert reject_reason(_png_header_only(5000, 5000), DecodeConfig(max_pixels=20_000_000)) == RejectReason.DECOMPRESSION_BOMB


def test_demo_bomb_file(demo_dir):
    data = (demo_dir / "bad" / "bomb.png").read_bytes()
    assert len(data) < 100_000 and reject_reason(data) == RejectReason.DECOMPRESSION_BOMB


XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       '<rdf:Description xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/" xmlns:tdm="http://www.w3.org/ns/tdmrep/" '
       '{attrs}>{body}</rdf:Description></rdf:RDF></x:xmpmeta>')


@pytest.mark.parametrize("xmp,blocked", [
    (XMP.format(attrs="", body="<plus:DataMining>http://ns.useplus.org/ldf/vocab/DMI-PROHIBITED</plus:DataMining>"), True),
    (XMP.format(attrs="", body="<plus:DataMining>http://ns.useplus.org/ldf/vocab/DMI-PROHIBITED-SEECONSTRAINT</plus:DataMining>"), True),
    (XMP.format(attrs='tdm:reservation="1"', body=""), True),
    (XMP.format(attrs="", body="<plus:DataMining>http://ns.useplus.org/ldf/vocab/DMI-ALLOWED</plus:DataMining>"), False),
    (XMP.format(attrs='tdm:reservation="0"', body=""), False),
])
def test_tdm_marks_in_jpeg_xmp(photo, xmp, blocked):
    data = encode(photo, "JPEG", xmp=xmp.encode())
    if blocked:
        assert reject_reason(data) == RejectReason.TDM_OPT_OUT
    else:
        decode_image(data, CFG)


def test_tdm_mark_in_compressed_png_itxt_is_found(photo):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    body = "<plus:DataMining>http://ns.useplus.org/ldf/vocab/DMI-PROHIBITED-AIMLTRAINING</plus:DataMining>"
    info.add_itxt("XML:com.adobe.xmp", XMP.format(attrs="", body=body), zip=True)
    data = encode(photo, "PNG", pnginfo=info)
    assert b"DMI-PROHIBITED" not in data  # invisible to a raw byte scan
    assert reject_reason(data) == RejectReason.TDM_OPT_OUT


@pytest.mark.parametrize("xmp,reason", [
    # TDMRep under a prefix other than tdm: (the namespace is what counts)
    (XMP.replace('xmlns:tdm=', 'xmlns:w3tdm=').format(attrs='w3tdm:reservation="1"', body=""), "TDM_OPT_OUT"),
    (XMP.replace('xmlns:tdm=', 'xmlns:r=').format(attrs="", body="<r:reservation>1</r:reservation>"), "TDM_OPT_OUT"),
    (XMP.replace('xmlns:plus=', 'xmlns:p=').format(
        attrs="", body='<p:DataMining rdf:resource="http://ns.useplus.org/ldf/vocab/DMI-PROHIBITED-AIMLTRAINING"/>'),
     "TDM_OPT_OUT"),
    # a packet that cannot be parsed fails closed, with its own reason
    ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><oops></rdf:RDF></x:xmpmeta>', "METADATA_UNREADABLE"),
    ('<!DOCTYPE x [<!ENTITY a "aaaa">]><x:xmpmeta xmlns:x="adobe:ns:meta/">&a;</x:xmpmeta>', "METADATA_UNREADABLE"),
    (XMP.replace('xmlns:tdm=', 'xmlns:w3tdm=').format(attrs='w3tdm:reservation="0"', body=""), None),
])
def test_xmp_is_parsed_with_namespaces_and_fails_closed(photo, xmp, reason):
    data = encode(photo, "JPEG", xmp=xmp.encode())
    if reason is None:
        decode_image(data, CFG)
    else:
        assert reject_reason(data) == RejectReason[reason]


def test_xmp_in_a_png_raw_profile_chunk_is_found(photo):
    """ImageMagick writes XMP to PNG as a hex "Raw profile type xmp" tEXt/zTXt chunk."""
    from PIL.PngImagePlugin import PngInfo

    xmp = XMP.format(attrs='tdm:reservation="1"', body="").encode()
    for compressed in (False, True):
        info = PngInfo()
        payload = f"\nxmp\n{len(xmp):8d}\n" + "\n".join(xmp.hex()[i:i + 72] for i in range(0, len(xmp.hex()), 72)) + "\n"
        info.add_text("Raw profile type xmp", payload, zip=compressed)
        data = encode(photo, "PNG", pnginfo=info)
        assert b"reservation" not in data  # hex: invisible to a raw byte scan
        assert reject_reason(data) == RejectReason.TDM_OPT_OUT
    info = PngInfo()
    info.add_text("Raw profile type xmp", "\nxmp\n      10\nnot hex at all\n")
    assert reject_reason(encode(photo, "PNG", pnginfo=info)) == RejectReason.METADATA_UNREADABLE


def test_c2pa_training_mining_assertion():
    assert find_tdm_opt_out(b"..jumb..c2pa.training-mining..c2pa.ai_training..use..notAllowed..")
    assert find_tdm_opt_out(b"..cawg.training-mining..constrained..")
    assert find_tdm_opt_out(b"..c2pa.training-mining..c2pa.ai_training..use..allowed..") is None
