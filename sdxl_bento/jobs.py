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

    @property
    def uses_refiner(self) -> bool:
        return self.kind == "refine" or self.refine != "none"

    def total_steps(self) -> int:
        if self.kind in ("refine", "img2img", "inpaint"):
            return max(1, int(self.steps * self.strength))
        if self.refine == "img2img":
            return self.steps + max(1, int(self.steps * self.strength))
        return self.steps


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
    previews: bool = False
    """Someone follows this work's progress (a task's event stream): the engine makes preview images for it."""

    @property
    def num_images(self) -> int:
        return len(self.seeds)
