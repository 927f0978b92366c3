"""sdxl-bento: Stable Diffusion XL 1.0 behind BentoML.  Run: ``bentoml serve service:SDXL``.

Each API method is: validate (BentoML, with the pydantic schemas) -> submit to the scheduler,
which alone drives the GPU -> encode the answer. Errors are ``ServiceError``s, answered in one
JSON shape by ``errors.to_response``.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from sdxl_bento import schemas, store
from sdxl_bento.errors import Cancelled, InvalidRequest, ModelMissing, ServiceError, to_response
from sdxl_bento.generation import Generation, ModelInfo
from sdxl_bento.images import ImageStore
from sdxl_bento.schemas import GenerateRequest, GenerateResponse, RefineRequest
from sdxl_bento.settings import Settings
from sdxl_bento.tasks import TaskCancelled, TaskControl, TaskRegistry

logger = logging.getLogger("sdxl_bento.service")

settings = Settings()
schemas.configure(schemas.Limits(max_prompt_chars=settings.max_prompt_chars, max_pixels=settings.max_pixels))
image_store = ImageStore(settings.image_dir)
task_registry = TaskRegistry()

if store.find(settings.base_model) is None:
    raise ModelMissing(f"cannot start: SDXL base model {settings.base_model!r} is not in the Bento model store. "
                       f"Put it there with:\n  {store.fix_command('base', settings.base_model)}")
_with_refiner = settings.refiner == "on" or (settings.refiner == "auto" and store.find(settings.refiner_model))


async def _get_image(request: Request) -> Response:
    try:
        path, media_type = image_store.find(request.path_params["image_id"])
    except ServiceError as exc:
        return to_response(exc)
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=31536000, immutable"})


images_app = Starlette(routes=[Route("/{image_id}", _get_image, methods=["GET"])])


def answers_errors(func):
    """Turn ``ServiceError`` into its JSON answer (BentoML would hide the message of a 5xx).

    BentoML copies ``ctx.response.status_code`` onto the answer of an API that takes a Context,
    so the status is set there too.
    """

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await func(*args, **kwargs)
        except ServiceError as exc:
            ctx = kwargs.get("ctx")
            if ctx is not None:
                ctx.response.status_code = exc.status
            return to_response(exc)

    return wrapper


@bentoml.asgi_app(images_app, path="/images")
@bentoml.service(
    name="sdxl",
    description="Stable Diffusion XL 1.0 text-to-image, with refiner, batching and async tasks.",
    traffic=settings.traffic(),
    workers=settings.workers,
    labels={"project": "sdxl-bento"},
)
class SDXL:
    base_model = bentoml.models.BentoModel(settings.base_model)
    if _with_refiner:
        refiner_model = bentoml.models.BentoModel(settings.refiner_model)

    def __init__(self) -> None:
        from sdxl_bento.engine import Engine
        from sdxl_bento.scheduler import Scheduler

        base = store.from_model(self.base_model)
        refiner = store.from_model(self.refiner_model) if _with_refiner else None
        for stored in filter(None, (base, refiner)):
            if stored.synthetic:
                logger.warning("!!! SERVING A SYNTHETIC MODEL: %s has random weights (%s); its images are noise. "
                               "Import real SDXL weights with `sdxl-bento models import`. !!!",
                               stored.tag, stored.metadata.get("source"))
        self.engine = Engine(base, refiner, device=settings.device)
        warmup = self.engine.warmup()
        logger.info("warm-up took %.2f s", warmup)
        self.scheduler = Scheduler(self.engine, max_batch_requests=settings.concurrency,
                                   max_batch_images=settings.max_batch_images, max_jobs=settings.max_concurrency)
        self.scheduler.start()
        task_registry.scheduler = self.scheduler
        self.generation = Generation(
            self.scheduler, image_store,
            ModelInfo(base.tag, refiner.tag if refiner else None, self.engine.models.synthetic),
            timeout=settings.timeout, public_url=settings.public_url,
        )

    @bentoml.on_shutdown
    def _stop(self) -> None:
        self.scheduler.stop()

    @bentoml.api(input_spec=GenerateRequest, route="/txt2img")
    @answers_errors
    async def txt2img(self, **fields: Any) -> bytes:
        """One image, as the raw PNG/JPEG/WebP body; seed and parameters in headers and in the file."""
        received = time.monotonic()
        req = GenerateRequest.model_validate(fields)
        if req.num_images != 1:
            raise InvalidRequest("/txt2img returns one image; use /generate for several", field="num_images")
        job, (image,) = await self.generation.run(req)
        return Response(content=image.data, media_type=image.media_type, headers={
            "Seed": str(image.seed), "Finish-Reason": "success", "X-Image-Id": image.id,
            "X-Image-Url": self.generation.url(image.id), "X-Model": self.generation.models.base_tag,
            "X-Parameters": image.parameters.encode("unicode_escape").decode("ascii"),
            "X-Generate-Seconds": f"{job.run_seconds:.4f}", "X-Total-Seconds": f"{time.monotonic() - received:.4f}",
        })

    @bentoml.api(input_spec=GenerateRequest, route="/generate")
    @answers_errors
    async def generate(self, **fields: Any) -> GenerateResponse:
        """Images as JSON: id, url, seed (and base64 when asked) for each, with timings."""
        received = time.monotonic()
        req = GenerateRequest.model_validate(fields)
        job, generated = await self.generation.run(req)
        return self.generation.response(req, job, generated, received)

    @bentoml.api(input_spec=RefineRequest, route="/refine")
    @answers_errors
    async def refine(self, **fields: Any) -> GenerateResponse:
        """Refine a stored image (by id) with the refiner and a new prompt."""
        received = time.monotonic()
        req = RefineRequest.model_validate(fields)
        job, generated = await self.generation.run(req)
        return self.generation.response(req, job, generated, received)

    # BentoML's batcher refuses (503) work it expects to exceed max_latency_ms, counting generation time;
    # our scheduler enforces the deadline, so the batcher gets the whole timeout.
    @bentoml.api(batchable=True, max_batch_size=settings.concurrency * 2,
                 max_latency_ms=int(settings.timeout * 1000), route="/generate_batch")
    async def generate_batch(self, requests: list[GenerateRequest]) -> list[schemas.BatchItem]:
        """Adaptive batching: BentoML merges concurrent calls; compatible items run as one pipeline call."""
        received = time.monotonic()
        return await self.generation.run_batch(requests, received)

    @bentoml.task(input_spec=GenerateRequest, route="/jobs")
    @answers_errors
    async def jobs(self, ctx: bentoml.Context, **fields: Any) -> GenerateResponse:
        """Task style: ``/jobs/submit`` answers at once with a task id; poll ``/jobs/status``, fetch ``/jobs/get``."""
        received = time.monotonic()
        task_id = getattr(ctx.request.state, "task_id", None)
        req = GenerateRequest.model_validate(fields)
        try:
            job, generated = await self.generation.run(
                req, on_submit=lambda jobs: task_registry.attach(task_id, jobs) if task_id else None)
        except Cancelled:
            task_registry.ended(task_id, "canceled")
            raise TaskCancelled(task_id) from None
        except ServiceError:
            task_registry.ended(task_id, "failed")
            raise
        task_registry.ended(task_id, "completed")
        return self.generation.response(req, job, generated, received)


SDXL.add_asgi_middleware(TaskControl, registry=task_registry, task_routes=("/jobs",))
