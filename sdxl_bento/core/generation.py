"""From a validated request to stored, encoded images: the flow every API shares.

request -> result cache (a hit costs no GPU) -> coalesce with an identical request in flight ->
works (one seed per image) -> scheduler (priority, deadline, batching) -> encode with infotext ->
image store -> cache -> ``GenerateResponse``. What happened is recorded in ``ctx.audit`` for the
gateway's audit line. The service's API methods only pick the answer's shape.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from .. import samplers
from ..errors import (
    Cancelled,
    ContentFiltered,
    DeadlineExceeded,
    GenerationFailed,
    InvalidRequest,
    NotFound,
    ServiceError,
    Unavailable,
)
from ..gpu.scheduler import Job, Scheduler
from ..jobs import BatchKey, Hires, Work
from ..schemas import (
    LIFECYCLE_FIELDS,
    BatchItem,
    ErrorInfo,
    GenerateRequest,
    GenerateResponse,
    ImageResult,
    Img2ImgRequest,
    InpaintRequest,
    RefineMode,
    RefineRequest,
    Timings,
)
from . import imageops, manifest
from .cache import CachedImage, Coalescer, ResultCache, cache_key
from .images import MEDIA_TYPES, ImageStore, encode, infotext
from .policy import OPEN_PRINCIPAL, Admission, Principal, check_size, max_pixels, may_use, owner_of, police
from .prompts import PromptPolicy
from .provenance import Claim, Model, Provenance, Source
from .safety import ImageGuard
from .styles import StyleBook
from .uploads import base64_bytes, decode_base64_image
from .watermark import Watermarker

Request = GenerateRequest | RefineRequest | Img2ImgRequest | InpaintRequest
_POST_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                   thread_name_prefix="sdxl-encode")
"""Watermark and encode of the images of one request, in parallel (the per-request work runs in a thread)."""
UPLOAD_MAX_PIXELS = 4096 * 4096
"""Largest uploaded image decoded (before it is resized to the request's size)."""


@dataclass(frozen=True)
class ModelInfo:
    base_tag: str
    refiner_tag: str | None
    synthetic: bool


@dataclass
class RequestContext:
    """Who asks, by when, and where to note what happened (the gateway's request state)."""

    principal: Principal = OPEN_PRINCIPAL
    deadline_s: float | None = None
    """The client's deadline (``X-Request-Deadline``); the tier's default applies when it is longer."""
    audit: dict[str, Any] = field(default_factory=dict)
    on_submit: Callable[[list[Job]], None] | None = None
    received: float = field(default_factory=time.monotonic)
    no_cache: bool = False
    """Generate even when the result cache holds the answer (a replay must run)."""
    previews: bool = False
    """Make preview images while it denoises (a task, whose events someone may follow)."""


@dataclass
class Outcome:
    images: list[CachedImage]
    model: str = ""
    """The checkpoint that made the images."""
    queue_s: float = 0.0
    gpu_s: float = 0.0
    cache: str | None = None
    """``hit``, ``miss`` or None (not cacheable)."""


class Generation:
    def __init__(self, scheduler: Scheduler, images: ImageStore, models: ModelInfo, *, timeout: float,
                 cache: ResultCache | None = None, cache_unseeded: bool = False, public_url: str = "",
                 metrics: Any = None, policy: PromptPolicy | None = None, guard: ImageGuard | None = None,
                 watermarker: Watermarker | None = None, resolve_model: Callable[[str], str] | None = None,
                 has_lora: Callable[[str], bool] | None = None, max_upload_bytes: int = 12 * 2**20,
                 sign_link: Callable[[str], str] | None = None, provenance: Provenance | None = None,
                 weights_sha256: Callable[[str], str | None] | None = None, styles: StyleBook | None = None,
                 describe: Callable[[BatchKey], dict[str, Any]] | None = None) -> None:
        self.scheduler = scheduler
        self.images = images
        self.models = models
        self.timeout = timeout
        self.cache = cache
        self.cache_unseeded = cache_unseeded
        self.coalescer = Coalescer()
        self.public_url = public_url.rstrip("/")
        self.metrics = metrics
        self._stats_at = 0.0
        self.policy = policy
        self.guard = guard
        self.watermarker = watermarker
        self._guard_lock = threading.Lock()
        self.resolve_model = resolve_model or (lambda tag: tag or models.base_tag)
        self.has_lora = has_lora or (lambda name: False)
        self.max_upload_bytes = max_upload_bytes
        self.sign_link = sign_link
        """With keys: an image id -> the query that lets its link open without a key (``http/signing.py``)."""
        self.provenance = provenance
        """With the operator's C2PA credentials: signs every image (``provenance.py``); None: no manifests."""
        self.weights_sha256 = weights_sha256 or (lambda tag: None)
        """A model or LoRA tag -> its weights' sha256, for the manifests."""
        self.styles = styles or StyleBook(None)
        """The operator's prompt styles (``styles: [...]`` in requests)."""
        self.describe = describe
        """A batch key -> what ran it (models and LoRAs with their weights' sha256, scheduler configuration,
        versions, device, acceleration): the environment part of each image's manifest (``manifest.py``)."""

    # -- requests to works -------------------------------------------------------------------
    def _style(self, req: GenerateRequest | Img2ImgRequest) -> dict[str, Any]:
        """The checkpoint (resolved now: an unknown one is a 400 before any queueing) and the LoRA set."""
        for name, _ in req.lora_key():
            if not self.has_lora(name):
                raise InvalidRequest(f"loras: no LoRA named {name!r} in the model store "
                                     f"(sdxl-bento models import-lora SOURCE --tag {name})", field="loras")
        return {"model": self.resolve_model(req.model or ""), "loras": req.lora_key()}

    def styled(self, req: Request) -> Request:
        """The request with its styles applied to its prompts (the styles stay named, for the parameters); an
        unknown style is a 400 before any queueing."""
        names = getattr(req, "styles", None)
        if not names:
            return req
        prompt, negative = self.styles.apply(list(names), req.prompt, req.negative_prompt)
        return req.model_copy(update={"prompt": prompt, "negative_prompt": negative})

    def load(self, image_id: str, principal: Principal) -> Any:
        """A stored image the caller may use; another key's answers as an unknown id would."""
        if not may_use(principal, self.images.info(image_id).owner):
            raise NotFound(f"no image with id {image_id}")
        return self.images.load(image_id)

    def _source_image(self, req: Img2ImgRequest, principal: Principal) -> Any:
        if req.image is not None:
            return decode_base64_image(req.image, max_pixels=UPLOAD_MAX_PIXELS, max_bytes=self.max_upload_bytes)
        return self.load(str(req.image_id), principal)

    def _size(self, req: Img2ImgRequest, image: Any, principal: Principal) -> tuple[int, int]:
        """The asked size, or the image's: scaled into the pixel limit (the service's and the caller's
        tier's), multiples of 8."""
        if req.width and req.height:
            return req.width, req.height
        width, height = req.width or image.width, req.height or image.height
        limit = max_pixels(principal.tier, req.limits.max_pixels)
        scale = min(1.0, (limit / (width * height)) ** 0.5, 2048 / max(width, height))
        width, height = int(width * scale) // 8 * 8, int(height * scale) // 8 * 8
        if min(width, height) < 256:
            raise InvalidRequest(f"the image is {image.width}x{image.height}; give width and height of at least "
                                 "256 (the image is resized to them)", field="image")
        check_size(principal.tier, width, height)
        return width, height

    def work(self, req: Request, principal: Principal = OPEN_PRINCIPAL) -> Work:
        if isinstance(req, Img2ImgRequest):
            image = self._source_image(req, principal)
            width, height = self._size(req, image, principal)
            kind = "inpaint" if isinstance(req, InpaintRequest) else "img2img"
            inpaint = isinstance(req, InpaintRequest)
            key = BatchKey(kind=kind, width=width, height=height, steps=req.steps, guidance_scale=req.guidance_scale,
                           scheduler=req.scheduler.value, strength=req.strength,
                           has_negative=bool(req.negative_prompt), approximation=req.approximation.value,
                           tiling=req.tiling, clip_skip=req.clip_skip, eta=req.eta,
                           mask_padding=req.mask_padding if inpaint else None, **self._style(req))
            seeds = req.seeds(req.num_images)
            if req.resize_mode.value != "stretch":
                image = imageops.resize(image, width, height, req.resize_mode.value)
            masks = None
            if inpaint:
                mask = decode_base64_image(req.mask, max_pixels=UPLOAD_MAX_PIXELS, max_bytes=self.max_upload_bytes,
                                           field="mask")
                mask = imageops.prepare_mask(mask, width, height, mode=req.resize_mode.value, blur=req.mask_blur,
                                             invert=req.mask_invert)
                if req.inpaint_fill.value == "fill":
                    image = imageops.fill_masked(imageops.resize(image, width, height), mask)
                masks = [mask] * len(seeds)
            return Work(key=key, prompt=req.prompt, negative_prompt=req.negative_prompt, seeds=seeds,
                        init_images=[image] * len(seeds), mask_images=masks)
        if isinstance(req, RefineRequest):
            if self.models.refiner_tag is None:
                raise Unavailable("refining needs the refiner, which this server has not loaded")
            image = self.load(str(req.image_id), principal)
            check_size(principal.tier, image.width, image.height)
            key = BatchKey(kind="refine", width=image.width, height=image.height, steps=req.steps,
                           guidance_scale=req.guidance_scale, scheduler=req.scheduler.value, strength=req.strength,
                           has_negative=bool(req.negative_prompt), approximation=req.approximation.value)
            return Work(key=key, prompt=req.prompt, negative_prompt=req.negative_prompt, seeds=req.seeds(1),
                        init_images=[image])
        if req.refine != RefineMode.none and self.models.refiner_tag is None:
            raise Unavailable(f"refine={req.refine.value} needs the refiner, which this server has not loaded",
                              field="refine")
        hires = None
        if req.hires is not None:
            up_w, up_h, out_w, out_h = req.hires.plan(req.width, req.height)
            negative = req.hires.negative_prompt if req.hires.negative_prompt is not None else req.negative_prompt
            hires = Hires(upscale_width=up_w, upscale_height=up_h, width=out_w, height=out_h,
                          steps=req.hires.steps or req.steps, strength=req.hires.denoising_strength,
                          upscaler=req.hires.upscaler.value,
                          scheduler=(req.hires.sampler or req.scheduler).value, has_negative=bool(negative))
        key = BatchKey(kind="txt2img", width=req.width, height=req.height, steps=req.steps,
                       guidance_scale=req.guidance_scale, scheduler=req.scheduler.value, refine=req.refine.value,
                       high_noise_frac=req.high_noise_frac if req.refine == RefineMode.ensemble else 0.8,
                       strength=req.refiner_strength if req.refine == RefineMode.img2img else 0.3,
                       has_negative=bool(req.negative_prompt), approximation=req.approximation.value,
                       hires=hires, tiling=req.tiling, clip_skip=req.clip_skip, eta=req.eta, **self._style(req))
        seeds = req.seeds(req.num_images)
        return Work(key=key, prompt=req.prompt, negative_prompt=req.negative_prompt, seeds=seeds,
                    subseeds=req.subseeds(len(seeds)), subseed_strength=req.subseed_strength,
                    hires_prompt=req.hires.prompt if req.hires is not None else None,
                    hires_negative_prompt=req.hires.negative_prompt if req.hires is not None else None)

    def admit(self, req: Request, ctx: RequestContext) -> Admission:
        """Before any GPU work, on the request that runs: the caller's tier (``policy.police``, as the
        gateway did before admitting it) and the operator's prompt policy."""
        admission = police(ctx.principal, req, deadline_s=ctx.deadline_s)
        if self.policy is not None:
            self.policy.enforce(req.prompt, req.negative_prompt)
        return admission

    def _cache_key(self, req: Request, work: Work, principal: Principal) -> str | None:
        if self.cache is None or (req.seed is None and not self.cache_unseeded):
            return None
        params = req.model_dump(mode="json", exclude={"return_base64", "caller", *LIFECYCLE_FIELDS})
        params["seeds"] = work.seeds
        if work.subseeds:
            params["subseeds"] = work.subseeds
        params["owner"] = owner_of(principal)  # no key learns from a hit what another key asked for
        model = (work.key.model or self.models.base_tag) + (f"+{self.models.refiner_tag}" if work.key.uses_refiner
                                                             else "")
        return cache_key(params, model, req.output_format.value)

    # -- running -----------------------------------------------------------------------------
    async def run(self, req: Request, ctx: RequestContext) -> Outcome:
        """One request: from the cache, joined to an identical one in flight, or generated."""
        ctx.audit["parameters"] = req.model_dump(mode="json", exclude={"prompt", "negative_prompt", "return_base64",
                                                                       "image", "mask", *LIFECYCLE_FIELDS})
        try:
            req = self.styled(req)
            admission = self.admit(req, ctx)
            work = self.work(req, ctx.principal)
            key = None if ctx.no_cache else self._cache_key(req, work, ctx.principal)
            if key is None:
                outcome = await self._generate(req, work, ctx, admission)
            else:
                outcome = await self._cached(req, work, key, ctx, admission)
        except ServiceError as exc:
            ctx.audit.update(outcome="cancelled" if isinstance(exc, Cancelled) else "error", reason=exc.type,
                             status=exc.status, message=exc.message)
            raise
        ctx.audit.update(outcome="ok", model=outcome.model or self.models.base_tag, cache=outcome.cache,
                         finish_reasons=[i.finish_reason for i in outcome.images],
                         queue_s=round(outcome.queue_s, 4), gpu_s=round(outcome.gpu_s, 4),
                         image_ids=[i.id for i in outcome.images if i.id], seeds=[i.seed for i in outcome.images])
        return outcome

    async def _cached(self, req: Request, work: Work, key: str, ctx: RequestContext,
                      admission: Admission) -> Outcome:
        cache = self.cache
        assert cache is not None
        hit = await asyncio.to_thread(cache.get, key)
        if hit is not None:
            self._count("cache_hits")
            owner = owner_of(ctx.principal)
            return Outcome(images=[self._local(image, owner) for image in hit], cache="hit", model=work.key.model)

        async def produce() -> Outcome:
            outcome = await self._generate(req, work, ctx, admission)
            if all(image.finish_reason == "success" for image in outcome.images):
                await asyncio.to_thread(self._put, key, outcome.images)
            return outcome

        outcome, shared = await self.coalescer.run(key, produce)
        self._count("coalesced" if shared else "cache_misses")
        return Outcome(images=outcome.images, queue_s=outcome.queue_s, gpu_s=0.0 if shared else outcome.gpu_s,
                       cache="hit" if shared else "miss", model=outcome.model)

    def _count(self, counter: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, counter).inc()

    def _put(self, key: str, images: list[CachedImage]) -> None:
        """Store in the cache; refresh the cache-size gauge at most every 30 s (Redis counts by scanning)."""
        assert self.cache is not None
        self.cache.put(key, images)
        if self.metrics is not None and time.monotonic() - self._stats_at > 30:
            self._stats_at = time.monotonic()
            self.metrics.observe_cache(self.cache.stats())

    def _local(self, image: CachedImage, owner: str | None) -> CachedImage:
        """A cached image as a file of this server's store (a Redis hit may come from another replica, or
        the image may have expired from the store)."""
        if image.id:
            try:
                self.images.info(image.id)
                return image
            except NotFound:
                pass
        if not image.data:
            return image  # withheld by the safety check: nothing to store
        fmt = next(f for f, m in MEDIA_TYPES.items() if m == image.media_type)
        return CachedImage(**{**image.__dict__, "id": self.images.save(image.data, fmt, owner=owner)})

    async def _generate(self, req: Request, work: Work, ctx: RequestContext, admission: Admission) -> Outcome:
        timeout = min(self.timeout, admission.deadline_s)
        work.previews = work.previews or ctx.previews
        (job,) = self.scheduler.submit([work], timeout=timeout, priority=admission.priority)
        if ctx.on_submit is not None:
            ctx.on_submit([job])
        images = await self.wait(job, timeout)
        stored = await asyncio.to_thread(self.store, job.work, images, req, owner_of(ctx.principal),
                                         self._edit_source(req) if self.provenance is not None else None,
                                         batch_images=job.batch_images)
        return Outcome(images=stored, queue_s=job.queue_seconds, gpu_s=job.run_seconds, model=work.key.model)

    def _edit_source(self, req: Request) -> Callable[[], Source | None] | None:
        """The image an edit starts from, for its manifest (read in the encode thread, off the event loop): a
        stored image (the caller's, checked by ``work``) is this service's; an upload is when it carries a valid
        manifest signed with this service's certificate."""
        image_id = getattr(req, "image_id", None)
        if image_id is not None:
            def stored() -> Source:
                info = self.images.info(str(image_id))
                return Source(data=info.path.read_bytes(), media_type=info.media_type, ours=True,
                              image_id=str(image_id))
            return stored
        upload = getattr(req, "image", None)
        if upload is None:
            return None

        def uploaded() -> Source:
            data = base64_bytes(upload, max_bytes=self.max_upload_bytes)  # as ``work`` decoded it
            with Image.open(io.BytesIO(data)) as header:  # the header only
                media_type = MEDIA_TYPES.get(str(header.format).lower(), "image/png")
            assert self.provenance is not None
            return Source(data=data, media_type=media_type, ours=self.provenance.is_ours(data))
        return uploaded

    async def wait(self, job: Job, timeout: float) -> list[Any]:
        """The job's images; on a timeout or when the waiter goes away, the job is cancelled."""
        result = asyncio.wrap_future(job.future)
        # The job's end is read even when nobody waits for it any more (a missed deadline, a caller gone), so
        # asyncio does not report its exception as never retrieved.
        result.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(result), timeout)
        except asyncio.TimeoutError:
            self.scheduler.cancel(job)
            raise DeadlineExceeded(f"the request did not finish within its deadline of {timeout:g} s",
                                   reason="deadline", retry_after=30) from None
        except asyncio.CancelledError:
            self.scheduler.cancel(job)
            raise

    def store(self, work: Work, images: list[Any], req: Request, owner: str | None = None,
              source: Callable[[], Source | None] | None = None, *,
              batch_images: int | None = None) -> list[CachedImage]:
        """Check each image (before it is stored, cached or returned), watermark it, encode it with its own
        parameters, sign it (C2PA, when configured; ``source``: what an edit started from) and save it. A
        withheld image keeps its place, with no id and no data."""
        key, fmt = work.key, req.output_format.value
        origin = source() if source is not None else None
        flagged = [False] * len(images)
        checked = self.guard is not None and req.safety_check
        if checked:
            with self._guard_lock:  # one checker model, one caller at a time
                images, verdicts = self.guard.review(images)
            flagged = [v.flagged for v in verdicts]
        environment = self.describe(key) if self.describe is not None else None
        postprocess = {"watermark": bool(self.watermarker and self.watermarker.enabled), "safety_check": checked,
                       "safety_action": self.guard.action if checked else None}
        index = {seed: i for i, seed in enumerate(work.seeds)}

        def manifest_of(seed: int, image: Any, data: bytes, was_flagged: bool) -> dict[str, Any] | None:
            if environment is None:
                return None
            pixels = manifest.pixels_sha256(image) if fmt == "png" else manifest.pixels_sha256(
                Image.open(io.BytesIO(data)))
            return manifest.build(req, key, seed, index[seed], environment, fmt=fmt, data=data, pixels=pixels,
                                  width=image.width, height=image.height, batch_images=batch_images or len(images),
                                  postprocess={**postprocess, "flagged": was_flagged})

        subseeds = work.subseeds or [None] * len(work.seeds)
        width, height = (key.hires.width, key.hires.height) if key.hires is not None else (key.width, key.height)

        def finish(seed: int, subseed: int | None, image: Any, was_flagged: bool) -> CachedImage:
            text = infotext(req.prompt, req.negative_prompt, self.parameters(req, key, seed, subseed))
            reason = "content_filtered" if was_flagged else "success"
            if image is None:
                return CachedImage(id="", seed=seed, media_type=MEDIA_TYPES[fmt], width=width,
                                   height=height, parameters=text, data=b"", finish_reason=reason)
            if self.watermarker is not None:
                (image,) = self.watermarker.apply([image])
            data = encode(image, fmt, req.quality, text)
            if self.provenance is not None:
                data = self._sign(data, fmt, self._claim(req, key, text, origin))
            saved = self.images.save(data, fmt, owner=owner, manifest=manifest_of(seed, image, data, was_flagged))
            return CachedImage(id=saved, seed=seed, media_type=MEDIA_TYPES[fmt],
                               width=image.width, height=image.height, parameters=text, data=data,
                               finish_reason=reason)

        # A request's images are watermarked and encoded side by side (both release the GIL): BENCHMARKS.md
        out = list(_POST_POOL.map(finish, work.seeds, subseeds, images, flagged)) if len(images) > 1 else \
            [finish(work.seeds[0], subseeds[0], images[0], flagged[0])]
        if self.metrics is not None and any(flagged):
            self.metrics.content_filtered.inc(sum(flagged))
        return out

    def _claim(self, req: Request, key: BatchKey, text: str, source: Source | None) -> Claim:
        """What an image's manifest says: the mode, the models with their weights' sha256, the parameters text."""
        refiner = Model(self.models.refiner_tag, self.weights_sha256(self.models.refiner_tag)) \
            if key.uses_refiner and self.models.refiner_tag else None
        tag = key.model or self.models.base_tag
        model = refiner if key.kind == "refine" and refiner is not None else Model(tag, self.weights_sha256(tag))
        return Claim(mode=key.kind, model=model, parameters=text, prompt=req.prompt,
                     negative_prompt=req.negative_prompt, refiner=refiner if model is not refiner else None,
                     loras=tuple((name, weight, self.weights_sha256(name)) for name, weight in key.loras),
                     source=source)

    def _sign(self, data: bytes, fmt: str, claim: Claim) -> bytes:
        """The encoded image with its C2PA manifest; a refusal of the C2PA library fails the request (a promised
        manifest is never silently left out)."""
        assert self.provenance is not None
        started = time.perf_counter()
        try:
            signed = self.provenance.sign(data, MEDIA_TYPES[fmt], claim)
        except Exception as exc:
            if self.metrics is not None:
                self.metrics.c2pa_sign_failures.inc()
            raise GenerationFailed(f"the image could not be signed (C2PA): {exc}") from exc
        if self.metrics is not None:
            self.metrics.c2pa_sign_seconds.labels(format=fmt).observe(time.perf_counter() - started)
        return signed

    def parameters(self, req: Request, key: BatchKey, seed: int, subseed: int | None = None) -> dict[str, Any]:
        """The infotext's ``Key: value`` pairs, in AUTOMATIC1111's names where it has one."""
        params: dict[str, Any] = {
            "Steps": key.steps, "Sampler": samplers.label(key.scheduler), "CFG scale": key.guidance_scale,
            "Seed": seed, "Size": f"{key.width}x{key.height}", "Model": key.model or self.models.base_tag,
        }
        if subseed is not None:
            params.update({"Variation seed": subseed, "Variation seed strength": getattr(req, "subseed_strength", 0)})
        if key.clip_skip != 1:
            params["Clip skip"] = key.clip_skip
        if key.eta is not None:
            params["Eta DDIM"] = key.eta
        if key.tiling:
            params["Tiling"] = "True"
        if getattr(req, "styles", None):
            params["Styles"] = ", ".join(req.styles)  # type: ignore[union-attr]
        if key.loras:
            params["Lora"] = " ".join(f"{name}:{weight:g}" for name, weight in key.loras)
        if key.hires is not None:
            spec = req.hires  # type: ignore[union-attr]
            params["Denoising strength"] = key.hires.strength
            if spec.width is None and spec.height is None:
                params["Hires upscale"] = spec.scale
            else:
                params["Hires resize"] = f"{key.hires.width}x{key.hires.height}"
            params.update({"Hires steps": key.hires.steps, "Hires upscaler": key.hires.upscaler})
            if key.hires.scheduler != key.scheduler:
                params["Hires sampler"] = samplers.label(key.hires.scheduler)
            if spec.prompt is not None:
                params["Hires prompt"] = spec.prompt
            if spec.negative_prompt is not None:
                params["Hires negative prompt"] = spec.negative_prompt
        if key.kind in ("img2img", "inpaint"):
            params.update({"Mode": key.kind, "Denoising strength": key.strength})
            if getattr(req, "resize_mode", None) is not None and req.resize_mode.value != "stretch":  # type: ignore
                params["Resize mode"] = req.resize_mode.value  # type: ignore[union-attr]
            if isinstance(req, InpaintRequest):
                if req.mask_blur:
                    params["Mask blur"] = req.mask_blur
                if req.mask_invert:
                    params["Mask mode"] = "Inpaint not masked"
                if req.inpaint_fill.value != "original":
                    params["Masked content"] = req.inpaint_fill.value
                if req.mask_padding is not None:
                    params["Inpaint area"] = "Only masked"
                    params["Masked area padding"] = req.mask_padding
            if getattr(req, "image_id", None):
                params["Source image"] = str(req.image_id)  # type: ignore[union-attr]
        elif isinstance(req, RefineRequest):
            params.update({"Refiner": self.models.refiner_tag, "Denoising strength": key.strength,
                           "Source image": str(req.image_id)})
        elif key.refine != "none":
            params.update({"Refiner": self.models.refiner_tag, "Refine mode": key.refine})
            params["Refiner switch at" if key.refine == "ensemble" else "Refiner strength"] = (
                key.high_noise_frac if key.refine == "ensemble" else key.strength)
        if key.approximation != "none":
            params["Approximation"] = key.approximation
        if self.models.synthetic:
            params["Synthetic"] = "true"
        return params

    async def run_batch(self, items: list[tuple[GenerateRequest, RequestContext]]) -> list[BatchItem]:
        """Submit all items at once so that compatible ones share a pipeline call; answer each alone. Each
        item carries its own caller (BentoML merges several callers' items): its tier, priority, deadline."""
        answers: list[BatchItem | None] = [None] * len(items)
        items = list(items)
        works, index, admissions = [], [], []
        for i, (req, ctx) in enumerate(items):
            try:
                req = self.styled(req)
                items[i] = (req, ctx)
                admission, work = self.admit(req, ctx), self.work(req, ctx.principal)
            except ServiceError as exc:
                answers[i] = _failure(exc)
                continue
            admissions.append(admission)
            works.append(work)
            index.append(i)
        timeouts = [min(self.timeout, a.deadline_s) for a in admissions]
        try:
            jobs = self.scheduler.submit(works, timeout=timeouts, priority=[a.priority for a in admissions]) \
                if works else []
        except ServiceError as exc:
            return [answer or _failure(exc) for answer in answers]

        async def finish(req: GenerateRequest, ctx: RequestContext, job: Job, timeout: float) -> BatchItem:
            try:
                images = await self.wait(job, timeout)
                stored = await asyncio.to_thread(self.store, job.work, images, req, owner_of(ctx.principal),
                                                 batch_images=job.batch_images)
            except ServiceError as exc:
                return _failure(exc)
            outcome = Outcome(images=stored, queue_s=job.queue_seconds, gpu_s=job.run_seconds, model=job.work.key.model)
            return BatchItem(ok=True, result=self.response(req, outcome, ctx))

        done = await asyncio.gather(*(finish(*items[i], job, timeout) for i, job, timeout in zip(index, jobs, timeouts)))
        for i, answer in zip(index, done):
            answers[i] = answer
        return [answer for answer in answers if answer is not None]

    # -- answers -----------------------------------------------------------------------------
    def url(self, image_id: str, principal: Principal = OPEN_PRINCIPAL) -> str:
        """The image's link; with keys, signed and expiring (``signing``), so it opens without a key."""
        link = f"{self.public_url}/images/{image_id}"
        if principal.anonymous or self.sign_link is None:
            return link
        return f"{link}?{self.sign_link(image_id)}"

    def response(self, req: Request, outcome: Outcome, ctx: RequestContext) -> GenerateResponse:
        results = [
            ImageResult(id=i.id or None, url=self.url(i.id, ctx.principal) if i.id else None, seed=i.seed, width=i.width,
                        height=i.height, format=req.output_format, finish_reason=i.finish_reason,
                        base64=base64.b64encode(i.data).decode() if req.return_base64 and i.data else None)
            for i in outcome.images
        ]
        uses_refiner = isinstance(req, RefineRequest) or getattr(req, "refine", RefineMode.none) != RefineMode.none
        return GenerateResponse(
            images=results, model=outcome.model or self.models.base_tag,
            refiner=self.models.refiner_tag if uses_refiner else None, synthetic=self.models.synthetic,
            cache=outcome.cache,
            timings=Timings(queue_s=round(outcome.queue_s, 4), generate_s=round(outcome.gpu_s, 4),
                            total_s=round(time.monotonic() - ctx.received, 4)),
            parameters={**req.model_dump(mode="json", exclude={"return_base64", "image", "mask", *LIFECYCLE_FIELDS}),
                        "seeds": [i.seed for i in outcome.images]},
        )


class Replays:
    """``POST /replay``: a stored image's manifest (or a given one) run again, and the two compared."""

    def __init__(self, images: ImageStore, requests: Any = None) -> None:
        self.images = images
        self.requests = requests
        """``schemas.Requests`` with the operator's limits."""

    def source(self, body: Any, principal: Principal) -> tuple[dict[str, Any], str | None]:
        """The manifest to replay and the id of its image when the caller may read it."""
        images = self.images
        if body.image_id is not None:
            image_id = str(body.image_id)
            if not may_use(principal, images.info(image_id).owner):
                raise NotFound(f"no image with id {image_id}")
            return images.manifest(image_id), image_id
        given = body.manifest
        image = given.get("image") if isinstance(given, dict) else None
        image_id = image.get("id") if isinstance(image, dict) else None
        try:
            if isinstance(image_id, str) and may_use(principal, images.info(image_id).owner):
                return given, str(image_id)
        except ServiceError:
            pass
        return given, None

    def requests_of(self, body: Any, principal: Principal) -> list[Any]:
        """The typed request a replay runs (what the gateway polices), from the raw body."""
        from ..schemas import ReplayRequest

        found, _ = self.source(ReplayRequest.model_validate(body), principal)
        return [manifest.request_from(found, self.requests)]

    async def run(self, body: Any, ctx: RequestContext, generation: Generation) -> dict[str, Any]:
        found, original_id = self.source(body, ctx.principal)
        req = manifest.request_from(found, self.requests)
        ctx.no_cache = True
        outcome = await generation.run(req, ctx)
        (image,) = outcome.images
        if not image.data:
            raise ContentFiltered("the replayed image was withheld by the safety check",
                                  finish_reason="content_filtered", seed=image.seed)
        replayed = self.images.manifest(image.id)
        original = None
        if original_id is not None:
            path, _ = self.images.find(original_id)
            original = await asyncio.to_thread(path.read_bytes)
        image_facts = found.get("image")
        pixels = image_facts.get("pixels_sha256") if isinstance(image_facts, dict) else None
        pixels = pixels if isinstance(pixels, str) else None
        comparison = await asyncio.to_thread(manifest.compare, original, image.data, pixels)
        result = ImageResult(id=image.id, url=generation.url(image.id, ctx.principal), seed=image.seed,
                             width=image.width, height=image.height, format=req.output_format,
                             finish_reason=image.finish_reason,
                             base64=base64.b64encode(image.data).decode() if body.return_base64 else None)
        return {**comparison, "original_image_id": original_id, "image": result.model_dump(mode="json"),
                "differences": manifest.differences(found, replayed), "manifest": replayed,
                "timings": {"queue_s": round(outcome.queue_s, 4), "generate_s": round(outcome.gpu_s, 4)}}


def _failure(exc: ServiceError) -> BatchItem:
    return BatchItem(ok=False, error=ErrorInfo(type=exc.type, message=exc.message))
