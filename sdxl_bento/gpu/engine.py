"""The engine: SDXL pipelines in, images out. It knows nothing of HTTP, queues or threads.

Only the scheduler calls it, from one thread: diffusers pipelines are not thread-safe. Several
requests with the same batch key run as one pipeline call, with one generator per image, so an
image depends only on its own prompt, seed and parameters, never on its batch mates. The batch
key names the checkpoint and the LoRA set, so a batch runs on one pipeline in one adapter state
(``models.ModelManager`` loads checkpoints and LoRAs on demand).
"""

from __future__ import annotations

import logging
import time
import weakref
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..errors import InvalidRequest
from ..jobs import APPROXIMATIONS, KINDS, BatchKey, PreviewCallback, StepCallback, Work
from ..samplers import BY_NAME as SAMPLERS
from ..store.modelstore import StoredPipeline
from . import accel, features
from .accel import Acceleration, Decoder
from .deepcache import deep_cache
from .models import LoadedPipeline, ModelManager

logger = logging.getLogger(__name__)

@dataclass
class LoadedModels:
    """The default checkpoint and the refiner (``base`` is None while the default is unloaded)."""

    base: Any
    refiner: Any | None
    base_tag: str
    refiner_tag: str | None
    synthetic: bool
    device: str
    dtype: torch.dtype
    scheduler_configs: dict[str, Any] = field(default_factory=dict)


def pick_device(setting: str) -> tuple[str, torch.dtype]:
    """CUDA in float16 when available (or asked), else the CPU in float32.

    BentoML gives every worker all of the service's GPUs; worker k (1-based) makes the k-th visible
    GPU its current device, so with ``workers: N`` and N GPUs each worker has one GPU of its own.
    """
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        from bentoml import server_context

        torch.cuda.set_device(((server_context.worker_index or 1) - 1) % max(torch.cuda.device_count(), 1))
        return "cuda", torch.float16
    return "cpu", torch.float32


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Transparent pixels become white (dropping alpha would show whatever colour they happen to hold)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def prepare_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """An input image as the pipelines take it: RGB (transparency on white), exactly ``width`` x ``height``
    (stretched; callers that care about the aspect ratio crop first)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, not {width}x{height}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = _flatten_alpha(image)
    elif image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def prepare_mask(mask: Image.Image, width: int, height: int) -> Image.Image:
    """An inpainting mask as the pipeline takes it: grayscale ("L"), ``width`` x ``height``; white is repainted."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, not {width}x{height}")
    if mask.mode != "L":
        mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.BILINEAR)
    return mask


class Engine:
    def __init__(self, base: StoredPipeline, refiner: StoredPipeline | None = None, device: str = "auto", *,
                 budget_bytes: int | None = None, pin_default: bool = True,
                 manager: ModelManager | None = None, acceleration: Acceleration | None = None,
                 deepcache_interval: int = 3) -> None:
        """Load ``base`` (the default checkpoint, pinned unless ``pin_default`` is False) and the refiner, which
        serves every checkpoint. ``budget_bytes`` bounds the memory of loaded checkpoints (None: unbounded).
        ``acceleration`` (default: ``Acceleration.resolve`` for the device) says what is compiled and captured."""
        from diffusers import StableDiffusionXLImg2ImgPipeline

        self.device, self.dtype = pick_device(device)
        started = time.perf_counter()
        self.acceleration = acceleration or Acceleration.resolve(self.device)
        if self.acceleration.compile != "off" and self.acceleration.compile_cache is not None:
            accel.use_compile_cache(self.acceleration.compile_cache)
        self.deepcache_interval = deepcache_interval
        self.preview_every = 5
        """A preview every this many steps, for batches that ask (``generate(on_preview=...)``); 0: none."""
        self.previewer: Any = None
        """Latents -> JPEGs (``previews.LinearPreview`` or ``TaesdPreview``); the linear one when unset."""
        self._decoders: "weakref.WeakKeyDictionary[Any, Decoder]" = weakref.WeakKeyDictionary()
        self.manager = manager or ModelManager(self.device, self.dtype, budget_bytes=budget_bytes,
                                               acceleration=self.acceleration)
        self.manager.register(base, pinned=pin_default, default=True)
        default = self.manager.ensure(base.tag)
        base_pipe = default.pipe
        refiner_pipe = None
        if refiner is not None:
            # Shared components are passed in, so they are neither loaded nor held twice.
            refiner_pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                str(refiner.path), text_encoder_2=base_pipe.text_encoder_2, vae=base_pipe.vae,
                dtype=self.dtype, add_watermarker=False,
            )
            refiner_pipe.to(self.device)
            refiner_pipe.set_progress_bar_config(disable=True)
            if self.dtype == torch.float16:
                refiner_pipe.vae.register_to_config(force_upcast=True)
            accel.prepare_unet(refiner_pipe.unet, self.acceleration)
            self.manager.add_shared("refiner", refiner_pipe)
        self._refiner = refiner_pipe
        self._base_tag = base.tag
        self._refiner_tag = refiner.tag if refiner else None
        self._synthetic = base.synthetic or bool(refiner and refiner.synthetic)
        self._scheduler_configs = {"base": base_pipe.scheduler.config,
                                   "refiner": refiner_pipe.scheduler.config if refiner_pipe else None}
        self.load_seconds = time.perf_counter() - started
        logger.info("loaded %s%s on %s (%s) in %.1f s; %s", base.tag, f" + {refiner.tag}" if refiner else "",
                    self.device, str(self.dtype).removeprefix("torch."), self.load_seconds,
                    self.acceleration.describe())

    @property
    def models(self) -> LoadedModels:
        default = self.manager.get(self._base_tag)
        return LoadedModels(
            base=default.pipe if default else None, refiner=self._refiner, base_tag=self._base_tag,
            refiner_tag=self._refiner_tag, synthetic=self._synthetic, device=self.device, dtype=self.dtype,
            scheduler_configs=self._scheduler_configs,
        )

    def add_checkpoint(self, stored: StoredPipeline, pinned: bool = False) -> str:
        """Make another base checkpoint available to ``BatchKey.model`` (loaded on first use)."""
        return self.manager.register(stored, pinned=pinned)

    def _scheduler(self, config: Any, name: str):
        import diffusers

        if name not in SAMPLERS:
            raise InvalidRequest(f"scheduler: unknown scheduler {name!r}; valid: {', '.join(SAMPLERS)}",
                                 field="scheduler")
        spec = SAMPLERS[name]
        return getattr(diffusers, spec.scheduler).from_config(config, **spec.config)

    def _check(self, key: BatchKey) -> None:
        if key.kind not in KINDS:
            raise ValueError(f"unknown batch kind {key.kind!r}")
        if (key.refine != "none" or key.kind == "refine") and self._refiner is None:
            raise RuntimeError("the refiner is not loaded")
        if key.kind in ("img2img", "inpaint") and key.refine != "none":
            raise InvalidRequest(f"refine: {key.kind} takes no refiner pass (refine must be none)", field="refine")
        if key.kind == "refine" and key.loras:
            raise InvalidRequest("loras: LoRAs apply to the base checkpoint; the refiner takes none", field="loras")
        if key.approximation not in APPROXIMATIONS:
            raise InvalidRequest(f"approximation: unknown {key.approximation!r}; valid: {', '.join(APPROXIMATIONS)}",
                                 field="approximation")
        if (key.kind != "txt2img" or key.refine == "img2img") and int(key.steps * key.strength) < 1:
            raise InvalidRequest(f"strength: {key.strength} x {key.steps} steps leaves no denoising step; "
                                 "raise strength or steps", field="strength")
        if key.hires is not None:
            if key.kind != "txt2img" or key.refine != "none":
                raise InvalidRequest("hires: a hires pass follows a text-to-image pass without the refiner",
                                     field="hires")
            if key.hires.upscaler not in features.LATENT_MODES and key.hires.upscaler not in features.PIXEL_MODES:
                raise InvalidRequest(f"hires: unknown upscaler {key.hires.upscaler!r}", field="hires")
            if int(key.hires.steps * key.hires.strength) < 1:
                raise InvalidRequest("hires: its steps x denoising strength runs no denoising step", field="hires")
        if key.eta is not None and not key.scheduler.startswith("ddim"):
            raise InvalidRequest("eta: applies to the DDIM sampler only", field="eta")
        if key.mask_padding is not None and key.kind != "inpaint":
            raise InvalidRequest("mask_padding: for inpainting only", field="mask_padding")

    def generate(self, works: list[Work], on_step: StepCallback | None = None,
                 on_preview: PreviewCallback | None = None) -> list[list[Any]]:
        """Run works sharing one batch key as one pipeline call; returns PIL images per work. ``on_preview`` gets
        a small JPEG of each image every ``preview_every`` steps (never the last: the image itself follows)."""
        if not works:
            return []
        key = works[0].key
        if any(w.key != key for w in works):
            raise ValueError("works in one batch must share a batch key")
        self._check(key)
        prompts = [w.prompt for w in works for _ in w.seeds]
        negatives = [w.negative_prompt for w in works for _ in w.seeds] if key.has_negative else None
        init = masks = None
        if key.kind in ("refine", "img2img", "inpaint"):
            init = [img for w in works for img in (w.init_images or [])]
            if len(init) != len(prompts):
                raise ValueError(f"{key.kind} works need one init image per seed")
            if key.kind != "refine":
                init = [prepare_image(img, key.width, key.height) for img in init]
        if key.kind == "inpaint":
            masks = [m for w in works for m in (w.mask_images or [])]
            if len(masks) != len(prompts):
                raise ValueError("inpaint works need one mask image per seed")
            masks = [prepare_mask(m, key.width, key.height) for m in masks]
        # The checkpoint and its adapter state, before any generator is made (loading may take a while).
        loaded: LoadedPipeline | None = None
        if key.kind != "refine":
            loaded = self.manager.ensure(key.model)
            most = features.max_clip_skip(loaded.pipe)
            if key.clip_skip > most:
                raise InvalidRequest(f"clip_skip: {key.clip_skip} is more than checkpoint {loaded.tag}'s text "
                                     f"encoders have layers for (at most {most})", field="clip_skip")
            self.manager.activate_loras(loaded, key.loras)
        # Generators live on the CPU: the same seed gives the same noise on any device.
        generators = [torch.Generator("cpu").manual_seed(s) for w in works for s in w.seeds]
        total = key.total_steps()
        done = 0

        def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal done
            done += 1
            if on_step is not None:
                on_step(min(done, total), total)
            if on_preview is not None and self.preview_every and done % self.preview_every == 0 and done < total:
                self._preview(on_preview, kwargs.get("latents"), min(done, total), total)
            return kwargs

        common = dict(prompt=prompts, negative_prompt=negatives, guidance_scale=key.guidance_scale,
                      num_inference_steps=key.steps, generator=generators, callback_on_step_end=callback)
        if key.eta is not None:
            common["eta"] = key.eta
        refiner = self._refiner

        def run(pipe: Any, **kwargs: Any) -> Any:
            """One pipeline call in the batch's mode; final images decoded by our decoder when one is set."""
            call = {**common, **kwargs}
            decoder = self._decoder(pipe.vae) if call.get("output_type") != "latent" else None
            if decoder is not None:
                call["output_type"] = "latent"
            with ExitStack() as stack:
                if (key.loras and pipe is not refiner) or key.approximation != "none" or key.tiling:
                    stack.enter_context(accel.eager(pipe.unet))  # a graph would not see the LoRA, cache or padding
                if key.approximation == "deepcache":
                    stack.enter_context(deep_cache(pipe.unet, self.deepcache_interval))
                if key.tiling:
                    stack.enter_context(features.circular(pipe.unet, pipe.vae, decoder.vae if decoder else None))
                if key.clip_skip > 1 and pipe is not refiner:
                    prompt, negative = call.pop("prompt"), call.pop("negative_prompt")
                    call.update(features.embeddings(pipe, prompt, negative, key.clip_skip))
                images = pipe(**call).images
                return images if decoder is None else pipe.image_processor.postprocess(decoder(images))

        def hires(first: Any) -> list[Any]:
            """The hires pass over the first pass's latents (latent upscalers) or images (pixel ones)."""
            spec = key.hires
            assert spec is not None and loaded is not None
            pipe = loaded.img2img()
            pipe.scheduler = self._scheduler(loaded.scheduler_config, spec.scheduler)
            factor = base.vae_scale_factor
            if spec.upscaler in features.LATENT_MODES:
                image = features.upscale_latents(first, spec.upscaler,
                                                 (spec.upscale_height // factor, spec.upscale_width // factor),
                                                 (spec.height // factor, spec.width // factor))
            else:
                image = [features.upscale_image(img, spec.upscaler, (spec.upscale_width, spec.upscale_height),
                                                (spec.width, spec.height)) for img in first]
            hr_prompts = [w.hires_prompt if w.hires_prompt is not None else w.prompt for w in works for _ in w.seeds]
            hr_negatives = [w.hires_negative_prompt if w.hires_negative_prompt is not None else w.negative_prompt
                            for w in works for _ in w.seeds] if spec.has_negative else None
            return run(pipe, image=image, strength=spec.strength, num_inference_steps=spec.steps, prompt=hr_prompts,
                       negative_prompt=hr_negatives)

        def run_refiner(**kwargs: Any) -> list[Any]:
            # LoRAs are for the base pass; the refiner's text encoder may be the base's, so they are turned off.
            self.manager.quiet_loras(refiner)
            refiner.scheduler = self._scheduler(self._scheduler_configs["refiner"], key.scheduler)
            return run(refiner, **kwargs)

        with torch.inference_mode():
            if key.kind == "refine":
                images = run_refiner(image=init, strength=key.strength)
            elif key.kind == "img2img":
                pipe = loaded.img2img()
                pipe.scheduler = self._scheduler(loaded.scheduler_config, key.scheduler)
                images = run(pipe, image=init, strength=key.strength)
            elif key.kind == "inpaint":
                pipe = loaded.inpaint()
                pipe.scheduler = self._scheduler(loaded.scheduler_config, key.scheduler)
                if key.mask_padding is None:
                    images = run(pipe, image=init, mask_image=masks, width=key.width, height=key.height,
                                 strength=key.strength)
                else:  # only the masked area, at the full size, pasted back into its place
                    crops = [features.crop_masked(pipe.mask_processor, img, m, key.width, key.height, key.mask_padding)
                             for img, m in zip(init, masks)]
                    images = run(pipe, image=[c[0] for c in crops], mask_image=[c[1] for c in crops],
                                 width=key.width, height=key.height, strength=key.strength)
                    images = [features.paste_masked(img, m, out, c[2])
                              for img, m, out, c in zip(init, masks, images, crops)]
            else:
                base = loaded.pipe
                base.scheduler = self._scheduler(loaded.scheduler_config, key.scheduler)
                size = dict(width=key.width, height=key.height)
                if any(w.subseeds for w in works):
                    factor = base.vae_scale_factor
                    size["latents"] = features.starting_noise(
                        generators, [s for w in works for s in (w.subseeds or [None] * w.num_images)],
                        [w.subseed_strength for w in works for _ in w.seeds],
                        (base.unet.config.in_channels, key.height // factor, key.width // factor),
                        base.text_encoder_2.dtype if base.text_encoder_2 is not None else self.dtype)
                if key.hires is not None:
                    latent = key.hires.upscaler in features.LATENT_MODES
                    images = hires(run(base, **size, output_type="latent" if latent else "pil"))
                elif key.refine == "none":
                    images = run(base, **size)
                elif key.refine == "ensemble":
                    latents = run(base, **size, denoising_end=key.high_noise_frac, output_type="latent")
                    images = run_refiner(image=latents, denoising_start=key.high_noise_frac)
                else:  # img2img: the refiner passes over the finished latents
                    latents = run(base, **size, output_type="latent")
                    images = run_refiner(image=latents, strength=key.strength)
        if len(images) != len(prompts):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(prompts)} prompts")
        if on_step is not None:
            on_step(total, total)
        out, start = [], 0
        for w in works:
            out.append(images[start:start + w.num_images])
            start += w.num_images
        return out

    def _preview(self, on_preview: PreviewCallback, latents: Any, done: int, total: int) -> None:
        """Previews never fail a generation: a decoder that breaks is logged and this preview skipped."""
        if latents is None:
            return
        if self.previewer is None:
            from .previews import LinearPreview

            self.previewer = LinearPreview()
        try:
            images = self.previewer(latents)
        except Exception:
            logger.exception("preview at step %d failed", done)
            return
        on_preview(done, total, images)

    def _decoder(self, vae: Any) -> Decoder | None:
        if self.acceleration.vae_dtype is None:
            return None
        decoder = self._decoders.get(vae)
        if decoder is None:
            decoder = self._decoders[vae] = Decoder(vae, self.acceleration.vae_dtype)
        return decoder

    def warmup(self, width: int = 256, height: int = 256) -> float:
        """Generations at the size most requests use, so the first request pays neither for kernel selection nor
        for compilation nor for CUDA-graph capture (a graph is captured on a signature's second call: 3 steps).
        With compilation, batches of one and two images: Dynamo compiles for the first shape, then once more
        with dynamic shapes, which serve every later batch size.

        If compiling or capturing fails (no C compiler for Triton, a driver refusing capture), the service
        must still come up: the speed-ups are dropped, logged as an error, and the warm-up runs again eagerly.
        """
        started = time.perf_counter()
        try:
            self._warm(width, height)
        except Exception as exc:
            if self.acceleration.compile == "off" and not self.acceleration.cuda_graphs:
                raise  # nothing to drop: a real failure
            logger.error("warm-up with %s failed (%s: %s); serving without compilation and CUDA graphs",
                         self.acceleration.describe(), type(exc).__name__, exc)
            self.acceleration = Acceleration(vae_dtype=self.acceleration.vae_dtype)
            self.manager.acceleration = self.acceleration
            for tag in self.manager.loaded():
                accel.unaccelerate(self.manager.get(tag).pipe.unet)
            if self._refiner is not None:
                accel.unaccelerate(self._refiner.unet)
            self._warm(width, height)
        return time.perf_counter() - started

    def seconds_per_unit(self, width: int = 256, height: int = 256, steps: int = 4) -> float:
        """A warm generation's seconds per work unit (steps x pixels x images, as the scheduler counts them),
        so that ETAs exist from the first request after a start, before any batch has been measured."""
        key = BatchKey(kind="txt2img", width=width, height=height, steps=steps, guidance_scale=5.0, scheduler="euler")
        started = time.perf_counter()
        self.generate([Work(key=key, prompt="timing", negative_prompt="", seeds=[0])])
        return (time.perf_counter() - started) / (steps * width * height)

    def _warm(self, width: int, height: int) -> None:
        accelerated = self.acceleration.cuda_graphs or self.acceleration.compile != "off"
        steps = 3 if accelerated else 2
        key = BatchKey(kind="txt2img", width=width, height=height, steps=steps, guidance_scale=5.0, scheduler="euler")
        for seeds in ([0], [0, 1]) if self.acceleration.compile != "off" else ([0],):
            self.generate([Work(key=key, prompt="warm-up", negative_prompt="", seeds=seeds)])
        if self._refiner is not None and accelerated:
            ensemble = BatchKey(**{**key.__dict__, "steps": 2 * steps, "refine": "ensemble", "high_noise_frac": 0.5})
            self.generate([Work(key=ensemble, prompt="warm-up", negative_prompt="", seeds=[0])])
