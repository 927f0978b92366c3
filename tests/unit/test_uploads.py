"""Uploaded images: what is decoded, and the clear 400s for everything else (checked before any pixel is)."""

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from sdxl_bento.core.uploads import decode_base64_image, decode_image
from sdxl_bento.errors import InvalidRequest

LIMITS = dict(max_pixels=1024 * 1024, max_bytes=1 << 20)


def encoded(fmt="PNG", size=(40, 30), mode="RGB", **kw):
    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 10) if mode == "RGB" else 0).save(buf, format=fmt, **kw)
    return buf.getvalue()


def declaring(width, height):
    """A small PNG whose header declares width x height (a decompression bomb's shape)."""
    data = bytearray(encoded("PNG", (8, 8)))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_decode(fmt):
    image = decode_image(encoded(fmt), **LIMITS)
    assert image.size == (40, 30) and image.format in (fmt, None)
    assert image.getpixel((1, 1))[0] > 150  # pixels loaded, not just a header


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    image = decode_image(encoded("JPEG", (40, 30), exif=exif.tobytes()), **LIMITS)
    assert image.size == (30, 40)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, world" * 10, "not an image"),
    (b"%PDF-1.7 ...", "a PDF"),
    (encoded("GIF"), "GIF image, which is not supported; send a PNG, JPEG or WebP"),
    (encoded("BMP"), "BMP image, which is not supported"),
    (encoded("TIFF"), "TIFF image, which is not supported"),
])
def test_not_an_accepted_image(data, message):
    with pytest.raises(InvalidRequest, match=message) as info:
        decode_image(data, field="init_image", **LIMITS)
    assert info.value.status == 400 and info.value.message.startswith("init_image: ")
    assert info.value.details == {"field": "init_image"}


def test_too_many_bytes():
    with pytest.raises(InvalidRequest, match=r"more than the limit of 100\b"):
        decode_image(encoded(), max_pixels=10**6, max_bytes=100)


def test_too_many_pixels_is_refused_from_the_header():
    """9000x9000 declared in a 100-byte file: refused on its declared size, never decoded (decoding would
    allocate 243 MB, then fail as truncated)."""
    with pytest.raises(InvalidRequest, match=r"9000x9000 = 81000000 pixels, more than the limit of 1048576"):
        decode_image(declaring(9000, 9000), **LIMITS)
    with pytest.raises(InvalidRequest, match="too many pixels"):  # beyond PIL's own guard: refused by Image.open
        decode_image(declaring(100000, 100000), **LIMITS)
    with pytest.raises(InvalidRequest, match="more than the limit of 2399"):
        decode_image(encoded(size=(60, 40)), max_pixels=2399, max_bytes=1 << 20)
    assert decode_image(encoded(size=(60, 40)), max_pixels=2400, max_bytes=1 << 20).size == (60, 40)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_file(fmt):
    noisy = Image.effect_noise((64, 64), 80).convert("RGB")  # incompressible, so a cut lands inside the pixels
    buf = io.BytesIO()
    noisy.save(buf, format=fmt)
    data = buf.getvalue()
    for cut in (len(data) // 2, 40):
        with pytest.raises(InvalidRequest, match="truncated"):
            decode_image(data[:cut], **LIMITS)


def test_base64_and_data_urls():
    png = encoded()
    text = base64.b64encode(png).decode()
    assert decode_base64_image(text, **LIMITS).size == (40, 30)
    assert decode_base64_image("data:image/png;base64," + text, **LIMITS).size == (40, 30)
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    assert decode_base64_image(wrapped, **LIMITS).size == (40, 30)
    with pytest.raises(InvalidRequest, match="mask_image: not valid base64"):
        decode_base64_image("not base64 at all!", field="mask_image", **LIMITS)
    with pytest.raises(InvalidRequest, match="more than the limit of 100"):
        decode_base64_image("A" * 10_000_000, max_pixels=10**6, max_bytes=100)  # refused before decoding
    with pytest.raises(InvalidRequest, match="not an image"):
        decode_base64_image(base64.b64encode(b"plain text").decode(), **LIMITS)
