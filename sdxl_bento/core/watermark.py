"""SDXL's reference invisible watermark (``invisible-watermark``, dwtDct, Stability's 48 bits), applied exactly as
diffusers and Stability's reference code apply it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

# Stability AI's SDXL watermark (generative-models' streamlit_helpers.py; diffusers' WATERMARK_MESSAGE).
WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110
WATERMARK_BITS = [int(bit) for bit in bin(WATERMARK_MESSAGE)[2:]]
_MIN_SIDE = 256  # the encoder cannot embed 48 bits in less; diffusers skips such images too


class Watermarker:
    """SDXL's invisible watermark on PIL images (``apply`` is a no-op when disabled).

    Encoded as the reference code does (diffusers' ``StableDiffusionXLWatermarker``: BGR float
    pixels 0..255, dwtDct), then rounded to 8 bits. Images under 256 px on a side are left as they
    are. dwtDct is weak by design: it survives neither resizing nor heavy JPEG, and on small images
    a few of the 48 bits may read wrong, so detectors compare bit agreement against a threshold.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._encoder = None
        if enabled:
            try:
                from imwatermark import WatermarkEncoder
            except ImportError as exc:
                raise RuntimeError(
                    "the invisible watermark needs the 'invisible-watermark' package (with "
                    "'opencv-python-headless'): pip install invisible-watermark opencv-python-headless, "
                    "or turn the watermark off") from exc
            self._encoder = WatermarkEncoder()
            self._encoder.set_watermark("bits", WATERMARK_BITS)

    def apply(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        if not self.enabled:
            return list(images)
        return [self._mark(image) for image in images]

    def _mark(self, image: Image.Image) -> Image.Image:
        import numpy as np
        from PIL import Image

        if min(image.size) < _MIN_SIDE:
            return image
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
        bgr = np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1]
        encoded = self._encoder.encode(np.ascontiguousarray(bgr), "dwtDct")
        rgb = np.clip(np.rint(encoded[:, :, ::-1]), 0, 255).astype(np.uint8)
        out = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
        if alpha is not None:
            out.putalpha(alpha)
        out.info.update(image.info)
        return out


WATERMARK_MIN_MATCH = 41
"""Bits of the 48 that must read back for ``detect`` to call the watermark present. On an image without it the bits
read back are about as good as coin flips: 41 or more of 48 by chance has a probability of about 3e-7."""


@dataclass(frozen=True)
class Detection:
    checked: bool
    """False when the image is too small to carry the watermark (under 256x256 pixels)."""
    present: bool = False
    matched: int = 0
    """Bits of ``WATERMARK_BITS`` read back from the image."""
    bits: int = len(WATERMARK_BITS)


def detect(image: Image.Image) -> Detection:
    """Read the 48 bits back with invisible-watermark's ``WatermarkDecoder`` (dwtDct, as encoded: BGR float pixels)
    and compare them with SDXL's message."""
    import numpy as np
    from imwatermark import WatermarkDecoder

    if image.width * image.height < _MIN_SIDE * _MIN_SIDE:
        return Detection(checked=False)
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1])
    decoded = WatermarkDecoder("bits", len(WATERMARK_BITS)).decode(bgr, "dwtDct")
    matched = sum(int(bool(a) == bool(b)) for a, b in zip(decoded, WATERMARK_BITS))
    return Detection(checked=True, present=matched >= WATERMARK_MIN_MATCH, matched=matched)
