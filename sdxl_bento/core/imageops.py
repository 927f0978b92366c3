"""What is done to an uploaded image and mask before they reach the GPU (PIL only, no torch): the resize modes
of image-to-image, and the mask's blur, inversion and the "fill" start of inpainting.

Each is AUTOMATIC1111's operation of the same name, written for this service: ``resize`` (Just resize, Crop and
resize, Resize and fill), ``blur_mask`` (mask blur), ``invert_mask`` (inpainting_mask_invert), ``fill_masked``
(inpainting_fill "fill": the masked area painted with the blurred colours that surround it).
"""

from __future__ import annotations

from PIL import Image, ImageFilter, ImageOps


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def resize(image: Image.Image, width: int, height: int, mode: str = "stretch",
           resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """``image`` as exactly ``width`` x ``height``: ``stretch`` (any aspect ratio), ``crop`` (cover, then
    centre-crop) or ``fill`` (fit inside, then the two strips left over take the image's edge rows or columns,
    stretched)."""
    if mode == "stretch" or image.size == (width, height):
        return image.resize((width, height), resample) if image.size != (width, height) else image
    scale_cover = max(width / image.width, height / image.height)
    scale_fit = min(width / image.width, height / image.height)
    if mode == "crop":
        w, h = max(width, round(image.width * scale_cover)), max(height, round(image.height * scale_cover))
        scaled = image.resize((w, h), resample)
        left, top = (w - width) // 2, (h - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    if mode != "fill":
        raise ValueError(f"unknown resize mode {mode!r}")
    w, h = max(1, round(image.width * scale_fit)), max(1, round(image.height * scale_fit))
    scaled = image.resize((w, h), resample)
    out = Image.new(scaled.mode, (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    out.paste(scaled, (left, top))
    if h < height:  # strips above and below: the first and the last row, stretched
        if top > 0:
            out.paste(scaled.crop((0, 0, w, 1)).resize((width, top), resample), (0, 0))
        if height - top - h > 0:
            out.paste(scaled.crop((0, h - 1, w, h)).resize((width, height - top - h), resample), (0, top + h))
    if w < width:  # strips left and right: the first and the last column, stretched
        if left > 0:
            out.paste(scaled.crop((0, 0, 1, h)).resize((left, height), resample), (0, 0))
        if width - left - w > 0:
            out.paste(scaled.crop((w - 1, 0, w, h)).resize((width - left - w, height), resample), (left + w, 0))
    return out


def prepare_mask(mask: Image.Image, width: int, height: int, *, mode: str = "stretch", blur: int = 0,
                 invert: bool = False) -> Image.Image:
    """A mask as grayscale ``width`` x ``height`` (resized as the image is), inverted when asked, then blurred by
    ``blur`` pixels; white is repainted."""
    mask = resize(_gray(mask), width, height, mode, Image.Resampling.BILINEAR)
    if invert:
        mask = ImageOps.invert(mask)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return mask


def _gray(mask: Image.Image) -> Image.Image:
    if mask.mode in ("RGBA", "LA"):  # transparent pixels are black (kept), whatever colour they hold
        rgba = mask.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    return mask.convert("L") if mask.mode != "L" else mask


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``image`` with its masked area (white in ``mask``) painted from the colours around it: the unmasked
    pixels, blurred at shrinking radii, are laid over one another (premultiplied by their coverage, so the
    masked area takes the colours of what surrounds it), coarse first; the unmasked area keeps its pixels."""
    image = _rgb(image)
    keep = ImageOps.invert(_gray(mask).resize(image.size, Image.Resampling.BILINEAR))
    known = image.copy()
    known.putalpha(keep)
    premultiplied = known.convert("RGBa")
    canvas = Image.new("RGBA", image.size, (0, 0, 0, 0))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = premultiplied.filter(ImageFilter.GaussianBlur(radius)) if radius else premultiplied
        layer = blurred.convert("RGBA")
        for _ in range(repeats):
            canvas = Image.alpha_composite(canvas, layer)
    filled = Image.new("RGB", image.size, (127, 127, 127))
    filled.paste(canvas.convert("RGB"), mask=canvas.getchannel("A"))
    return Image.composite(image, filled, keep)


def transparent_to_mask(image: Image.Image) -> Image.Image | None:
    """OpenAI's convention: the fully transparent pixels of an image are the area to edit. A grayscale mask
    (white = edit), or None when the image has no alpha channel."""
    if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
        return None
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0).convert("L")
