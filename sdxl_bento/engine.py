"""The engine: SDXL pipelines in, images out. It knows nothing of HTTP, queues or threads.

Only the scheduler calls it, from one thread: diffusers pipelines are not thread-safe. Several
requests with the same batch key run as one pipeline call, with one generator per image, so an
image depends only on its own prompt, seed and parameters, never on its batch mates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch

from .store import StoredPipeline

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (steps done, steps in total); it may raise to abort the batch."""

_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SCHEDULER_NAMES = tuple(_SCHEDULERS)


@dataclass(frozen=True)
class BatchKey:
    """What must be equal for works to share one pipeline call."""

    kind: Literal["txt2img", "refine"]
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    refine: str = "none"
    high_noise_frac: float = 0.8
    strength: float = 0.3
    has_negative: bool = False
    """An empty negative prompt uses zero embeddings, a non-empty one is encoded: not mixable."""

    def total_steps(self) -> int:
        if self.kind == "refine":
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
    """For ``refine``: one PIL image per seed."""

    @property
    def num_images(self) -> int:
        return len(self.seeds)


@dataclass
class LoadedModels:
    base: Any
    refiner: Any | None
    base_tag: str
    refiner_tag: str | None
    synthetic: bool
    device: str
    dtype: torch.dtype
    scheduler_configs: dict[str, Any] = field(default_factory=dict)


def pick_device(setting: str) -> tuple[str, torch.dtype]:
    """CUDA in float16 when available (or asked), else the CPU in float32."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return "cuda", torch.float16
    return "cpu", torch.float32


class Engine:
    def __init__(self, base: StoredPipeline, refiner: StoredPipeline | None = None, device: str = "auto") -> None:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        self.device, self.dtype = pick_device(device)
        started = time.perf_counter()
        base_pipe = StableDiffusionXLPipeline.from_pretrained(str(base.path), dtype=self.dtype)
        refiner_pipe = None
        if refiner is not None:
            # Shared components are passed in, so they are neither loaded nor held twice.
            refiner_pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                str(refiner.path), text_encoder_2=base_pipe.text_encoder_2, vae=base_pipe.vae,
                dtype=self.dtype,
            )
        for pipe in filter(None, (base_pipe, refiner_pipe)):
            pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            if self.dtype == torch.float16:
                # SDXL's VAE overflows in fp16 (black/NaN images): decode in float32.
                pipe.vae.register_to_config(force_upcast=True)
        self.models = LoadedModels(
            base=base_pipe, refiner=refiner_pipe, base_tag=base.tag,
            refiner_tag=refiner.tag if refiner else None,
            synthetic=base.synthetic or bool(refiner and refiner.synthetic),
            device=self.device, dtype=self.dtype,
            scheduler_configs={"base": base_pipe.scheduler.config,
                               "refiner": refiner_pipe.scheduler.config if refiner_pipe else None},
        )
        self.load_seconds = time.perf_counter() - started
        logger.info("loaded %s%s on %s (%s) in %.1f s", base.tag, f" + {refiner.tag}" if refiner else "",
                    self.device, str(self.dtype).removeprefix("torch."), self.load_seconds)

    @property
    def has_refiner(self) -> bool:
        return self.models.refiner is not None

    def _scheduler(self, role: str, name: str):
        import diffusers

        cls_name, overrides = _SCHEDULERS[name]
        return getattr(diffusers, cls_name).from_config(self.models.scheduler_configs[role], **overrides)

    def generate(self, works: list[Work], on_step: StepCallback | None = None) -> list[list[Any]]:
        """Run works sharing one batch key as one pipeline call; returns PIL images per work."""
        if not works:
            return []
        key = works[0].key
        if any(w.key != key for w in works):
            raise ValueError("works in one batch must share a batch key")
        if key.refine != "none" or key.kind == "refine":
            if self.models.refiner is None:
                raise RuntimeError("the refiner is not loaded")
        prompts = [w.prompt for w in works for _ in w.seeds]
        negatives = [w.negative_prompt for w in works for _ in w.seeds] if key.has_negative else None
        # Generators live on the CPU: the same seed gives the same noise on any device.
        generators = [torch.Generator("cpu").manual_seed(s) for w in works for s in w.seeds]
        total = key.total_steps()
        done = 0

        def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal done
            done += 1
            if on_step is not None:
                on_step(min(done, total), total)
            return kwargs

        common = dict(prompt=prompts, negative_prompt=negatives, guidance_scale=key.guidance_scale,
                      num_inference_steps=key.steps, generator=generators, callback_on_step_end=callback)
        base, refiner = self.models.base, self.models.refiner
        with torch.inference_mode():
            if key.kind == "refine":
                init = [img for w in works for img in (w.init_images or [])]
                if len(init) != len(prompts):
                    raise ValueError("refine works need one init image per seed")
                refiner.scheduler = self._scheduler("refiner", key.scheduler)
                images = refiner(image=init, strength=key.strength, **common).images
            else:
                base.scheduler = self._scheduler("base", key.scheduler)
                size = dict(width=key.width, height=key.height)
                if key.refine == "none":
                    images = base(**size, **common).images
                elif key.refine == "ensemble":
                    latents = base(**size, denoising_end=key.high_noise_frac, output_type="latent", **common).images
                    refiner.scheduler = self._scheduler("refiner", key.scheduler)
                    images = refiner(image=latents, denoising_start=key.high_noise_frac, **common).images
                else:  # img2img: the refiner passes over the finished latents
                    latents = base(**size, output_type="latent", **common).images
                    refiner.scheduler = self._scheduler("refiner", key.scheduler)
                    images = refiner(image=latents, strength=key.strength, **common).images
        if len(images) != len(prompts):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(prompts)} prompts")
        if on_step is not None:
            on_step(total, total)
        out, start = [], 0
        for w in works:
            out.append(images[start:start + w.num_images])
            start += w.num_images
        return out

    def warmup(self) -> float:
        """One small generation, so the first request does not pay for kernel selection."""
        started = time.perf_counter()
        key = BatchKey(kind="txt2img", width=256, height=256, steps=2, guidance_scale=5.0, scheduler="euler")
        self.generate([Work(key=key, prompt="warm-up", negative_prompt="", seeds=[0])])
        return time.perf_counter() - started
