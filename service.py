"""sdxl-bento: Stable Diffusion XL 1.0 behind BentoML.  Run: ``bentoml serve service:SDXL``.

This file declares the service: its models, routes, request models and answers. The parts are built in
``sdxl_bento/runtime.py`` (``Front``: the HTTP side; ``Runtime``: the GPU side) and the layers live in
``sdxl_bento/`` (README: How it is built). A request passes the gateway (key, typed request policed against the
tier, rate limits, audit), then an API method here: ``Generation`` (cache, the scheduler that alone drives the GPU,
image store) -> the answer's shape. Errors are ``ServiceError``s, answered in each API's shape.
"""

from __future__ import annotations

from typing import Any

import bentoml
from starlette.responses import JSONResponse, Response

from sdxl_bento import schemas
from sdxl_bento.adapters import a1111
from sdxl_bento.adapters import openai as openai_api
from sdxl_bento.adapters.common import given
from sdxl_bento.core.generation import RequestContext
from sdxl_bento.core.verify import VerifyReport, VerifyWire
from sdxl_bento.errors import ContentFiltered, InvalidRequest, ServiceError, Unauthorized, answers_in, native_error
from sdxl_bento.http import apps, negotiation, routes, upstream
from sdxl_bento.http.tasks import run_task
from sdxl_bento.runtime import Front, build_runtime, require_models
from sdxl_bento.settings import Settings
from sdxl_bento.store import modelstore
from sdxl_bento.store.loras import list_loras

settings = Settings()
REQUESTS = schemas.Requests.with_limits(schemas.Limits(
    max_prompt_chars=settings.max_prompt_chars, max_pixels=settings.max_pixels, max_loras=settings.max_loras))
WITH_REFINER, WITH_CHECKER = require_models(settings)
TASKS = {"/jobs": REQUESTS.generate, "/img2img_jobs": REQUESTS.img2img, "/inpaint_jobs": REQUESTS.inpaint,
         "/refine_jobs": REQUESTS.refine}
ROUTES = routes.table(
    {"/txt2img": REQUESTS.generate, "/generate": REQUESTS.generate, "/refine": REQUESTS.refine,
     "/img2img": REQUESTS.img2img, "/inpaint": REQUESTS.inpaint}, TASKS, batch=REQUESTS.batch,
    foreign={"/v1/images/generations": routes.Route(
                 "/v1/images/generations", lambda body: openai_api.parse_body(body, REQUESTS.generate),
                 openai_api.error_response),
             "/sdapi/v1/txt2img": routes.Route(
                 "/sdapi/v1/txt2img", lambda body: a1111.parse_body(body, REQUESTS.generate), a1111.from_error),
             "/sdapi/v1/img2img": routes.Route(
                 "/sdapi/v1/img2img", lambda body: a1111.parse_img2img_body(body, REQUESTS.img2img, REQUESTS.inpaint),
                 a1111.from_error),
             "/v1/images/edits": routes.Route(
                 "/v1/images/edits", lambda body: openai_api.parse_edit_body(body, REQUESTS.img2img, REQUESTS.inpaint),
                 openai_api.error_response, form=True),
             "/replay": routes.Route("/replay", lambda body: [], negotiates=True,  # the manifest's request, policed
                                     parse_for=lambda body, principal: front.replays.requests_of(body, principal))},
    mounted={"/sdapi/v1": a1111.from_error, "/v1": openai_api.error_response, "/models": native_error,
             "/images": native_error},
    uploads=(routes.upload("/verify", settings.max_upload_bytes),))
front = Front.build(settings, ROUTES, REQUESTS)
upstream.apply(ROUTES.template)  # BentoML's request timers and metric labels

# The OCI image installs exactly the lock that bentofile.yaml names (requirements/cuda.txt): uv is told to add
# no dependency of its own (it checks the lock's hashes by default; BentoML appends an unhashed
# `bentoml==<version>`, so `require-hashes` cannot be set). bentofile.yaml can run nothing before BentoML's
# `uv pip install`; an Image command can. The installer is pinned too (BentoML would `pip install uv`).
IMAGE = bentoml.images.Image(python_version="3.11", lock_python_packages=False).run(
    "command -v uv >/dev/null || pip install uv==0.13.9").run(
    "mkdir -p /etc/uv && printf '[pip]\\nno-deps = true\\n' >/etc/uv/uv.toml")


@bentoml.asgi_app(apps.images_app(), path="/images")
@bentoml.asgi_app(apps.playground(), path="/ui")
@bentoml.asgi_app(a1111.a1111_app(modelstore.list_models, loras=list_loras), path="/sdapi/v1")
@bentoml.asgi_app(openai_api.openai_app(), path="/v1")
@bentoml.asgi_app(apps.models_app(list_loras), path="/models")
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
    if WITH_REFINER:
        refiner_model = bentoml.models.BentoModel(settings.refiner_model)
    if WITH_CHECKER:
        safety_model = bentoml.models.BentoModel(settings.safety_model)

    def __init__(self) -> None:
        self.front = front
        self.runtime = build_runtime(
            settings, front, modelstore.from_model(self.base_model),
            refiner=modelstore.from_model(self.refiner_model) if WITH_REFINER else None,
            checker=modelstore.from_model(self.safety_model) if WITH_CHECKER else None)
        self.generation = self.runtime.generation

    def __is_ready__(self) -> bool:
        return self.runtime.ready(front)

    @bentoml.on_shutdown
    def _stop(self) -> None:
        self.runtime.stop()

    @bentoml.api(input_spec=REQUESTS.generate, route="/txt2img")
    @answers_in()
    async def txt2img(self, ctx: bentoml.Context, **fields: Any) -> bytes:
        """One image, as the raw PNG/JPEG/WebP body; seed and parameters in headers and in the file
        (``Accept: application/json``: JSON, as ``/generate`` answers)."""
        req = REQUESTS.generate.model_validate(fields)
        if negotiation.wants_json(ctx.request.state):  # the method's declared output is bytes: answer directly
            return JSONResponse((await self._answer(ctx, req)).model_dump(mode="json"))
        return await self._image(ctx, req)

    async def _image(self, ctx: bentoml.Context, req: Any) -> Response:
        rctx, fmt = front.request_context(ctx), negotiation.image_format(ctx.request.state)
        if fmt is not None and fmt != req.output_format.value:  # Accept chose it; the body named none
            req = req.model_copy(update={"output_format": schemas.OutputFormat(fmt)})
        if req.num_images != 1:
            raise InvalidRequest("/txt2img returns one image; use /generate for several", field="num_images")
        outcome = await self.generation.run(req, rctx)
        (image,) = outcome.images
        if not image.data:
            raise ContentFiltered("the generated image was withheld by the safety check",
                                  finish_reason="content_filtered", seed=image.seed)
        return Response(content=image.data, media_type=image.media_type, headers={
            "Seed": str(image.seed), "Finish-Reason": image.finish_reason, "X-Image-Id": image.id,
            "X-Image-Url": self.generation.url(image.id, rctx.principal), "X-Model": self.generation.models.base_tag,
            "X-Parameters": image.parameters.encode("unicode_escape").decode("ascii"),
            "X-Queue-Seconds": f"{outcome.queue_s:.4f}", "X-Generate-Seconds": f"{outcome.gpu_s:.4f}",
        })

    @bentoml.api(input_spec=REQUESTS.generate, route="/generate")
    @answers_in()
    async def generate(self, ctx: bentoml.Context, **fields: Any) -> schemas.GenerateResponse:
        """Images as JSON: id, url, seed (and base64 when asked) for each, with timings (``Accept: image/png``,
        ``image/jpeg`` or ``image/webp``: the image, as ``/txt2img`` answers)."""
        req = REQUESTS.generate.model_validate(fields)
        if negotiation.image_format(ctx.request.state) is not None:
            return await self._image(ctx, req)
        return await self._answer(ctx, req)

    @bentoml.api(input_spec=REQUESTS.refine, route="/refine")
    @answers_in()
    async def refine(self, ctx: bentoml.Context, **fields: Any) -> schemas.GenerateResponse:
        """Refine a stored image (by id) with the refiner and a new prompt."""
        return await self._answer(ctx, REQUESTS.refine.model_validate(fields))

    @bentoml.api(input_spec=REQUESTS.img2img, route="/img2img")
    @answers_in()
    async def img2img(self, ctx: bentoml.Context, **fields: Any) -> schemas.GenerateResponse:
        """Image to image: a base64 image or a stored image's id, redone by ``strength``."""
        return await self._answer(ctx, REQUESTS.img2img.model_validate(fields))

    @bentoml.api(input_spec=REQUESTS.inpaint, route="/inpaint")
    @answers_in()
    async def inpaint(self, ctx: bentoml.Context, **fields: Any) -> schemas.GenerateResponse:
        """Inpainting: the image's white-masked area is repainted."""
        return await self._answer(ctx, REQUESTS.inpaint.model_validate(fields))

    async def _answer(self, ctx: bentoml.Context, req: Any) -> schemas.GenerateResponse:
        rctx = front.request_context(ctx)
        return self.generation.response(req, await self.generation.run(req, rctx), rctx)

    # BentoML's batcher refuses (503) work it expects to exceed max_latency_ms, counting generation time;
    # our scheduler enforces the deadline, so the batcher gets the whole timeout.
    @bentoml.api(batchable=True, max_batch_size=settings.concurrency * 2,
                 max_latency_ms=int(settings.timeout * 1000), route="/generate_batch")
    async def generate_batch(self, requests: list[REQUESTS.batch]) -> list[schemas.BatchItem]:  # type: ignore
        """Adaptive batching: BentoML merges concurrent calls (of several callers); compatible items run as one
        pipeline call. Each item carries the gateway's stamp of its caller: its tier, priority and deadline."""
        items, refused = [], {}
        for i, req in enumerate(requests):
            try:
                if req.caller is None:
                    raise Unauthorized("this request did not pass the gateway")
                items.append((req, RequestContext(principal=front.principal(req.caller.name),
                                                  deadline_s=req.caller.deadline_s)))
            except ServiceError as exc:
                refused[i] = schemas.BatchItem(ok=False, error=schemas.ErrorInfo(type=exc.type, message=exc.message))
        answers = iter(await self.generation.run_batch(items))
        return [refused[i] if i in refused else next(answers) for i in range(len(requests))]

    @bentoml.api(input_spec=openai_api.OpenAIImageWire, route="/v1/images/generations")
    @openai_api.answers_openai_errors
    async def openai_images(self, ctx: bentoml.Context, **fields: Any) -> dict[str, Any]:
        """OpenAI Images API (any OpenAI client with ``base_url=<server>/v1``); errors in OpenAI's shape."""
        oreq = openai_api.OpenAIImageRequest.model_validate(given(fields))
        req = openai_api.to_generate_request(oreq, REQUESTS.generate, resolve=self.generation.resolve_model)
        rctx = front.request_context(ctx)
        return await openai_api.answer(self.generation, req, oreq, rctx, str(ctx.request.base_url))

    @bentoml.api(input_spec=a1111.A1111Wire, route="/sdapi/v1/txt2img")
    @a1111.answers_a1111_errors
    async def sdapi_txt2img(self, ctx: bentoml.Context, **fields: Any) -> dict[str, Any]:
        """AUTOMATIC1111 ``/sdapi/v1/txt2img``: its fields and defaults, its answer; errors in its shape."""
        areq, rctx = a1111.A1111Txt2ImgRequest.model_validate(given(fields)), front.request_context(ctx)
        req = a1111.to_generate_request(areq, REQUESTS.generate, options=front.a1111_settings(rctx.principal),
                                        resolve=self.generation.resolve_model)
        rctx.on_submit = front.a1111_owners.recorder(rctx.principal.name)
        outcome = await self.generation.run(req, rctx)
        return a1111.to_a1111_response(areq, req, outcome.images, outcome.model or self.generation.models.base_tag)

    @bentoml.task(input_spec=REQUESTS.generate, route="/jobs")
    @answers_in()
    async def jobs(self, ctx: bentoml.Context, **fields: Any) -> schemas.GenerateResponse:
        """Task style: ``/jobs/submit`` answers at once with a task id; poll ``/jobs/status``, fetch ``/jobs/get``."""
        return await run_task(ctx, REQUESTS.generate.model_validate(fields), front=front, generation=self.generation)

    @bentoml.task(input_spec=REQUESTS.img2img, route="/img2img_jobs")
    @answers_in()
    async def img2img_jobs(self, ctx: bentoml.Context, **fields: Any) -> schemas.GenerateResponse:
        """``/img2img`` as a task: ``/img2img_jobs/submit``, ``/status``, ``/get``, ``/cancel``."""
        return await run_task(ctx, REQUESTS.img2img.model_validate(fields), front=front, generation=self.generation)

    @bentoml.task(input_spec=REQUESTS.inpaint, route="/inpaint_jobs")
    @answers_in()
    async def inpaint_jobs(self, ctx: bentoml.Context, **fields: Any) -> schemas.GenerateResponse:
        """``/inpaint`` as a task: ``/inpaint_jobs/submit``, ``/status``, ``/get``, ``/cancel``."""
        return await run_task(ctx, REQUESTS.inpaint.model_validate(fields), front=front, generation=self.generation)

    @bentoml.task(input_spec=REQUESTS.refine, route="/refine_jobs")
    @answers_in()
    async def refine_jobs(self, ctx: bentoml.Context, **fields: Any) -> schemas.GenerateResponse:
        """``/refine`` as a task (``Prefer: respond-async`` on ``/refine`` submits one): ``/refine_jobs/submit``, ..."""
        return await run_task(ctx, REQUESTS.refine.model_validate(fields), front=front, generation=self.generation)

    @bentoml.api(input_spec=VerifyWire, route="/verify")
    @answers_in()
    async def verify(self, ctx: bentoml.Context, **fields: Any) -> VerifyReport:
        """What an image says about its origin: its C2PA manifest (valid or not and why, signer, actions,
        ingredients), this service's invisible watermark, its parameters text. The file as the body (image/png,
        image/jpeg, image/webp), as multipart field ``image``, or as JSON ``{"image": "<base64>"}``."""
        return await front.verify(ctx)

    @bentoml.api(input_spec=a1111.A1111Img2ImgWire, route="/sdapi/v1/img2img")
    @a1111.answers_a1111_errors
    async def sdapi_img2img(self, ctx: bentoml.Context, **fields: Any) -> dict[str, Any]:
        """AUTOMATIC1111 ``/sdapi/v1/img2img`` (with ``mask``: inpainting); errors in its shape."""
        areq, rctx = a1111.A1111Img2ImgRequest.model_validate(given(fields)), front.request_context(ctx)
        req = a1111.to_image_request(areq, REQUESTS.img2img, REQUESTS.inpaint,
                                     options=front.a1111_settings(rctx.principal), resolve=self.generation.resolve_model)
        rctx.on_submit = front.a1111_owners.recorder(rctx.principal.name)
        outcome = await self.generation.run(req, rctx)
        return a1111.to_a1111_response(areq, req, outcome.images, outcome.model or self.generation.models.base_tag)

    @bentoml.api(input_spec=openai_api.OpenAIEditWire, route="/v1/images/edits")
    @openai_api.answers_openai_errors
    async def openai_edits(self, ctx: bentoml.Context, **fields: Any) -> dict[str, Any]:
        """OpenAI ``images.edit`` (multipart: image, optional mask whose transparent pixels are edited), onto
        /img2img or /inpaint; errors in OpenAI's shape."""
        oreq = openai_api.OpenAIEditRequest.model_validate(given(fields))
        req = openai_api.to_image_request(oreq, REQUESTS.img2img, REQUESTS.inpaint,
                                          resolve=self.generation.resolve_model,
                                          max_upload_bytes=settings.max_upload_bytes)
        rctx = front.request_context(ctx)
        return await openai_api.answer(self.generation, req, oreq, rctx, str(ctx.request.base_url))

    # -- reproducibility (issue 17) ------------------------------------------------------------------------
    @bentoml.api(input_spec=schemas.ReplayRequest, route="/replay")
    @answers_in()
    async def replay(self, ctx: bentoml.Context, **fields: Any) -> dict[str, Any]:
        """Generate a stored image again from its manifest (by ``image_id``, or a ``manifest``); whether the pixels
        are identical, else the largest and mean difference, and which manifest fields differ."""
        body, rctx = schemas.ReplayRequest.model_validate(fields), front.request_context(ctx)
        return await front.replays.run(body, rctx, self.generation)


for middleware, options in front.middlewares():
    SDXL.add_asgi_middleware(middleware, **options)
