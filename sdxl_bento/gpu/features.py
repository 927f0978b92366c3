"""The image-changing features AUTOMATIC1111 users know, as the engine applies them to a diffusers pipeline:
tiling (circular padding), variation seeds (starting noise moved towards another seed's), the hires fix's
latent upscale, clip skip on both prompts, and "only masked" inpainting's crop and paste-back.

Each is a function or a context manager over plain torch modules, so the engine's batch loop stays readable
and each can be tested on the tiny synthetic models.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from PIL import Image


# -- tiling ------------------------------------------------------------------------------------------------------
@contextmanager
def circular(*modules: Any) -> Iterator[int]:
    """Inside the block every ``Conv2d`` of ``modules`` pads circularly (the image wraps around at its edges, so
    it tiles without seams); the modes they had come back after. Yields how many convolutions were changed."""
    changed: list[tuple[torch.nn.Conv2d, str]] = []
    seen: set[int] = set()
    for module in modules:
        if module is None:
            continue
        for layer in module.modules():
            if isinstance(layer, torch.nn.Conv2d) and id(layer) not in seen:
                seen.add(id(layer))
                changed.append((layer, layer.padding_mode))
                layer.padding_mode = "circular"
    try:
        yield len(changed)
    finally:
        for layer, mode in changed:
            layer.padding_mode = mode


# -- variation seeds ---------------------------------------------------------------------------------------------
def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``low`` (t=0) to ``high`` (t=1) of one image's noise (C, H, W), with the
    vectors taken along dim 1 as AUTOMATIC1111 takes them (so a variation seed gives the same mix there)."""
    low32, high32 = low.float(), high.float()
    low_n = low32 / torch.norm(low32, dim=1, keepdim=True)
    high_n = high32 / torch.norm(high32, dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > 0.9995:  # nearly parallel: a straight line is as good, and stable
        return (low32 * (1 - t) + high32 * t).to(low.dtype)
    omega = torch.acos(dot.clamp(-1, 1))
    so = torch.sin(omega)
    mixed = (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low32 + (torch.sin(t * omega) / so).unsqueeze(1) * high32
    return mixed.to(low.dtype)


def starting_noise(generators: list[torch.Generator], subseeds: list[int | None], strengths: list[float],
                   shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """The batch's starting latents, unscaled: each image's noise drawn from its own generator exactly as
    diffusers draws it (so an image without variation is the very same image), then, where it has a variation
    seed, moved towards that seed's noise by its strength."""
    latents = []
    for generator, subseed, strength in zip(generators, subseeds, strengths, strict=True):
        noise = torch.randn((1, *shape), generator=generator, device="cpu", dtype=dtype)
        if subseed is not None and strength > 0:
            other = torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(subseed), device="cpu",
                                dtype=dtype)
            noise = slerp(strength, noise[0], other[0]).unsqueeze(0)
        latents.append(noise)
    return torch.cat(latents)


# -- hires fix ---------------------------------------------------------------------------------------------------
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "latent": ("bilinear", False), "latent-antialiased": ("bilinear", True), "latent-bicubic": ("bicubic", False),
    "latent-bicubic-antialiased": ("bicubic", True), "latent-nearest": ("nearest", False),
    "latent-nearest-exact": ("nearest-exact", False),
}
"""Hires upscaler -> (``F.interpolate`` mode, antialias), as AUTOMATIC1111's latent upscale modes."""
PIXEL_MODES = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


def upscale_latents(latents: torch.Tensor, upscaler: str, size: tuple[int, int], crop: tuple[int, int]) -> torch.Tensor:
    """Latents (N, C, h, w) interpolated to ``size`` (h, w) and centre-cropped to ``crop`` (h, w)."""
    mode, antialias = LATENT_MODES[upscaler]
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(latents.float(), size=size, mode=mode, antialias=antialias, **kwargs).to(latents.dtype)
    top, left = (size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2
    return out[:, :, top:top + crop[0], left:left + crop[1]]


def upscale_image(image: Image.Image, upscaler: str, size: tuple[int, int], crop: tuple[int, int]) -> Image.Image:
    """An image resized to ``size`` (w, h) with PIL and centre-cropped to ``crop`` (w, h)."""
    out = image.resize(size, PIXEL_MODES[upscaler])
    left, top = (size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2
    return out.crop((left, top, left + crop[0], top + crop[1]))


# -- clip skip ---------------------------------------------------------------------------------------------------
def max_clip_skip(pipe: Any) -> int:
    """The largest clip skip the pipeline's text encoders allow (diffusers indexes hidden state -(skip + 1))."""
    layers = [enc.config.num_hidden_layers for enc in (getattr(pipe, "text_encoder", None),
                                                       getattr(pipe, "text_encoder_2", None)) if enc is not None]
    return min(layers) if layers else 1


def embeddings(pipe: Any, prompts: list[str], negatives: list[str] | None, clip_skip: int) -> dict[str, Any]:
    """The prompt embeddings with both the prompts and the negative prompts taken ``clip_skip - 1`` layers
    before SDXL's usual one (diffusers' own ``clip_skip`` argument skips layers for the prompts only). Negative
    prompts absent: zeros, as the pipeline gives them."""
    device = pipe._execution_device
    skip = clip_skip - 1 if clip_skip > 1 else None
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False, clip_skip=skip)
    if negatives is None and pipe.config.force_zeros_for_empty_prompt:
        negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        negative, _, negative_pooled, _ = pipe.encode_prompt(
            prompt=negatives if negatives is not None else [""] * len(prompts), device=device,
            num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=skip)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative,
            "negative_pooled_prompt_embeds": negative_pooled}


# -- only masked inpainting --------------------------------------------------------------------------------------
def crop_masked(processor: Any, image: Image.Image, mask: Image.Image, width: int, height: int,
                padding: int) -> tuple[Image.Image, Image.Image, tuple[int, int, int, int]]:
    """The masked area plus ``padding`` pixels (grown to the output's aspect ratio), cut from the image and the
    mask and enlarged to ``width`` x ``height``; and where it was."""
    box = processor.get_crop_region(mask, width, height, pad=padding)
    return (image.crop(box).resize((width, height), Image.Resampling.LANCZOS),
            mask.crop(box).resize((width, height), Image.Resampling.BILINEAR), box)


def paste_masked(original: Image.Image, mask: Image.Image, result: Image.Image,
                 box: tuple[int, int, int, int]) -> Image.Image:
    """The inpainted crop shrunk back into its place; outside the mask the original's pixels stay as they were."""
    x1, y1, x2, y2 = box
    out = original.convert("RGB").copy()
    out.paste(result.convert("RGB").resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
    return Image.composite(out, original.convert("RGB"), mask.convert("L"))
