"""What an image says about where it came from: its C2PA manifest, this service's invisible watermark, and its
``parameters`` text. One function for ``POST /verify`` and for ``sdxl-bento verify FILE`` (offline), so both
answer the same.

The file is untrusted: the manifest is read by the C2PA library from the bytes as they are (nothing is fetched),
the pixels are decoded only when the header's size is within the bound (``uploads.decode_image``), and a file
too large to decode still gets its manifest read.
"""

from __future__ import annotations

import io
from typing import Optional

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidRequest
from .images import read_parameters
from .provenance import C2paReport, ManifestReader
from .uploads import FORMATS, decode_image
from .watermark import WATERMARK_MIN_MATCH, detect

MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class VerifyWire(BaseModel):
    """``POST /verify`` as JSON. The file itself may be sent instead: as the body (``image/png``, ``image/jpeg``,
    ``image/webp``, ``application/octet-stream``) or as ``multipart/form-data`` with one file field ``image``."""

    model_config = ConfigDict(extra="forbid")
    image: Optional[str] = Field(default=None, description="The image, base64 (a data: URL is accepted); required "
                                                           "in a JSON body.")


class WatermarkReport(BaseModel):
    checked: bool = Field(description="False when the pixels were not read (too small or too large); see reason.")
    present: bool = False
    matched_bits: int = Field(default=0, description="Bits of SDXL's 48-bit message read back from the pixels.")
    bits: int = 48
    threshold: int = Field(default=WATERMARK_MIN_MATCH, description="Bits that must match to call it present.")
    reason: Optional[str] = None


class VerifyReport(BaseModel):
    format: str = Field(description="The image's media type.")
    width: int
    height: int
    bytes: int
    c2pa: C2paReport
    watermark: WatermarkReport
    parameters: Optional[str] = Field(default=None, description="The embedded parameters text (PNG text chunk or "
                                                                "EXIF UserComment), when present.")


def inspect(data: bytes, reader: ManifestReader, *, max_pixels: int, max_bytes: int) -> VerifyReport:
    """The report on one PNG, JPEG or WebP file; ``InvalidRequest`` for anything else."""
    if len(data) > max_bytes:
        raise InvalidRequest(f"image: the file is {len(data)} bytes, more than the limit of {max_bytes}", field="image")
    try:
        header = Image.open(io.BytesIO(data), formats=list(FORMATS))
        width, height, kind = header.width, header.height, header.format
    except Exception:  # what it is, said the way an upload's refusal says it
        decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
        raise InvalidRequest("image: not a PNG, JPEG or WebP image", field="image") from None
    try:
        parameters = read_parameters(data)
    except Exception:  # unreadable metadata is not an answer to refuse
        parameters = None
    if width * height > max_pixels:
        watermark = WatermarkReport(checked=False, reason=f"{width}x{height} is more than {max_pixels} pixels: "
                                                          "the pixels were not decoded")
    else:
        try:
            found = detect(decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes))
        except InvalidRequest as exc:  # a damaged file still gets its manifest read
            watermark = WatermarkReport(checked=False, reason=f"the pixels could not be decoded: {exc.message}")
        else:
            watermark = WatermarkReport(checked=found.checked, present=found.present, matched_bits=found.matched,
                                        bits=found.bits, reason=None if found.checked else
                                        "smaller than 256x256 pixels: too small to carry the watermark")
    return VerifyReport(format=MEDIA_TYPES[kind], width=width, height=height, bytes=len(data),
                        c2pa=reader.read(data), watermark=watermark, parameters=parameters)
