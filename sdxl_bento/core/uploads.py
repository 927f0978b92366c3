"""Uploaded images (img2img and inpainting inputs): decoded only when they are safe to decode.

An upload is untrusted: a few kilobytes of PNG can declare gigapixels (a decompression bomb), a
"PNG" can be anything, a file can end half way. Everything is checked in the order that costs
least: the byte count, the format and the declared size (``Image.open`` reads only the header),
and only then are the pixels decoded. Every failure is an ``InvalidRequest`` (400) naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InvalidRequest

FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}
"""PIL format name -> the name messages use."""

# PIL's own bomb guard, in case something turned it off: ``Image.open`` refuses more than twice this many pixels
# outright. Our ``max_pixels`` check (after the header, before any pixel is decoded) is the stricter one.
if Image.MAX_IMAGE_PIXELS is None:
    Image.MAX_IMAGE_PIXELS = 89_478_485  # PIL's default (about 0.25 GiB of 24-bit pixels)

_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def decode_image(data: bytes, *, max_pixels: int, max_bytes: int, field: str = "image") -> Image.Image:
    """A PNG, JPEG or WebP upload as a loaded PIL image (EXIF orientation applied), or ``InvalidRequest``."""
    if not data:
        raise InvalidRequest(f"{field}: the image is empty", field=field)
    if len(data) > max_bytes:
        raise InvalidRequest(f"{field}: the image is {len(data)} bytes, more than the limit of {max_bytes}",
                             field=field)
    try:
        image = Image.open(io.BytesIO(data), formats=list(FORMATS))  # reads the header only
    except UnidentifiedImageError:
        claimed = _claimed_format(data)
        message = (f"the {claimed} image is truncated or corrupt" if claimed
                   else f"{_what(data)}; send a PNG, JPEG or WebP image")
        raise InvalidRequest(f"{field}: {message}", field=field) from None
    except Image.DecompressionBombError:
        raise InvalidRequest(f"{field}: the image declares too many pixels (more than {max_pixels})",
                             field=field) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest(f"{field}: the image is truncated or corrupt ({exc})", field=field) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidRequest(f"{field}: the image has no pixels ({width}x{height})", field=field)
    if width * height > max_pixels:
        raise InvalidRequest(f"{field}: the image is {width}x{height} = {width * height} pixels, more than the "
                             f"limit of {max_pixels}", field=field)
    try:
        image.load()
    except Image.DecompressionBombError:
        raise InvalidRequest(f"{field}: the image declares too many pixels (more than {max_pixels})",
                             field=field) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() or isinstance(exc, EOFError) else "corrupt"
        raise InvalidRequest(f"{field}: the {FORMATS.get(image.format, image.format)} image is {reason} ({exc})",
                             field=field) from None
    try:
        transposed = ImageOps.exif_transpose(image)  # phone photos: stored sideways, with an orientation tag
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        transposed = None  # unreadable EXIF: the pixels as stored
    return transposed if transposed is not None else image


def decode_base64_image(text: str, *, max_pixels: int, max_bytes: int, field: str = "image") -> Image.Image:
    """``decode_image`` for base64 text (a ``data:image/...;base64,`` URL prefix is accepted)."""
    return decode_image(base64_bytes(text, max_bytes=max_bytes, field=field), max_pixels=max_pixels,
                        max_bytes=max_bytes, field=field)


def base64_bytes(text: str, *, max_bytes: int, field: str = "image") -> bytes:
    """The bytes of base64 text (a ``data:image/...;base64,`` URL prefix is accepted), refused before decoding
    when they would be more than ``max_bytes``."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{field}: expected base64 text", field=field)
    text = _DATA_URL.sub("", text.strip(), count=1)
    text = re.sub(r"\s+", "", text)
    # Refuse before decoding: 4 characters of base64 carry 3 bytes.
    if len(text) // 4 * 3 - 2 > max_bytes:
        raise InvalidRequest(f"{field}: the image is about {len(text) // 4 * 3} bytes, more than the limit of "
                             f"{max_bytes}", field=field)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field}: not valid base64", field=field) from None


def _what(data: bytes) -> str:
    """What an unidentified upload looks like, for the message."""
    signatures = {b"GIF8": "a GIF image, which is not supported", b"BM": "a BMP image, which is not supported",
                  b"II*\x00": "a TIFF image, which is not supported",
                  b"MM\x00*": "a TIFF image, which is not supported",
                  b"%PDF": "a PDF, not an image"}
    for magic, what in signatures.items():
        if data.startswith(magic):
            return what
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "an AVIF/HEIC image, which is not supported"
    return "not an image"


def _claimed_format(data: bytes) -> str | None:
    """The accepted format an upload's first bytes claim, if any."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None
