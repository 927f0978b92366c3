"""sdxl-bento: Stable Diffusion XL 1.0 behind BentoML.  Run: ``bentoml serve service:SDXL``.

A request passes the gateway middleware (body limits, API key, tier limits, rate limits, audit),
then an API method here: validate (BentoML, with the pydantic schemas) -> ``Generation`` (cache,
scheduler, which alone drives the GPU, image store) -> the answer's shape. Errors are
``ServiceError``s, answered in one JSON shape by ``errors.to_response``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bentoml
from bentoml._internal.configuration.containers import BentoMLContainer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from sdxl_bento import schemas
from sdxl_bento.adapters import a1111
from sdxl_bento.adapters import openai as openai_compat
from sdxl_bento.adapters.common import given
from sdxl_bento.core.cache import make_cache
from sdxl_bento.core.generation import Generation, ModelInfo, RequestContext
from sdxl_bento.core.images import ImageStore, parse_id
from sdxl_bento.core.policy import OPEN_PRINCIPAL, Principal, may_use
from sdxl_bento.core.prompts import PromptPolicy
from sdxl_bento.core.safety import ImageGuard
from sdxl_bento.core.watermark import Watermarker
from sdxl_bento.errors import (
    Cancelled,
    ContentFiltered,
    InvalidRequest,
    ModelMissing,
    NotFound,
    ServiceError,
    Unauthorized,
    answers_in,
    native_error,
    to_response,
)
from sdxl_bento.gpu.checkers import load_checker
from sdxl_bento.gpu.thermal import NvmlSource, StaticSource, Throttle, ThrottleState, start_gpu_telemetry
from sdxl_bento.gpu.vram import SDXL_FP16, VramBudget
from sdxl_bento.http import routes, upstream
from sdxl_bento.http.audit import AuditLog
from sdxl_bento.http.auth import KeyFile
from sdxl_bento.http.gateway import DEADLINE_HEADER, Gateway
from sdxl_bento.http.journal import TaskJournal
from sdxl_bento.http.ratelimit import JobSlots, RateLimiter
from sdxl_bento.http.replicas import TaskDirectory
from sdxl_bento.http.retention import RetentionSweeper
from sdxl_bento.http.shutdown import Drain
from sdxl_bento.http.signing import Signer
from sdxl_bento.http.tasks import TaskCancelled, TaskControl, TaskRegistry
from sdxl_bento.schemas import (
    BatchRequest,
    GenerateRequest,
    GenerateResponse,
    Img2ImgRequest,
    InpaintRequest,
    RefineRequest,
)
from sdxl_bento.settings import Settings, tags
from sdxl_bento.store import modelstore as store
from sdxl_bento.store.loras import find_lora, list_loras
from sdxl_bento.telemetry import metrics

logger = logging.getLogger("sdxl_bento.service")

settings = Settings()
schemas.configure(schemas.Limits(max_prompt_chars=settings.max_prompt_chars, max_pixels=settings.max_pixels,
                                 max_loras=settings.max_loras))

if store.find(settings.base_model) is None:
    raise ModelMissing(f"cannot start: SDXL base model {settings.base_model!r} is not in the Bento model store. "
                       f"Put it there with:\n  {store.fix_command('base', settings.base_model)}")
_with_refiner = settings.refiner == "on" or (settings.refiner == "auto" and store.find(settings.refiner_model))
_with_checker = settings.safety == "on" or (settings.safety == "auto" and store.find(settings.safety_model))
if settings.keys_file is None and settings.auth == "required":
    raise SystemExit("cannot start: SDXL_BENTO_AUTH=required but no SDXL_BENTO_KEYS_FILE is set "
                     "(create one with: sdxl-bento keys add NAME --tier standard --file keys.yaml)")
if settings.keys_file is not None and settings.replica_url and settings.internal_secret is None:
    raise SystemExit("cannot start: with keys and SDXL_BENTO_REPLICA_URL, the replicas need a shared "
                     "SDXL_BENTO_INTERNAL_SECRET (it signs requests forwarded between them and image links)")
keys = KeyFile(settings.keys_file) if settings.keys_file else None
signer = Signer.load(settings.internal_secret.get_secret_value() if settings.internal_secret else None,
                     settings.state_dir)

image_store = ImageStore(settings.image_dir)
journal = TaskJournal(settings.state_dir / "tasks.db")
task_registry = TaskRegistry(journal)
drain = Drain(settings.shutdown_grace_s)
TASK_MODELS = {"/jobs": GenerateRequest, "/img2img_jobs": Img2ImgRequest, "/inpaint_jobs": InpaintRequest}
ROUTES = routes.table(
    {"/txt2img": GenerateRequest, "/generate": GenerateRequest, "/refine": RefineRequest, "/img2img": Img2ImgRequest,
     "/inpaint": InpaintRequest}, TASK_MODELS,
    foreign={"/v1/images/generations": routes.Route("/v1/images/generations", openai_compat.parse_body,
                                                    openai_compat.error_response),
             "/sdapi/v1/txt2img": routes.Route("/sdapi/v1/txt2img", a1111.parse_body, a1111.from_error)},
    mounted={"/sdapi/v1": a1111.from_error, "/models": native_error, "/images": native_error})
upstream.apply(ROUTES.template)  # BentoML's request timers and metric labels
live = SimpleNamespace(engine=None)
"""What the mounted ASGI apps need from the service instance, once it exists."""


async def _get_image(request: Request) -> Response:
    """An image, for its owner's key, an operator's, or a signed link that has not expired (``signing``)."""
    try:
        image_id = parse_id(request.path_params["image_id"])
        info = image_store.info(image_id)
        principal = request.scope.get("state", {}).get("principal")
        allowed = keys is None or signer.image_link_valid(
            image_id, request.query_params.get("exp"), request.query_params.get("sig")) or (
            principal is not None and may_use(principal, info.owner))
        if not allowed:
            raise NotFound(f"no image with id {image_id}")
    except ServiceError as exc:
        return to_response(exc)
    return FileResponse(info.path, media_type=info.media_type,
                        headers={"Cache-Control": "private, max-age=86400, immutable"})


a1111_owners = a1111.JobOwners()
a1111_api = a1111.a1111_app(lambda: task_registry.scheduler, store.list_models, owners=a1111_owners,
                            keys_in_use=keys is not None)
images_app = Starlette(routes=[Route("/{image_id}", _get_image, methods=["GET"])])


async def _list_models(request: Request) -> Response:
    """Checkpoints (which are loaded, pinned, synthetic) and LoRA adapters."""
    checkpoints = live.engine.manager.available() if live.engine is not None else []
    return JSONResponse({"checkpoints": checkpoints, "loras": list_loras(), "refiner": settings.refiner_model
                         if _with_refiner else None})


models_app = Starlette(routes=[Route("/", _list_models, methods=["GET"])])
ui_app = StaticFiles(directory=str(Path(__file__).parent / "sdxl_bento" / "ui"), html=True)


def request_context(ctx: bentoml.Context) -> RequestContext:
    """What the gateway learned about this request (caller, deadline), and where to note the outcome.
    A request that did not pass the gateway (none should) runs as nobody: with keys, it is refused."""
    state = ctx.request.state
    if not hasattr(state, "audit"):
        state.audit = {}
    principal = getattr(state, "principal", None)
    if principal is None:
        if keys is not None:
            raise Unauthorized("this request did not pass the gateway")
        principal = OPEN_PRINCIPAL
    return RequestContext(principal=principal, deadline_s=getattr(state, "deadline_s", None), audit=state.audit)


def caller(name: str | None) -> Principal:
    """The principal a task's owner or a batch item's stamp names, as the keys file says now."""
    if keys is None:
        return OPEN_PRINCIPAL
    found = keys.by_name(name) if name is not None else None
    if found is None:
        raise Unauthorized(f"the key {name!r} that sent this request is no longer in the keys file")
    return found


def asked_deadline(ctx: bentoml.Context) -> float | None:
    """``X-Request-Deadline`` of a task's stored request (the gateway checked it at submission)."""
    try:
        return float(ctx.request.headers.get(DEADLINE_HEADER, ""))
    except ValueError:
        return None


# The OCI image installs exactly the lock that bentofile.yaml names (requirements/cuda.txt): uv is told to add
# no dependency of its own (it checks the lock's hashes by default; BentoML appends an unhashed
# `bentoml==<version>`, so `require-hashes` cannot be set). bentofile.yaml can run nothing before BentoML's
# `uv pip install`; an Image command can. The installer is pinned too (BentoML would `pip install uv`).
IMAGE = bentoml.images.Image(python_version="3.11", lock_python_packages=False).run(
    "command -v uv >/dev/null || pip install uv==0.13.9").run(
    "mkdir -p /etc/uv && printf '[pip]\\nno-deps = true\\n' >/etc/uv/uv.toml")


@bentoml.asgi_app(images_app, path="/images")
@bentoml.asgi_app(ui_app, path="/ui")
@bentoml.asgi_app(a1111_api, path="/sdapi/v1")
@bentoml.asgi_app(models_app, path="/models")
@bentoml.service(
    image=IMAGE,
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
    if _with_checker:
        safety_model = bentoml.models.BentoModel(settings.safety_model)

    def __init__(self) -> None:
        import torch

        from sdxl_bento.gpu.accel import Acceleration
        from sdxl_bento.gpu.engine import Engine, pick_device
        from sdxl_bento.gpu.scheduler import Scheduler

        base = store.from_model(self.base_model)
        refiner = store.from_model(self.refiner_model) if _with_refiner else None
        for stored in filter(None, (base, refiner)):
            if stored.synthetic:
                logger.warning("!!! SERVING A SYNTHETIC MODEL: %s has random weights (%s); its images are noise. "
                               "Import real SDXL weights with `sdxl-bento models import`. !!!",
                               stored.tag, stored.metadata.get("source"))
        if keys is None:
            logger.warning("no API keys file (SDXL_BENTO_KEYS_FILE): the service is open to anyone who reaches it")
        else:
            keys.install_sighup()
        lost = journal.recover()
        if lost:
            logger.warning("%d task(s) were unfinished when the service last stopped: marked failed (restart)", lost)
        device, _ = pick_device(settings.device)
        self.engine = Engine(base, refiner, device=device, budget_bytes=settings.model_budget_bytes,
                             acceleration=Acceleration.resolve(
                                 device, compile=settings.compile, cuda_graphs=settings.cuda_graphs,
                                 vae_dtype=settings.vae_decode, compile_cache=settings.compile_cache_dir,
                                 max_graphs=settings.max_cuda_graphs), deepcache_interval=settings.deepcache_interval)
        pinned = set(tags(settings.pinned_checkpoints))
        for tag in tags(settings.checkpoints):
            self.engine.add_checkpoint(store.resolve(tag, "base"), pinned=tag in pinned)
        self.engine.manager.on_swap = lambda tag, seconds: metrics().model_swap_seconds.observe(seconds)
        live.engine = self.engine
        logger.info("warm-up took %.2f s", self.engine.warmup(*settings.warmup(device)))
        rate = self.engine.seconds_per_unit(*settings.warmup(device))
        metrics().acceleration.labels(**self.engine.acceleration.labels()).set(1)
        # After warm-up the free GPU memory is what batches may use; without CUDA there is no budget.
        budget = VramBudget.measure(SDXL_FP16, headroom=settings.vram_headroom,
                                    device=torch.cuda.current_device()) if self.engine.device == "cuda" else None
        self.throttle = Throttle(NvmlSource.open() or StaticSource([]), slow_above_c=settings.gpu_slow_above_c,
                                 pause_above_c=settings.gpu_pause_above_c, resume_below_c=settings.gpu_resume_below_c)
        start_gpu_telemetry(self.throttle)
        self.scheduler = Scheduler(self.engine, max_batch_requests=settings.concurrency,
                                   max_batch_images=settings.max_batch_images, max_jobs=settings.max_concurrency,
                                   aging_per_minute=settings.aging_per_minute, observer=metrics(),
                                   throttle=self.throttle, budget=budget, is_loaded=self.engine.manager.is_loaded)
        self.scheduler.seed_rate(rate)  # task ETAs from the first request on
        self.scheduler.start()
        task_registry.scheduler = drain.scheduler = self.scheduler
        drain.install()
        self.retention = RetentionSweeper(
            image_store, journal, image_max_age_s=settings.image_retention_s,
            image_max_bytes=settings.image_store_max_bytes, task_max_age_s=settings.task_retention_s,
            interval_s=settings.retention_sweep_s, on_sweep=metrics().observe_retention,
            runner_db=Path(BentoMLContainer.result_store_file.get()))
        self.retention.start()
        cache = make_cache(settings.redis(), image_store, ttl_s=settings.cache_ttl_s,
                           max_bytes=settings.cache_max_bytes) if settings.cache else None
        guard = None
        if _with_checker:
            checker = store.from_model(self.safety_model)
            guard = ImageGuard(load_checker(checker.metadata["kind"], checker.path, device=self.engine.device),
                               threshold=settings.safety_threshold, action=settings.safety_action)
            logger.info("NSFW check of every image with %s (%s, %s)", checker.tag, checker.metadata["kind"],
                        settings.safety_action)
        else:
            logger.warning("no NSFW checker (%s not in the store): images are not checked", settings.safety_model)
        watermark = settings.watermark == "on" or (settings.watermark == "auto" and not self.engine.models.synthetic)
        self.generation = Generation(
            self.scheduler, image_store,
            ModelInfo(base.tag, refiner.tag if refiner else None, self.engine.models.synthetic),
            timeout=settings.timeout, cache=cache, cache_unseeded=settings.cache_unseeded,
            public_url=settings.public_url, metrics=metrics(), guard=guard, watermarker=Watermarker(watermark),
            policy=PromptPolicy.load(settings.policy_file) if settings.policy_file else None,
            resolve_model=self.engine.manager.resolve, has_lora=lambda name: find_lora(name) is not None,
            max_upload_bytes=settings.max_upload_bytes,
            sign_link=(lambda image_id: signer.image_query(image_id, settings.image_url_ttl_s)) if keys else None,
        )

    def __is_ready__(self) -> bool:
        """``/readyz``: not while shutting down, nor while a hot GPU has paused admission."""
        return not drain.draining and self.throttle.state != ThrottleState.paused

    @bentoml.on_shutdown
    def _stop(self) -> None:
        self.retention.stop()
        self.scheduler.stop()

    @bentoml.api(input_spec=GenerateRequest, route="/txt2img")
    @answers_in()
    async def txt2img(self, ctx: bentoml.Context, **fields: Any) -> bytes:
        """One image, as the raw PNG/JPEG/WebP body; seed and parameters in headers and in the file."""
        req = GenerateRequest.model_validate(fields)
        if req.num_images != 1:
            raise InvalidRequest("/txt2img returns one image; use /generate for several", field="num_images")
        outcome = await self.generation.run(req, request_context(ctx))
        (image,) = outcome.images
        if not image.data:
            raise ContentFiltered("the generated image was withheld by the safety check",
                                  finish_reason="content_filtered", seed=image.seed)
        rctx = request_context(ctx)
        return Response(content=image.data, media_type=image.media_type, headers={
            "Seed": str(image.seed), "Finish-Reason": image.finish_reason, "X-Image-Id": image.id,
            "X-Image-Url": self.generation.url(image.id, rctx.principal), "X-Model": self.generation.models.base_tag,
            "X-Parameters": image.parameters.encode("unicode_escape").decode("ascii"),
            "X-Queue-Seconds": f"{outcome.queue_s:.4f}", "X-Generate-Seconds": f"{outcome.gpu_s:.4f}",
        })

    @bentoml.api(input_spec=GenerateRequest, route="/generate")
    @answers_in()
    async def generate(self, ctx: bentoml.Context, **fields: Any) -> GenerateResponse:
        """Images as JSON: id, url, seed (and base64 when asked) for each, with timings."""
        req, rctx = GenerateRequest.model_validate(fields), request_context(ctx)
        return self.generation.response(req, await self.generation.run(req, rctx), rctx)

    @bentoml.api(input_spec=RefineRequest, route="/refine")
    @answers_in()
    async def refine(self, ctx: bentoml.Context, **fields: Any) -> GenerateResponse:
        """Refine a stored image (by id) with the refiner and a new prompt."""
        req, rctx = RefineRequest.model_validate(fields), request_context(ctx)
        return self.generation.response(req, await self.generation.run(req, rctx), rctx)

    @bentoml.api(input_spec=Img2ImgRequest, route="/img2img")
    @answers_in()
    async def img2img(self, ctx: bentoml.Context, **fields: Any) -> GenerateResponse:
        """Image to image: a base64 image or a stored image's id, redone by ``strength``."""
        req, rctx = Img2ImgRequest.model_validate(fields), request_context(ctx)
        return self.generation.response(req, await self.generation.run(req, rctx), rctx)

    @bentoml.api(input_spec=InpaintRequest, route="/inpaint")
    @answers_in()
    async def inpaint(self, ctx: bentoml.Context, **fields: Any) -> GenerateResponse:
        """Inpainting: the image's white-masked area is repainted."""
        req, rctx = InpaintRequest.model_validate(fields), request_context(ctx)
        return self.generation.response(req, await self.generation.run(req, rctx), rctx)

    # BentoML's batcher refuses (503) work it expects to exceed max_latency_ms, counting generation time;
    # our scheduler enforces the deadline, so the batcher gets the whole timeout.
    @bentoml.api(batchable=True, max_batch_size=settings.concurrency * 2,
                 max_latency_ms=int(settings.timeout * 1000), route="/generate_batch")
    async def generate_batch(self, requests: list[BatchRequest]) -> list[schemas.BatchItem]:
        """Adaptive batching: BentoML merges concurrent calls (of several callers); compatible items run as one
        pipeline call. Each item carries the gateway's stamp of its caller: its tier, priority and deadline."""
        items, refused = [], {}
        for i, req in enumerate(requests):
            try:
                if req.caller is None:
                    raise Unauthorized("this request did not pass the gateway")
                items.append((req, RequestContext(principal=caller(req.caller.name), deadline_s=req.caller.deadline_s)))
            except ServiceError as exc:
                refused[i] = schemas.BatchItem(ok=False, error=schemas.ErrorInfo(type=exc.type, message=exc.message))
        answers = iter(await self.generation.run_batch(items))
        return [refused[i] if i in refused else next(answers) for i in range(len(requests))]

    @bentoml.api(input_spec=openai_compat.OpenAIImageWire, route="/v1/images/generations")
    @openai_compat.answers_openai_errors
    async def openai_images(self, ctx: bentoml.Context, **fields: Any) -> dict[str, Any]:
        """OpenAI Images API (any OpenAI client with ``base_url=<server>/v1``); errors in OpenAI's shape."""
        oreq = openai_compat.OpenAIImageRequest.model_validate(given(fields))
        req, rctx = openai_compat.to_generate_request(oreq), request_context(ctx)
        try:
            outcome = await self.generation.run(req, rctx)
        finally:
            openai_compat.record(rctx.audit, oreq)
        base = str(ctx.request.base_url)
        return openai_compat.to_openai_response(
            outcome.images, oreq.prompt, int(time.time()), oreq.response_format,
            url_for=lambda image_id: openai_compat.absolute_url(base, self.generation.url(image_id, rctx.principal)))

    @bentoml.api(input_spec=a1111.A1111Wire, route="/sdapi/v1/txt2img")
    @a1111.answers_a1111_errors
    async def sdapi_txt2img(self, ctx: bentoml.Context, **fields: Any) -> dict[str, Any]:
        """AUTOMATIC1111 ``/sdapi/v1/txt2img``: its fields and defaults, its answer; errors in its shape."""
        areq = a1111.A1111Txt2ImgRequest.model_validate(given(fields))
        req, rctx = a1111.to_generate_request(areq), request_context(ctx)
        rctx.on_submit = a1111_owners.recorder(rctx.principal.name)
        outcome = await self.generation.run(req, rctx)
        return a1111.to_a1111_response(areq, req, outcome.images, self.generation.models.base_tag)

    @bentoml.task(input_spec=GenerateRequest, route="/jobs")
    @answers_in()
    async def jobs(self, ctx: bentoml.Context, **fields: Any) -> GenerateResponse:
        """Task style: ``/jobs/submit`` answers at once with a task id; poll ``/jobs/status``, fetch ``/jobs/get``."""
        return await self._task(ctx, GenerateRequest.model_validate(fields))

    @bentoml.task(input_spec=Img2ImgRequest, route="/img2img_jobs")
    @answers_in()
    async def img2img_jobs(self, ctx: bentoml.Context, **fields: Any) -> GenerateResponse:
        """``/img2img`` as a task: ``/img2img_jobs/submit``, ``/status``, ``/get``, ``/cancel``."""
        return await self._task(ctx, Img2ImgRequest.model_validate(fields))

    @bentoml.task(input_spec=InpaintRequest, route="/inpaint_jobs")
    @answers_in()
    async def inpaint_jobs(self, ctx: bentoml.Context, **fields: Any) -> GenerateResponse:
        """``/inpaint`` as a task: ``/inpaint_jobs/submit``, ``/status``, ``/get``, ``/cancel``."""
        return await self._task(ctx, InpaintRequest.model_validate(fields))

    async def _task(self, ctx: bentoml.Context, req: Any) -> GenerateResponse:
        """Run a task's request as its owner (the journal's record: a retry reaches here without the
        gateway's state); its end (completed with its answer, failed with a reason, cancelled) goes to
        the journal, which answers for the task from then on."""
        task_id = getattr(ctx.request.state, "task_id", None)
        state = ctx.request.state
        if not hasattr(state, "audit"):
            state.audit = {}
        try:
            record = journal.get(task_id) if task_id else None
            if record is None:
                raise NotFound(f"task {task_id} is not in the journal")
            rctx = RequestContext(principal=caller(record.owner), deadline_s=asked_deadline(ctx), audit=state.audit)
            rctx.on_submit = lambda jobs: task_registry.attach(task_id, jobs)
            answer = self.generation.response(req, await self.generation.run(req, rctx), rctx)
        except Cancelled:
            task_registry.ended(task_id, "canceled", "cancelled")
            raise TaskCancelled(task_id) from None
        except ServiceError as exc:
            task_registry.ended(task_id, "failed", exc.type, error=exc.body(), http_status=exc.status)
            raise
        except Exception as exc:
            task_registry.ended(task_id, "failed", "error", http_status=500,
                                error={"error": {"type": "error", "message": f"the task failed: {exc}"}})
            raise
        task_registry.ended(task_id, "completed", result=answer.model_dump(mode="json"), http_status=200)
        return answer


# The first added is the outermost: the gateway sees every request before the task routes do.
SDXL.add_asgi_middleware(Gateway, keys=keys, routes=ROUTES, signer=signer,
                         limiter=RateLimiter(settings.redis(), on_redis_failure=lambda: metrics().redis_failed()),
                         slots=JobSlots(settings.redis(), on_redis_failure=lambda: metrics().redis_failed()),
                         audit=AuditLog(settings.audit_path(), max_bytes=settings.audit_max_bytes,
                                        stdout=settings.audit_stdout, prompts=settings.audit_prompts),
                         max_body_bytes=settings.max_body_bytes, drain=drain,
                         task_cost=lambda task_id: getattr(journal.get(task_id), "cost_images", None))
SDXL.add_asgi_middleware(TaskControl, registry=task_registry, journal=journal, task_routes=tuple(TASK_MODELS),
                         signer=signer, directory=TaskDirectory(settings.redis(), settings.replica_url)
                         if settings.redis() and settings.replica_url else None)
