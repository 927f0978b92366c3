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


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 500
    max_pixels: int = 1536 * 1536
    max_loras: int = 4


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200, description="LoRA name in the model store.")]
    weight: Annotated[float, Field(ge=-2, le=2, description="Adapter weight; 0 is the same as leaving it out.")] = 1.0


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
        return self


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


class InpaintRequest(Img2ImgRequest):
    """Inpainting: like img2img, with a mask whose white pixels are repainted."""

    mask: Annotated[str, Field(description="The mask, base64; white = repaint, black = keep.")]
    strength: Annotated[float, Field(ge=0.01, le=1, description="How much the masked area is redone.")] = 0.99


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
