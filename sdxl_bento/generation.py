"""From a validated request to stored, encoded images: the flow every API shares.

request -> result cache (a hit costs no GPU) -> coalesce with an identical request in flight ->
works (one seed per image) -> scheduler (priority, deadline, batching) -> encode with infotext ->
image store -> cache -> ``GenerateResponse``. What happened is recorded in ``ctx.audit`` for the
gateway's audit line. The service's API methods only pick the answer's shape.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .auth import OPEN_PRINCIPAL, Forbidden, Principal
from .cache import CachedImage, Coalescer, ResultCache, cache_key
from .engine import BatchKey, Work
from .errors import Cancelled, DeadlineExceeded, InvalidRequest, NotFound, ServiceError, Unavailable
from .images import MEDIA_TYPES, SAMPLER_LABELS, ImageStore, encode, infotext
from .safety import ImageGuard, PromptPolicy, Watermarker
from .uploads import decode_base64_image
from .scheduler import Job, Scheduler
from .schemas import (
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

Request = GenerateRequest | RefineRequest | Img2ImgRequest | InpaintRequest
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
    audit: dict[str, Any] = field(default_factory=dict)
    on_submit: Callable[[list[Job]], None] | None = None
    received: float = field(default_factory=time.monotonic)


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
                 has_lora: Callable[[str], bool] | None = None, max_upload_bytes: int = 12 * 2**20) -> None:
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

    # -- requests to works -------------------------------------------------------------------
    def _style(self, req: GenerateRequest | Img2ImgRequest) -> dict[str, Any]:
        """The checkpoint (resolved now: an unknown one is a 400 before any queueing) and the LoRA set."""
        for name, _ in req.lora_key():
            if not self.has_lora(name):
                raise InvalidRequest(f"loras: no LoRA named {name!r} in the model store "
                                     f"(sdxl-bento models import-lora SOURCE --tag {name})", field="loras")
        return {"model": self.resolve_model(req.model or ""), "loras": req.lora_key()}

    def _source_image(self, req: Img2ImgRequest) -> Any:
        if req.image is not None:
            return decode_base64_image(req.image, max_pixels=UPLOAD_MAX_PIXELS, max_bytes=self.max_upload_bytes)
        return self.images.load(str(req.image_id))

    def _size(self, req: Img2ImgRequest, image: Any) -> tuple[int, int]:
        """The asked size, or the image's: scaled into the pixel limit, multiples of 8."""
        if req.width and req.height:
            return req.width, req.height
        width, height = req.width or image.width, req.height or image.height
        scale = min(1.0, (req.limits.max_pixels / (width * height)) ** 0.5, 2048 / max(width, height))
        width, height = int(width * scale) // 8 * 8, int(height * scale) // 8 * 8
        if min(width, height) < 256:
            raise InvalidRequest(f"the image is {image.width}x{image.height}; give width and height of at least "
                                 "256 (the image is resized to them)", field="image")
        return width, height

    def work(self, req: Request) -> Work:
        if isinstance(req, Img2ImgRequest):
            image = self._source_image(req)
            width, height = self._size(req, image)
            kind = "inpaint" if isinstance(req, InpaintRequest) else "img2img"
            key = BatchKey(kind=kind, width=width, height=height, steps=req.steps, guidance_scale=req.guidance_scale,
                           scheduler=req.scheduler.value, strength=req.strength,
                           has_negative=bool(req.negative_prompt), approximation=req.approximation.value,
                           **self._style(req))
            seeds = req.seeds(req.num_images)
            masks = None
            if isinstance(req, InpaintRequest):
                mask = decode_base64_image(req.mask, max_pixels=UPLOAD_MAX_PIXELS, max_bytes=self.max_upload_bytes,
                                           field="mask")
                masks = [mask] * len(seeds)
            return Work(key=key, prompt=req.prompt, negative_prompt=req.negative_prompt, seeds=seeds,
                        init_images=[image] * len(seeds), mask_images=masks)
        if isinstance(req, RefineRequest):
            if self.models.refiner_tag is None:
                raise Unavailable("refining needs the refiner, which this server has not loaded")
            image = self.images.load(str(req.image_id))
            key = BatchKey(kind="refine", width=image.width, height=image.height, steps=req.steps,
                           guidance_scale=req.guidance_scale, scheduler=req.scheduler.value, strength=req.strength,
                           has_negative=bool(req.negative_prompt), approximation=req.approximation.value)
            return Work(key=key, prompt=req.prompt, negative_prompt=req.negative_prompt, seeds=req.seeds(1),
                        init_images=[image])
        if req.refine != RefineMode.none and self.models.refiner_tag is None:
            raise Unavailable(f"refine={req.refine.value} needs the refiner, which this server has not loaded",
                              field="refine")
        key = BatchKey(kind="txt2img", width=req.width, height=req.height, steps=req.steps,
                       guidance_scale=req.guidance_scale, scheduler=req.scheduler.value, refine=req.refine.value,
                       high_noise_frac=req.high_noise_frac if req.refine == RefineMode.ensemble else 0.8,
                       strength=req.refiner_strength if req.refine == RefineMode.img2img else 0.3,
                       has_negative=bool(req.negative_prompt), approximation=req.approximation.value,
                       **self._style(req))
        return Work(key=key, prompt=req.prompt, negative_prompt=req.negative_prompt, seeds=req.seeds(req.num_images))

    def check(self, req: Request, ctx: RequestContext) -> None:
        """Before any GPU work: the operator's prompt policy, and who may turn the image check off."""
        if self.policy is not None:
            self.policy.enforce(req.prompt, req.negative_prompt)
        if not req.safety_check and not ctx.principal.tier.safety_optional:
            raise Forbidden(f"the {ctx.principal.tier.name} tier may not turn off the safety check",
                            limit="safety_optional")

    def _cache_key(self, req: Request, work: Work) -> str | None:
        if self.cache is None or (req.seed is None and not self.cache_unseeded):
            return None
        params = req.model_dump(mode="json", exclude={"return_base64"})
        params["seeds"] = work.seeds
        uses_refiner = work.key.kind == "refine" or work.key.refine != "none"
        model = (work.key.model or self.models.base_tag) + (f"+{self.models.refiner_tag}" if uses_refiner else "")
        return cache_key(params, model, req.output_format.value)

    # -- running -----------------------------------------------------------------------------
    async def run(self, req: Request, ctx: RequestContext) -> Outcome:
        """One request: from the cache, joined to an identical one in flight, or generated."""
        ctx.audit["parameters"] = req.model_dump(mode="json", exclude={"prompt", "negative_prompt", "return_base64",
                                                                       "image", "mask"})
        try:
            self.check(req, ctx)
            work = self.work(req)
            key = self._cache_key(req, work)
            if key is None:
                outcome = await self._generate(req, work, ctx)
            else:
                outcome = await self._cached(req, work, key, ctx)
        except ServiceError as exc:
            ctx.audit.update(outcome="cancelled" if isinstance(exc, Cancelled) else "error", reason=exc.type,
                             status=exc.status, message=exc.message)
            raise
        ctx.audit.update(outcome="ok", model=outcome.model or self.models.base_tag, cache=outcome.cache,
                         finish_reasons=[i.finish_reason for i in outcome.images],
                         queue_s=round(outcome.queue_s, 4), gpu_s=round(outcome.gpu_s, 4),
                         image_ids=[i.id for i in outcome.images if i.id], seeds=[i.seed for i in outcome.images])
        return outcome

    async def _cached(self, req: Request, work: Work, key: str, ctx: RequestContext) -> Outcome:
        cache = self.cache
        assert cache is not None
        hit = await asyncio.to_thread(cache.get, key)
        if hit is not None:
            self._count("cache_hits")
            return Outcome(images=[self._local(image) for image in hit], cache="hit", model=work.key.model)

        async def produce() -> Outcome:
            outcome = await self._generate(req, work, ctx)
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

    def _local(self, image: CachedImage) -> CachedImage:
        """A cached image as a file of this server's store (a Redis hit may come from another replica)."""
        try:
            self.images.find(image.id)
            return image
        except NotFound:
            fmt = next(f for f, m in MEDIA_TYPES.items() if m == image.media_type)
            return CachedImage(**{**image.__dict__, "id": self.images.save(image.data, fmt)})

    async def _generate(self, req: Request, work: Work, ctx: RequestContext) -> Outcome:
        timeout = min(self.timeout, ctx.deadline_s or self.timeout)
        (job,) = self.scheduler.submit([work], timeout=timeout, priority=ctx.principal.tier.priority)
        if ctx.on_submit is not None:
            ctx.on_submit([job])
        images = await self.wait(job, timeout)
        stored = await asyncio.to_thread(self.store, job.work, images, req)
        return Outcome(images=stored, queue_s=job.queue_seconds, gpu_s=job.run_seconds, model=work.key.model)

    async def wait(self, job: Job, timeout: float) -> list[Any]:
        """The job's images; on a timeout or when the waiter goes away, the job is cancelled."""
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)), timeout)
        except asyncio.TimeoutError:
            self.scheduler.cancel(job)
            raise DeadlineExceeded(f"the request did not finish within its deadline of {timeout:g} s",
                                   reason="deadline", retry_after=30) from None
        except asyncio.CancelledError:
            self.scheduler.cancel(job)
            raise

    def store(self, work: Work, images: list[Any], req: Request) -> list[CachedImage]:
        """Check each image (before it is stored, cached or returned), watermark it, encode it with its own
        parameters and save it. A withheld image keeps its place, with no id and no data."""
        key, fmt = work.key, req.output_format.value
        flagged = [False] * len(images)
        if self.guard is not None and req.safety_check:
            with self._guard_lock:  # one checker model, one caller at a time
                images, verdicts = self.guard.review(images)
            flagged = [v.flagged for v in verdicts]
        if self.watermarker is not None:
            kept = self.watermarker.apply([i for i in images if i is not None])
            images = [kept.pop(0) if i is not None else None for i in images]
        out = []
        for seed, image, was_flagged in zip(work.seeds, images, flagged):
            text = infotext(req.prompt, req.negative_prompt, self.parameters(req, key, seed))
            reason = "content_filtered" if was_flagged else "success"
            if image is None:
                out.append(CachedImage(id="", seed=seed, media_type=MEDIA_TYPES[fmt], width=key.width,
                                       height=key.height, parameters=text, data=b"", finish_reason=reason))
                continue
            data = encode(image, fmt, req.quality, text)
            out.append(CachedImage(id=self.images.save(data, fmt), seed=seed, media_type=MEDIA_TYPES[fmt],
                                   width=image.width, height=image.height, parameters=text, data=data,
                                   finish_reason=reason))
        if self.metrics is not None and any(flagged):
            self.metrics.content_filtered.inc(sum(flagged))
        return out

    def parameters(self, req: Request, key: BatchKey, seed: int) -> dict[str, Any]:
        params: dict[str, Any] = {
            "Steps": key.steps, "Sampler": SAMPLER_LABELS[key.scheduler], "CFG scale": key.guidance_scale,
            "Seed": seed, "Size": f"{key.width}x{key.height}", "Model": key.model or self.models.base_tag,
        }
        if key.loras:
            params["Lora"] = " ".join(f"{name}:{weight:g}" for name, weight in key.loras)
        if key.kind in ("img2img", "inpaint"):
            params.update({"Mode": key.kind, "Denoising strength": key.strength})
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

    async def run_batch(self, requests: list[GenerateRequest], ctx: RequestContext) -> list[BatchItem]:
        """Submit all requests at once so that compatible ones share a pipeline call; answer each alone."""
        items: list[BatchItem | None] = [None] * len(requests)
        works, index = [], []
        for i, req in enumerate(requests):
            try:
                self.check(req, ctx)
                works.append(self.work(req))
                index.append(i)
            except ServiceError as exc:
                items[i] = _failure(exc)
        timeout = min(self.timeout, ctx.deadline_s or self.timeout)
        try:
            jobs = self.scheduler.submit(works, timeout=timeout, priority=ctx.principal.tier.priority) if works else []
        except ServiceError as exc:
            return [item or _failure(exc) for item in items]

        async def finish(req: GenerateRequest, job: Job) -> BatchItem:
            try:
                images = await self.wait(job, timeout)
                stored = await asyncio.to_thread(self.store, job.work, images, req)
            except ServiceError as exc:
                return _failure(exc)
            outcome = Outcome(images=stored, queue_s=job.queue_seconds, gpu_s=job.run_seconds, model=job.work.key.model)
            return BatchItem(ok=True, result=self.response(req, outcome, ctx))

        done = await asyncio.gather(*(finish(requests[i], job) for i, job in zip(index, jobs)))
        for i, item in zip(index, done):
            items[i] = item
        answered = [item for item in items if item is not None]
        ctx.audit.update(outcome="ok" if all(i.ok for i in answered) else "error",
                         image_ids=[img.id for i in answered if i.result for img in i.result.images])
        return answered

    # -- answers -----------------------------------------------------------------------------
    def url(self, image_id: str) -> str:
        return f"{self.public_url}/images/{image_id}"

    def response(self, req: Request, outcome: Outcome, ctx: RequestContext) -> GenerateResponse:
        results = [
            ImageResult(id=i.id or None, url=self.url(i.id) if i.id else None, seed=i.seed, width=i.width,
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
            parameters={**req.model_dump(mode="json", exclude={"return_base64", "image", "mask"}),
                        "seeds": [i.seed for i in outcome.images]},
        )


def _failure(exc: ServiceError) -> BatchItem:
    return BatchItem(ok=False, error=ErrorInfo(type=exc.type, message=exc.message))
