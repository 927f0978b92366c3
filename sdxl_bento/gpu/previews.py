"""Preview images from the latents while a batch denoises: small JPEGs for the event stream.

Two decoders, both far cheaper than the VAE:

- **Linear** (always there): SDXL's latent channels map almost linearly to RGB. The 4x3 factors and the bias are
  those ComfyUI and A1111 use for SDXL's latent space; the result is the latent grid itself (1/8 of the image's
  size), a fair sketch of composition and colour. One matrix product per preview.
- **TAESD-XL** (when ``sdxl-taesd`` is in the model store, ``sdxl-bento models import madebyollin/taesdxl --role
  preview``): the tiny autoencoder distilled from SDXL's VAE, a recognisable picture; 5.7 s per 1024x1024 image
  on a 2-core CPU (BENCHMARKS.md), so it is for GPU servers.
  It takes the pipeline's latents as they are (its scaling factor is 1).

Both run on the scheduler's thread, every ``SDXL_BENTO_PREVIEW_EVERY`` steps, only for batches whose jobs asked.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image

SDXL_LATENT_RGB = ((0.3651, 0.4232, 0.4341),
                   (-0.2533, -0.0042, 0.1068),
                   (0.1076, 0.1111, -0.0362),
                   (-0.3165, -0.2492, -0.2188))
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def _jpegs(rgb: torch.Tensor, size: int, quality: int = 70) -> list[bytes]:
    """(N, 3, H, W) in [-1, 1] -> one JPEG per image, the longest side ``size`` at most."""
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for array in pixels:
        image = Image.fromarray(array, "RGB")
        scale = size / max(image.size)
        if scale < 1 or max(image.size) < size // 2:  # tiny latent grids are enlarged to half the size, at least
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


class LinearPreview:
    """SDXL's linear latent-to-RGB approximation."""

    name = "linear"

    def __init__(self, size: int = 128) -> None:
        self.size = size

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> list[bytes]:
        factors = torch.tensor(SDXL_LATENT_RGB, dtype=torch.float32, device=latents.device)
        bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32, device=latents.device)
        rgb = torch.einsum("nchw,cr->nrhw", latents.float(), factors) + bias.view(1, 3, 1, 1)
        return _jpegs(rgb, self.size)


class TaesdPreview:
    """TAESD-XL (``diffusers.AutoencoderTiny``) from the model store."""

    name = "taesd"

    def __init__(self, path: Path | str, device: str, dtype: torch.dtype, size: int = 128) -> None:
        from diffusers import AutoencoderTiny

        self.size = size
        self.device, self.dtype = device, dtype
        self.vae: Any = AutoencoderTiny.from_pretrained(str(path), torch_dtype=dtype).to(device).eval()

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> list[bytes]:
        decoded = self.vae.decode(latents.to(self.device, self.dtype)).sample
        return _jpegs(decoded.float(), self.size)
