"""The image store (files on local disk, by random UUID) and image encoding with infotext.

Each image carries its generation parameters in the AUTOMATIC1111 ``parameters`` convention: a
PNG text chunk, or EXIF UserComment for JPEG and WebP, so the usual tools can read them back.
Ids are parsed as UUIDs before any path is built, so no path outside the store can be read.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .errors import InvalidRequest, NotFound

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
SAMPLER_LABELS = {"euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M",
                  "dpmpp_2m_karras": "DPM++ 2M Karras", "ddim": "DDIM", "unipc": "UniPC"}


def infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """The ``parameters`` text: prompt, negative prompt, then ``Key: value`` pairs (A1111 layout)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    pairs = []
    for key, value in params.items():
        text = str(value)
        if any(c in text for c in ",:\n\""):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        pairs.append(f"{key}: {text}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def encode(image: Image.Image, fmt: str, quality: int = 90, parameters: str | None = None) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    elif fmt in ("jpeg", "webp"):
        exif = Image.Exif()
        if parameters:
            exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        image.convert("RGB").save(buffer, format=fmt.upper(), quality=quality, exif=exif.tobytes())
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buffer.getvalue()


def read_parameters(data: bytes) -> str | None:
    """The embedded ``parameters`` text of an encoded image, or None."""
    image = Image.open(io.BytesIO(data))
    if image.format == "PNG":
        return image.info.get("parameters")
    raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(raw, bytes) and raw.startswith(b"UNICODE\0"):
        return raw[8:].decode("utf-16-be")
    return raw if isinstance(raw, str) else None


def parse_id(image_id: str) -> str:
    """The canonical form of an image id; anything that is not a UUID is refused."""
    try:
        return str(uuid.UUID(str(image_id)))
    except ValueError:
        raise InvalidRequest(f"{image_id!r} is not a valid image id (a UUID)") from None


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, fmt: str) -> str:
        """Write atomically (temporary file, then rename) and return the new id."""
        image_id = str(uuid.uuid4())
        final = self.root / f"{image_id}.{fmt}"
        tmp = self.root / f".{image_id}.{fmt}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, final)
        return image_id

    def find(self, image_id: str) -> tuple[Path, str]:
        """(path, media type) of a stored image; NotFound when absent."""
        canonical = parse_id(image_id)
        for fmt, media_type in MEDIA_TYPES.items():
            path = self.root / f"{canonical}.{fmt}"
            if path.is_file():
                return path, media_type
        raise NotFound(f"no image with id {canonical}")

    def load(self, image_id: str) -> Image.Image:
        path, _ = self.find(image_id)
        with Image.open(path) as image:
            return image.convert("RGB")
