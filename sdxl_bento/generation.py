"""From a validated request to stored, encoded images: the flow every API shares.

request -> works (one seed per image) -> scheduler (waits, batches, runs) -> encode with infotext
-> image store -> ``GenerateResponse``. The service's API methods only pick the answer's shape.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import Any, Callable

from .engine import BatchKey, Work
from .errors import DeadlineExceeded, ServiceError, Unavailable
from .images import MEDIA_TYPES, SAMPLER_LABELS, ImageStore, encode, infotext
from .scheduler import Job, Scheduler
from .schemas import (
    BatchItem,
    ErrorInfo,
    GenerateRequest,
    GenerateResponse,
    ImageResult,
    RefineMode,
    RefineRequest,
    Timings,
)


@dataclass
class Generated:
    id: str
    seed: int
    data: bytes
    media_type: str
    width: int
    height: int
    parameters: str


@dataclass(frozen=True)
class ModelInfo:
    base_tag: str
    refiner_tag: str | None
    synthetic: bool


class Generation:
    def __init__(self, scheduler: Scheduler, images: ImageStore, models: ModelInfo, *, timeout: float,
                 public_url: str = "") -> None:
        self.scheduler = scheduler
        self.images = images
        self.models = models
        self.timeout = timeout
        self.public_url = public_url.rstrip("/")

    # -- requests to works -------------------------------------------------------------------
    def txt2img_work(self, req: GenerateRequest) -> Work:
        if req.refine != RefineMode.none and self.models.refiner_tag is None:
            raise Unavailable(f"refine={req.refine.value} needs the refiner, which this server has not loaded",
                              field="refine")
        key = BatchKey(kind="txt2img", width=req.width, height=req.height, steps=req.steps,
                       guidance_scale=req.guidance_scale, scheduler=req.scheduler.value, refine=req.refine.value,
                       high_noise_frac=req.high_noise_frac if req.refine == RefineMode.ensemble else 0.8,
                       strength=req.refiner_strength if req.refine == RefineMode.img2img else 0.3,
                       has_negative=bool(req.negative_prompt))
        return Work(key=key, prompt=req.prompt, negative_prompt=req.negative_prompt, seeds=req.seeds(req.num_images))

    def refine_work(self, req: RefineRequest) -> Work:
        if self.models.refiner_tag is None:
            raise Unavailable("refining needs the refiner, which this server has not loaded")
        image = self.images.load(str(req.image_id))
        key = BatchKey(kind="refine", width=image.width, height=image.height, steps=req.steps,
                       guidance_scale=req.guidance_scale, scheduler=req.scheduler.value, strength=req.strength,
                       has_negative=bool(req.negative_prompt))
        return Work(key=key, prompt=req.prompt, negative_prompt=req.negative_prompt, seeds=req.seeds(1),
                    init_images=[image])

    # -- running -----------------------------------------------------------------------------
    def submit(self, works: list[Work], priority: int = 0) -> list[Job]:
        return self.scheduler.submit(works, timeout=self.timeout, priority=priority)

    async def wait(self, job: Job) -> list[Any]:
        """The job's images; on a timeout or when the waiter goes away, the job is cancelled."""
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)), self.timeout)
        except asyncio.TimeoutError:
            self.scheduler.cancel(job)
            raise DeadlineExceeded(f"the request did not finish within {self.timeout:g} s", reason="deadline",
                                   retry_after=30) from None
        except asyncio.CancelledError:
            self.scheduler.cancel(job)
            raise

    def store(self, job: Job, images: list[Any], req: GenerateRequest | RefineRequest) -> list[Generated]:
        """Encode each image with its own parameters and save it."""
        key, fmt = job.work.key, req.output_format.value
        out = []
        for seed, image in zip(job.work.seeds, images):
            params = self.parameters(req, key, seed)
            text = infotext(req.prompt, req.negative_prompt, params)
            data = encode(image, fmt, req.quality, text)
            image_id = self.images.save(data, fmt)
            out.append(Generated(image_id, seed, data, MEDIA_TYPES[fmt], image.width, image.height, text))
        return out

    def parameters(self, req: GenerateRequest | RefineRequest, key: BatchKey, seed: int) -> dict[str, Any]:
        params: dict[str, Any] = {
            "Steps": key.steps, "Sampler": SAMPLER_LABELS[key.scheduler], "CFG scale": key.guidance_scale,
            "Seed": seed, "Size": f"{key.width}x{key.height}", "Model": self.models.base_tag,
        }
        if key.kind == "refine":
            params.update({"Refiner": self.models.refiner_tag, "Denoising strength": key.strength,
                           "Source image": str(req.image_id)})  # type: ignore[union-attr]
        elif key.refine != "none":
            params.update({"Refiner": self.models.refiner_tag, "Refine mode": key.refine})
            params["Refiner switch at" if key.refine == "ensemble" else "Refiner strength"] = (
                key.high_noise_frac if key.refine == "ensemble" else key.strength)
        if self.models.synthetic:
            params["Synthetic"] = "true"
        return params

    async def run(self, req: GenerateRequest | RefineRequest, priority: int = 0,
                  on_submit: Callable[[list[Job]], None] | None = None) -> tuple[Job, list[Generated]]:
        """Submit one request, wait for it, store its images."""
        work = self.txt2img_work(req) if isinstance(req, GenerateRequest) else self.refine_work(req)
        (job,) = self.submit([work], priority)
        if on_submit is not None:
            on_submit([job])
        images = await self.wait(job)
        return job, await asyncio.to_thread(self.store, job, images, req)

    async def run_batch(self, requests: list[GenerateRequest], received: float) -> list[BatchItem]:
        """Submit all requests at once so that compatible ones share a pipeline call; answer each alone."""
        items: list[BatchItem | None] = [None] * len(requests)
        works, index = [], []
        for i, req in enumerate(requests):
            try:
                works.append(self.txt2img_work(req))
                index.append(i)
            except ServiceError as exc:
                items[i] = _failure(exc)
        try:
            jobs = self.submit(works) if works else []
        except ServiceError as exc:
            return [item or _failure(exc) for item in items]

        async def finish(req: GenerateRequest, job: Job) -> BatchItem:
            try:
                images = await self.wait(job)
                generated = await asyncio.to_thread(self.store, job, images, req)
            except ServiceError as exc:
                return _failure(exc)
            return BatchItem(ok=True, result=self.response(req, job, generated, received))

        done = await asyncio.gather(*(finish(requests[i], job) for i, job in zip(index, jobs)))
        for i, item in zip(index, done):
            items[i] = item
        return [item for item in items if item is not None]

    # -- answers -----------------------------------------------------------------------------
    def url(self, image_id: str) -> str:
        return f"{self.public_url}/images/{image_id}"

    def response(self, req: GenerateRequest | RefineRequest, job: Job, generated: list[Generated],
                 received: float) -> GenerateResponse:
        results = [
            ImageResult(id=g.id, url=self.url(g.id), seed=g.seed, width=g.width, height=g.height,
                        format=req.output_format,
                        base64=base64.b64encode(g.data).decode() if req.return_base64 else None)
            for g in generated
        ]
        uses_refiner = job.work.key.kind == "refine" or job.work.key.refine != "none"
        return GenerateResponse(
            images=results, model=self.models.base_tag,
            refiner=self.models.refiner_tag if uses_refiner else None, synthetic=self.models.synthetic,
            timings=Timings(queue_s=round(job.queue_seconds, 4), generate_s=round(job.run_seconds, 4),
                            total_s=round(time.monotonic() - received, 4)),
            parameters={**req.model_dump(mode="json", exclude={"return_base64"}),
                        "seeds": [g.seed for g in generated]},
        )


def _failure(exc: ServiceError) -> BatchItem:
    return BatchItem(ok=False, error=ErrorInfo(type=exc.type, message=exc.message))
