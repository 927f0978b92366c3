"""What a job is, in the vocabulary every layer shares: no torch here, so naming a job costs nothing.

A ``Work`` is one request's share of a batch; works with equal ``BatchKey`` can run as one pipeline call.
The scheduler queues them, the engine runs them, and ``StepCallback`` reports each denoising step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (steps done, steps in total); it may raise to abort the batch."""
PreviewCallback = Callable[[int, int, list[bytes]], None]
"""Called every few denoising steps with (steps done, steps in total, one small JPEG per image of the batch)."""

Kind = Literal["txt2img", "refine", "img2img", "inpaint"]
KINDS: tuple[str, ...] = ("txt2img", "refine", "img2img", "inpaint")
Approximation = Literal["none", "deepcache"]
APPROXIMATIONS: tuple[str, ...] = ("none", "deepcache")


@dataclass(frozen=True)
class Hires:
    """A second pass over a txt2img image at a larger size (AUTOMATIC1111's hires fix): the first pass's latents
    (or its decoded image) upscaled to ``upscale_width`` x ``upscale_height``, centre-cropped to ``width`` x
    ``height``, then denoised again by ``strength`` over ``steps``."""

    upscale_width: int
    upscale_height: int
    width: int
    height: int
    steps: int
    strength: float
    upscaler: str
    """A latent mode (``latent``, ``latent-bicubic``, ...: the latents are interpolated) or a pixel one
    (``lanczos``, ``nearest``: the image is decoded, resized, encoded again)."""
    scheduler: str
    """The second pass's sampler (``samplers.SAMPLERS``)."""
    has_negative: bool = False
    """The second pass's negative prompts are encoded (else zeros), as ``BatchKey.has_negative``."""

    def run_steps(self) -> int:
        return max(1, int(self.steps * self.strength))


@dataclass(frozen=True)
class BatchKey:
    """What must be equal for works to share one pipeline call."""

    kind: Kind
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    """The sampler (``samplers.SAMPLERS``)."""
    refine: str = "none"
    high_noise_frac: float = 0.8
    strength: float = 0.3
    """``refine`` and ``img2img``/``inpaint``: how much of the input is re-noised; refine mode ``img2img``:
    the refiner's strength."""
    has_negative: bool = False
    """An empty negative prompt uses zero embeddings, a non-empty one is encoded: not mixable."""
    model: str = ""
    """The base checkpoint's model store tag (``name`` or ``name:version``); empty: the default base."""
    loras: tuple[tuple[str, float], ...] = ()
    """(LoRA name in the model store, weight) pairs, active for the whole batch; empty: none."""
    approximation: Approximation = "none"
    """``deepcache``: reuse the UNet's deep features between steps (faster, changes the image; opt-in)."""
    hires: Optional[Hires] = None
    """txt2img: a hires-fix second pass."""
    tiling: bool = False
    """Circular padding in every convolution of the UNet and the VAE: the image tiles seamlessly."""
    clip_skip: int = 1
    """AUTOMATIC1111's "Clip skip": 1 is SDXL's usual layer (the penultimate), each step more skips one layer more."""
    eta: Optional[float] = None
    """DDIM's eta (None: the sampler's default)."""
    mask_padding: Optional[int] = None
    """inpaint: None repaints over the whole image; a number inpaints only the masked area plus this margin, at
    the full size, and pastes it back (AUTOMATIC1111's "only masked")."""

    @property
    def uses_refiner(self) -> bool:
        return self.kind == "refine" or self.refine != "none"

    def total_steps(self) -> int:
        if self.kind in ("refine", "img2img", "inpaint"):
            return max(1, int(self.steps * self.strength))
        if self.refine == "img2img":
            return self.steps + max(1, int(self.steps * self.strength))
        if self.hires is not None:
            return self.steps + self.hires.run_steps()
        return self.steps

    def units(self) -> int:
        """Work per image, as steps x pixels (a hires pass counts its own size)."""
        if self.hires is None:
            return self.total_steps() * self.width * self.height
        return self.steps * self.width * self.height + self.hires.run_steps() * self.hires.width * self.hires.height

    def peak_size(self) -> tuple[int, int]:
        """The largest latent size the batch works at (what GPU memory is reserved for)."""
        if self.hires is None:
            return self.width, self.height
        return max(self.width, self.hires.upscale_width), max(self.height, self.hires.upscale_height)


@dataclass
class Work:
    """One request's share of a batch: a prompt and one seed per image."""

    key: BatchKey
    prompt: str
    negative_prompt: str
    seeds: list[int]
    init_images: Optional[list[Any]] = None
    """For ``refine``, ``img2img`` and ``inpaint``: one PIL image per seed."""
    mask_images: Optional[list[Any]] = None
    """For ``inpaint``: one PIL mask per seed; white is repainted, black kept."""
    subseeds: Optional[list[int]] = None
    """Variation seeds, one per image: each image's starting noise is its seed's, moved towards its subseed's by
    ``subseed_strength`` (spherical interpolation, as AUTOMATIC1111 mixes them)."""
    subseed_strength: float = 0.0
    hires_prompt: Optional[str] = None
    """The hires pass's prompt (None: ``prompt``)."""
    hires_negative_prompt: Optional[str] = None
    previews: bool = False
    """Someone follows this work's progress (a task's event stream): the engine makes preview images for it."""

    @property
    def num_images(self) -> int:
        return len(self.seeds)
