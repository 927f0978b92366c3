"""Request and response models: every limit is a validated field with a readable message.

Unknown fields are rejected. Limits that operators tune (prompt length, pixel count, LoRAs per request) come
from ``Settings``: ``Requests.with_limits`` makes subclasses of the models that carry them (the models here keep
the defaults); the rest are fixed.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from .samplers import Sampler

MAX_SEED = 2**32 - 1


class RefineMode(str, Enum):
    none = "none"
    ensemble = "ensemble"
    """The base denoises to ``high_noise_frac``, the refiner finishes from its latents."""
    img2img = "img2img"
    """The refiner passes over the base's finished latents with ``refiner_strength``."""


class Approximation(str, Enum):
    none = "none"
    """The exact computation (the default)."""
    deepcache = "deepcache"
    """Approximate: the UNet's deep features are reused between steps. Faster, and changes the image."""


class WebhookEvent(str, Enum):
    completed = "job.completed"
    failed = "job.failed"
    cancelled = "job.cancelled"
    progress = "job.progress"
    """Throttled (``SDXL_BENTO_WEBHOOK_PROGRESS_INTERVAL_S``); only when asked for."""


LIFECYCLE_FIELDS = frozenset({"webhook", "webhook_events"})
"""Request fields that say whom to tell, not what to generate: outside cache keys, manifests and the echo of
parameters."""


class OutputFormat(str, Enum):
    png = "png"
    jpeg = "jpeg"
    webp = "webp"


class HiresUpscaler(str, Enum):
    """How the hires pass enlarges the first pass: in latent space (interpolated latents), or in pixels (the
    image decoded, resized with PIL, encoded again). Upscalers that need weights (ESRGAN, ...) are not offered."""

    latent = "latent"
    latent_antialiased = "latent-antialiased"
    latent_bicubic = "latent-bicubic"
    latent_bicubic_antialiased = "latent-bicubic-antialiased"
    latent_nearest = "latent-nearest"
    latent_nearest_exact = "latent-nearest-exact"
    lanczos = "lanczos"
    nearest = "nearest"


class ResizeMode(str, Enum):
    stretch = "stretch"
    """The image is resized to width x height, whatever its aspect ratio (A1111's "Just resize")."""
    crop = "crop"
    """Resized to cover width x height, then centre-cropped (A1111's "Crop and resize")."""
    fill = "fill"
    """Resized to fit inside, the rest filled by stretching the image's edges (A1111's "Resize and fill")."""


class InpaintFill(str, Enum):
    original = "original"
    """The masked area starts from the image as it is (A1111's "original")."""
    fill = "fill"
    """The masked area is first filled with the blurred colours around it (A1111's "fill")."""


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 500
    max_pixels: int = 1536 * 1536
    max_loras: int = 4


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200, description="LoRA name in the model store.")]
    weight: Annotated[float, Field(ge=-2, le=2, description="Adapter weight; 0 is the same as leaving it out.")] = 1.0


class HiresSpec(BaseModel):
    """Hires fix: after the first pass at ``width`` x ``height``, the image is enlarged and denoised again
    (AUTOMATIC1111's ``enable_hr``). The target is ``width`` x ``height`` here when given (one alone keeps the
    aspect ratio; both: the image is enlarged to cover them and centre-cropped), else ``scale`` times the first
    pass; sizes are rounded down to multiples of 8. Its pixels and steps count against the limits."""

    model_config = ConfigDict(extra="forbid")

    scale: Annotated[float, Field(ge=1, le=4, description="Enlargement when width and height are not given.")] = 2.0
    width: Annotated[Optional[int], Field(ge=256, le=4096, description="Target width.")] = None
    height: Annotated[Optional[int], Field(ge=256, le=4096, description="Target height.")] = None
    steps: Annotated[Optional[int], Field(ge=1, le=100, description="The second pass's steps (it runs steps x "
                                                                    "denoising_strength); default: the request's.")] = None
    denoising_strength: Annotated[float, Field(ge=0.01, le=1, description="How much the second pass redoes.")] = 0.7
    upscaler: Annotated[HiresUpscaler, Field(description="latent modes interpolate the latents; lanczos and "
                                                         "nearest resize the decoded image.")] = HiresUpscaler.latent
    sampler: Annotated[Optional[Sampler], Field(description="The second pass's sampler; default: the request's.")] = None
    prompt: Annotated[Optional[str], Field(max_length=10_000, description="The second pass's prompt; default: "
                                                                          "the request's.")] = None
    negative_prompt: Annotated[Optional[str], Field(max_length=10_000, description="The second pass's negative "
                                                                                   "prompt; default: the request's.")] = None

    def plan(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(upscale width, upscale height, final width, final height) for a first pass of ``width`` x ``height``,
        all multiples of 8: the image is enlarged to the first two, then centre-cropped to the last two."""
        if self.width is None and self.height is None:
            up_w, up_h = int(width * self.scale), int(height * self.scale)
            out_w, out_h = up_w, up_h
        elif self.height is None:
            out_w, out_h = self.width, self.width * height // width
            up_w, up_h = out_w, out_h
        elif self.width is None:
            out_w, out_h = self.height * width // height, self.height
            up_w, up_h = out_w, out_h
        else:
            out_w, out_h = self.width, self.height
            if width / height < out_w / out_h:  # wider target: match widths, crop the height
                up_w, up_h = out_w, out_w * height // width
            else:
                up_w, up_h = out_h * width // height, out_h
        up_w, up_h = max(up_w, out_w), max(up_h, out_h)
        return up_w // 8 * 8, up_h // 8 * 8, out_w // 8 * 8, out_h // 8 * 8

    def run_steps(self, steps: int) -> int:
        """Steps the second pass runs for a request of ``steps``."""
        return int((self.steps or steps) * self.denoising_strength)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limits: ClassVar[Limits] = Limits()

    prompt: Annotated[str, Field(min_length=1, max_length=10_000, description="What to draw.")]
    negative_prompt: Annotated[str, Field(max_length=10_000, description="What to avoid.")] = ""
    steps: Annotated[int, Field(ge=1, le=100, description="Denoising steps.")] = 30
    guidance_scale: Annotated[float, Field(ge=0, le=20, description="Classifier-free guidance scale.")] = 5.0
    seed: Annotated[Optional[int], Field(ge=0, le=MAX_SEED, description="Random when absent; always returned.")] = None
    scheduler: Annotated[Sampler, Field(description="The sampler (``GET /sdapi/v1/samplers`` lists them by their "
                                                    "AUTOMATIC1111 names).")] = Sampler.euler
    output_format: OutputFormat = OutputFormat.png
    quality: Annotated[int, Field(ge=1, le=100, description="JPEG/WebP quality.")] = 90
    return_base64: Annotated[bool, Field(description="Also return each image as base64 in JSON answers.")] = False
    safety_check: Annotated[bool, Field(description="Check each image for NSFW content (turning it off needs a "
                                                    "tier that allows it).")] = True
    approximation: Annotated[Approximation, Field(description="`deepcache`: APPROXIMATE, faster; reuses deep UNet "
                                                             "features between steps, so the image changes. "
                                                             "`none` (default): the exact computation.")] = (
        Approximation.none)

    @model_validator(mode="after")
    def _check_prompts(self) -> "_Request":
        limit = self.limits.max_prompt_chars
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > limit:
                raise ValueError(f"{name} is {len(getattr(self, name))} characters; the limit is {limit}")
        if not self.prompt.strip():
            raise ValueError("prompt must not be blank")
        return self

    def seeds(self, count: int) -> list[int]:
        """One seed per image: the given seed, then seed+1, ...; a random start when none was given."""
        start = self.seed if self.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return [(start + i) % (MAX_SEED + 1) for i in range(count)]

    # -- the job lifecycle (issue 17): not generation parameters (``LIFECYCLE_FIELDS``) ---------------
    webhook: Annotated[Optional[str], Field(max_length=2048, description="Notify this URL (http or https) when the "
                                                                         "job ends, signed per Standard Webhooks; "
                                                                         "default: the key's.")] = None
    webhook_events: Annotated[Optional[list[WebhookEvent]], Field(
        max_length=4, description="Which events to deliver; default: job.completed, job.failed, job.cancelled "
                                  "(job.progress, throttled, only when asked).")] = None

    @model_validator(mode="after")
    def _check_webhook(self) -> "_Request":
        if self.webhook is not None:
            from urllib.parse import urlsplit

            parts = urlsplit(self.webhook)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("webhook must be an http:// or https:// URL with a host")
            if parts.username or parts.password:
                raise ValueError("webhook must not carry a user name or password")
            try:
                parts.port
            except ValueError:
                raise ValueError("webhook has an invalid port") from None
        if self.webhook_events is not None and len(set(self.webhook_events)) != len(self.webhook_events):
            raise ValueError("webhook_events names an event twice")
        return self


class _Styled(_Request):
    """Which checkpoint and which LoRA adapters a request uses."""

    model: Annotated[Optional[str], Field(max_length=200, description="Checkpoint tag (GET /models); "
                                                                       "default: the service's base.")] = None
    loras: Annotated[list[LoraSpec], Field(description="LoRA adapters and their weights.")] = []

    @model_validator(mode="after")
    def _check_loras(self) -> "_Styled":
        limit = self.limits.max_loras
        if len(self.loras) > limit:
            raise ValueError(f"loras names {len(self.loras)} adapters; the limit is {limit}")
        names = [lora.name for lora in self.loras]
        if len(set(names)) != len(names):
            raise ValueError("loras names the same adapter twice")
        return self

    def lora_key(self) -> tuple[tuple[str, float], ...]:
        """The adapter set, sorted so that equal sets share batches; weight-0 adapters change nothing."""
        return tuple(sorted((lora.name, lora.weight) for lora in self.loras if lora.weight != 0))

    tiling: Annotated[bool, Field(description="A seamlessly tileable image: every convolution of the UNet and the "
                                              "VAE pads circularly (A1111's tiling).")] = False
    clip_skip: Annotated[int, Field(ge=1, le=12, description="A1111's Clip skip: 1 is SDXL's usual text-encoder "
                                                             "layer (the penultimate); each step more stops one layer "
                                                             "earlier, in both text encoders.")] = 1
    eta: Annotated[Optional[float], Field(ge=0, le=1, description="DDIM's eta (noise added at each step); "
                                                                  "DDIM only.")] = None
    styles: Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]],
                      Field(max_length=16, description="Styles from the operator's styles file (GET "
                                                       "/sdapi/v1/prompt-styles), applied in order to the prompt "
                                                       "and the negative prompt.")] = []

    @model_validator(mode="after")
    def _check_eta(self) -> "_Styled":
        if self.eta is not None and not self.scheduler.value.startswith("ddim"):
            raise ValueError(f"eta applies to the DDIM sampler only, not to {self.scheduler.value}")
        return self


class GenerateRequest(_Styled):
    """Text to image."""

    width: Annotated[int, Field(ge=256, le=2048, multiple_of=8, description="Image width in pixels.")] = 1024
    height: Annotated[int, Field(ge=256, le=2048, multiple_of=8, description="Image height in pixels.")] = 1024
    num_images: Annotated[int, Field(ge=1, le=8, description="Images for this prompt.")] = 1
    refine: RefineMode = RefineMode.none
    high_noise_frac: Annotated[float, Field(ge=0.01, le=0.99, description="Ensemble: where the refiner takes over.")] = 0.8
    refiner_strength: Annotated[float, Field(ge=0.01, le=1, description="img2img refine: how much is redone.")] = 0.3

    @model_validator(mode="after")
    def _check_pixels(self) -> "GenerateRequest":
        limit = self.limits.max_pixels
        if self.width * self.height > limit:
            raise ValueError(
                f"width x height is {self.width}x{self.height} = {self.width * self.height} pixels; "
                f"the limit is {limit} pixels"
            )
        if self.hires is not None:
            up_w, up_h, out_w, out_h = self.hires.plan(self.width, self.height)
            if min(out_w, out_h) < 256 or max(out_w, out_h) > 2048:
                raise ValueError(f"hires: the hires size {out_w}x{out_h} is outside 256..2048 pixels a side")
            if up_w * up_h > limit:
                raise ValueError(f"hires: the hires size {up_w}x{up_h} = {up_w * up_h} pixels is above the limit "
                                 f"of {limit} pixels")
            if self.refine != RefineMode.none:
                raise ValueError("hires: a hires pass and the refiner do not combine; use one of them")
            hr_steps = self.hires.steps or self.steps
            if int(hr_steps * self.hires.denoising_strength) < 1:
                raise ValueError(f"hires: its steps x denoising_strength = {hr_steps} x "
                                 f"{self.hires.denoising_strength} runs no denoising step; raise either")
        if self.subseed_strength > 0 and self.num_images and self.subseed is not None \
                and self.subseed + self.num_images - 1 > MAX_SEED:
            raise ValueError(f"subseed: {self.subseed} + {self.num_images - 1} images is above {MAX_SEED}")
        return self

    hires: Annotated[Optional[HiresSpec], Field(description="Hires fix: a second pass at a larger size.")] = None
    subseed: Annotated[Optional[int], Field(ge=0, le=MAX_SEED, description="Variation seed of the first image "
                                                                         "(image i: subseed+i); random when absent "
                                                                         "and subseed_strength > 0.")] = None
    subseed_strength: Annotated[float, Field(ge=0, le=1, description="How far each image's starting noise moves "
                                                                     "towards its variation seed's (0: none, 1: "
                                                                     "all the way).")] = 0.0

    def subseeds(self, count: int) -> list[int] | None:
        """One variation seed per image (subseed, subseed+1, ...; a random start when none was given), or None
        without variation."""
        if self.subseed_strength <= 0:
            return None
        start = self.subseed if self.subseed is not None else secrets.randbelow(MAX_SEED + 1)
        return [(start + i) % (MAX_SEED + 1) for i in range(count)]


class CallerStamp(BaseModel):
    """Who sent a batch item and by when: set by the gateway, since BentoML's adaptive batching merges the
    items of several callers into one call."""

    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = None
    """The API key's name; None when the service runs without keys."""
    deadline_s: Annotated[float, Field(gt=0)]


class BatchRequest(GenerateRequest):
    """An item of ``/generate_batch``."""

    caller: SkipJsonSchema[Optional[CallerStamp]] = None
    """Set by the gateway (a client's is refused), so it is not in the API's schema."""


class RefineRequest(_Request):
    """Refine a stored image (by id) with the refiner and a new prompt."""

    image_id: Annotated[uuid.UUID, Field(description="Id of an image in the image store.")]
    strength: Annotated[float, Field(ge=0.01, le=1, description="How much of the image is redone.")] = 0.3


class Img2ImgRequest(_Styled):
    """Image to image: a starting image (base64, or a stored image's id) redone by ``strength``."""

    image: Annotated[Optional[str], Field(description="The starting image, base64 (PNG, JPEG or WebP; a data: URL "
                                                      "is fine).")] = None
    image_id: Annotated[Optional[uuid.UUID], Field(description="Or the id of a stored image.")] = None
    strength: Annotated[float, Field(ge=0.01, le=1, description="How much of the image is redone.")] = 0.6
    width: Annotated[Optional[int], Field(ge=256, le=2048, multiple_of=8,
                                          description="Output width; default: the image's.")] = None
    height: Annotated[Optional[int], Field(ge=256, le=2048, multiple_of=8,
                                           description="Output height; default: the image's.")] = None
    num_images: Annotated[int, Field(ge=1, le=8, description="Images for this prompt.")] = 1

    @model_validator(mode="after")
    def _check_source(self) -> "Img2ImgRequest":
        if (self.image is None) == (self.image_id is None):
            raise ValueError("give exactly one of image (base64) and image_id")
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"steps x strength = {self.steps} x {self.strength} runs no denoising step; "
                             "raise steps or strength")
        if self.width and self.height and self.width * self.height > self.limits.max_pixels:
            raise ValueError(f"width x height is {self.width * self.height} pixels; "
                             f"the limit is {self.limits.max_pixels} pixels")
        return self

    resize_mode: Annotated[ResizeMode, Field(description="How the image is brought to width x height: stretch, "
                                                         "crop (cover, then centre-crop) or fill (fit inside, the "
                                                         "edges stretched into the rest).")] = ResizeMode.stretch


class InpaintRequest(Img2ImgRequest):
    """Inpainting: like img2img, with a mask whose white pixels are repainted."""

    mask: Annotated[str, Field(description="The mask, base64; white = repaint, black = keep.")]
    strength: Annotated[float, Field(ge=0.01, le=1, description="How much the masked area is redone.")] = 0.99
    mask_blur: Annotated[int, Field(ge=0, le=64, description="Gaussian blur of the mask, in pixels (soft "
                                                             "edges).")] = 0
    mask_invert: Annotated[bool, Field(description="Repaint the black area instead of the white one.")] = False
    inpaint_fill: Annotated[InpaintFill, Field(description="What the masked area starts from: the image as it is, "
                                                           "or the blurred colours around it.")] = InpaintFill.original
    mask_padding: Annotated[Optional[int], Field(ge=0, le=1024, description="Only the masked area (and this many "
                                                                            "pixels around it) is inpainted, at "
                                                                            "the full size, then pasted back "
                                                                            "(A1111's inpaint_full_res); absent: "
                                                                            "the whole image.")] = None


@dataclass(frozen=True)
class Requests:
    """The request models with an operator's limits (subclasses of the models above, which keep the defaults)."""

    limits: Limits
    generate: type[GenerateRequest]
    refine: type[RefineRequest]
    img2img: type[Img2ImgRequest]
    inpaint: type[InpaintRequest]
    batch: type[BatchRequest]

    @classmethod
    def with_limits(cls, limits: Limits) -> Requests:
        def bind(model: type[_Request]) -> Any:
            return type(model.__name__, (model,), {"limits": limits, "__module__": model.__module__,
                                                   "__doc__": model.__doc__})

        return cls(limits, bind(GenerateRequest), bind(RefineRequest), bind(Img2ImgRequest), bind(InpaintRequest),
                   bind(BatchRequest))


class Timings(BaseModel):
    queue_s: float
    generate_s: float
    total_s: float


class ImageResult(BaseModel):
    id: Optional[str]
    """None when the safety check withheld the image (``finish_reason: content_filtered``)."""
    url: Optional[str]
    seed: int
    width: int
    height: int
    format: OutputFormat
    finish_reason: str = "success"
    base64: Optional[str] = None


class GenerateResponse(BaseModel):
    images: list[ImageResult]
    model: str
    refiner: Optional[str] = None
    synthetic: bool = False
    cache: Optional[str] = None
    """``hit`` when served from the result cache (no GPU work), ``miss`` when cacheable but generated."""
    timings: Timings
    parameters: dict[str, Any]


class ErrorInfo(BaseModel):
    type: str
    message: str


class BatchItem(BaseModel):
    """One request's answer in the batchable API: its result, or why it failed (the others still succeed)."""

    ok: bool
    result: Optional[GenerateResponse] = None
    error: Optional[ErrorInfo] = None


class ReplayRequest(BaseModel):
    """``POST /replay``: generate a stored image again, from its id or from its manifest."""

    model_config = ConfigDict(extra="forbid")

    image_id: Annotated[Optional[uuid.UUID], Field(description="An image of yours whose manifest to replay.")] = None
    manifest: Annotated[Optional[dict[str, Any]], Field(description="A manifest (``GET /images/{id}/manifest``).")] = (
        None)
    return_base64: Annotated[bool, Field(description="Also return the new image as base64.")] = False

    @model_validator(mode="after")
    def _check_source(self) -> "ReplayRequest":
        if (self.image_id is None) == (self.manifest is None):
            raise ValueError("give exactly one of image_id and manifest")
        return self
