"""The AUTOMATIC1111 web UI API (``/sdapi/v1``) for tools that speak it, mapped onto the service.

``POST /sdapi/v1/txt2img`` takes A1111's field names and defaults (``A1111Txt2ImgRequest``), maps
them onto ``GenerateRequest`` (so the limits are the native ones) and answers as A1111 does:
``{"images": [base64 PNG], "parameters": {the request}, "info": "<JSON string>"}``. ``a1111_app``
serves the rest: ``GET /progress``, ``GET /sd-models``, ``GET /samplers``, ``POST /interrupt``.

Defaults are A1111's (seed -1 = random, steps 50, cfg_scale 7, sampler Euler, batch_size 1, n_iter 1)
except width and height, 1024: SDXL's native size (A1111's 512 gives poor SDXL images).
``refiner_checkpoint`` (any name) turns on refine "ensemble" with ``refiner_switch_at`` as
``high_noise_frac`` (default 0.8; 1 or more means no refiner, as in A1111). ``TOLERATED`` fields
are accepted, echoed in ``parameters`` and not used; other unknown fields are ignored, as A1111 does.
Errors have A1111's shape ``{"error", "detail", "body", "errors"}`` with the service's statuses
(invalid input 400, ``Retry-After`` on 503/429).

Mounting (service.py): ``@bentoml.asgi_app(a1111_app(...), path="/sdapi/v1")`` for the GET routes
and interrupt, and an API method with ``input_spec=A1111Wire``, ``route="/sdapi/v1/txt2img"``,
decorated with ``@answers_a1111_errors`` (see the integration notes). ``/sdapi/v1`` belongs in
the gateway's protected routes, ``/sdapi/v1/txt2img`` in its generation routes.
"""

from __future__ import annotations

import base64
import json
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional

from pydantic import ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..errors import InvalidRequest, ServiceError, answers_in
from ..samplers import SAMPLERS, Sampler
from ..samplers import label as sampler_label
from ..schemas import GenerateRequest
from .common import ForeignRequest, caller_name, first_error, kept_images, wire_model

if TYPE_CHECKING:  # both import torch
    from ..core.cache import CachedImage
    from ..gpu.scheduler import Job, Scheduler

SCHEDULE_TYPES = ("Automatic", "Karras")
"""A1111 1.9+ ``scheduler`` (schedule type): Automatic, or Karras with DPM++ 2M."""

TOLERATED: dict[str, Any] = {
    "styles": None, "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
    "restore_faces": None, "tiling": None, "do_not_save_samples": False, "do_not_save_grid": False, "eta": None,
    "denoising_strength": None, "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None,
    "s_noise": None, "override_settings": None, "override_settings_restore_afterwards": True,
    "disable_extra_networks": False, "comments": None, "enable_hr": False, "firstphase_width": 0,
    "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
    "hr_prompt": "", "hr_negative_prompt": "", "force_task_id": None, "script_name": None, "script_args": [],
    "save_images": False, "alwayson_scripts": {}, "infotext": None, "clip_skip": None,
}
"""A1111 txt2img fields accepted with their A1111 defaults, echoed in ``parameters``, not used."""
_NAMES = {"guidance_scale": "cfg_scale", "scheduler": "sampler_name", "high_noise_frac": "refiner_switch_at"}


class A1111Txt2ImgRequest(ForeignRequest):
    """AUTOMATIC1111 ``POST /sdapi/v1/txt2img`` body (the fields this service uses; see ``TOLERATED``)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field("", description="What to draw.")
    negative_prompt: str = Field("", description="What to avoid.")
    seed: int = Field(-1, description="-1: random. Image i of the batch uses seed+i.")
    sampler_name: Optional[str] = Field(None, description="Euler, Euler a, DPM++ 2M, DPM++ 2M Karras, DDIM, UniPC.")
    sampler_index: str = Field("Euler", description="Deprecated name of sampler_name.")
    scheduler: Optional[str] = Field(None, description="Schedule type: Automatic, or Karras (DPM++ 2M).")
    batch_size: int = Field(1, ge=1, description="Images per batch.")
    n_iter: int = Field(1, ge=1, description="Batches; batch_size x n_iter images in all (at most 8).")
    steps: int = Field(50, description="Denoising steps.")
    cfg_scale: float = Field(7.0, description="Classifier-free guidance scale.")
    width: int = Field(1024, description="Image width (multiple of 8).")
    height: int = Field(1024, description="Image height (multiple of 8).")
    refiner_checkpoint: Optional[str] = Field(None, description="Any name: refine with the served refiner.")
    refiner_switch_at: Optional[float] = Field(None, description="Fraction of steps where the refiner takes over.")
    send_images: bool = Field(True, description="Return the images (base64) in the answer.")

    def echo(self) -> dict[str, Any]:
        """``parameters`` of the answer: the request with A1111's defaults filled in."""
        extra = {k: v for k, v in (self.model_extra or {}).items() if k in TOLERATED}
        declared = {k: getattr(self, k) for k in type(self).model_fields}
        return {**TOLERATED, **extra, **declared}


A1111Wire = wire_model(A1111Txt2ImgRequest, "A1111Txt2ImgRequest", also=TOLERATED)
"""BentoML ``input_spec`` for txt2img: the same fields and the tolerated ones, unchecked, so that errors
get A1111's shape."""


def sampler(name: Optional[str], schedule: Optional[str] = None) -> Sampler:
    """The sampler for an A1111 sampler name (its label or an alias, any case) and schedule type; an
    ``InvalidRequest`` (400) naming the valid ones otherwise."""
    wanted = (name or "Euler").strip().lower()
    found = next((spec for spec in SAMPLERS if wanted in (spec.label.lower(), spec.name, *spec.aliases)), None)
    if found is None:
        raise InvalidRequest(f"sampler {name!r} is not available; valid samplers: "
                             f"{', '.join(spec.label for spec in SAMPLERS)}", field="sampler_name")
    kind = (schedule or "Automatic").strip().lower()
    if kind == "automatic":
        return Sampler(found.name)
    if kind == "karras" and found.name in ("dpmpp_2m", "dpmpp_2m_karras"):
        return Sampler("dpmpp_2m_karras")
    raise InvalidRequest(f"schedule type {schedule!r} is not available for {name or 'Euler'}; valid: "
                         f"Automatic, or Karras with DPM++ 2M", field="scheduler")


def uses_refiner(req: A1111Txt2ImgRequest) -> bool:
    named = (req.refiner_checkpoint or "").strip() not in ("", "None", "none")
    return named and (req.refiner_switch_at is None or req.refiner_switch_at < 1)


def parse_body(body: Any, model: type[GenerateRequest] = GenerateRequest) -> list[GenerateRequest]:
    """A raw txt2img body as the native request it runs (the gateway's parser for this route)."""
    return [to_generate_request(A1111Txt2ImgRequest.model_validate(body), model)]


def to_generate_request(req: A1111Txt2ImgRequest, model: type[GenerateRequest] = GenerateRequest) -> GenerateRequest:
    """The native request; its limits apply. A value it refuses is an ``InvalidRequest`` naming the
    A1111 field that carried it."""
    if req.seed < -1:
        raise InvalidRequest(f"seed must be -1 (random) or 0..4294967295, not {req.seed}", field="seed")
    refine = uses_refiner(req)
    fields: dict[str, Any] = {
        "prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": None if req.seed == -1 else req.seed,
        "steps": req.steps, "guidance_scale": req.cfg_scale, "width": req.width, "height": req.height,
        "scheduler": sampler(req.sampler_name or req.sampler_index, req.scheduler),
        "num_images": req.batch_size * req.n_iter, "refine": "ensemble" if refine else "none",
        "output_format": "png",
    }
    if refine and req.refiner_switch_at is not None:
        fields["high_noise_frac"] = req.refiner_switch_at
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        name, detail = first_error(exc)
        if name is None:
            raise InvalidRequest(detail) from None
        if name == "num_images":
            raise InvalidRequest(f"batch_size x n_iter is {req.batch_size} x {req.n_iter} = "
                                 f"{req.batch_size * req.n_iter} images; the limit is 8", field="batch_size") from None
        field = _NAMES.get(name, name)
        raise InvalidRequest(f"{field}: {detail}", field=field) from None


def to_a1111_response(req: A1111Txt2ImgRequest, generated: GenerateRequest, images: list[CachedImage],
                      model_name: str) -> dict[str, Any]:
    """A1111's txt2img answer; ``info`` is a JSON string, with the real seeds and each image's infotext.
    Images the safety check withheld are left out (counted in ``extra_generation_params``); all
    withheld: ``ContentFiltered`` (400)."""
    kept = kept_images(images)
    withheld, images = len(images) - len(kept), kept
    count = len(images)
    seeds = [image.seed for image in images]
    label = sampler_label(generated.scheduler.value)
    extra: dict[str, Any] = {}
    if generated.refine.value != "none":
        extra = {"Refiner": req.refiner_checkpoint, "Refiner switch at": generated.high_noise_frac}
    if withheld:
        extra["Content filtered"] = withheld
    info = {
        "prompt": req.prompt, "all_prompts": [req.prompt] * count, "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * count, "seed": seeds[0] if seeds else None,
        "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0,
        "width": generated.width, "height": generated.height, "sampler_name": label,
        "cfg_scale": generated.guidance_scale, "steps": generated.steps, "batch_size": req.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model_name,
        "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1, "denoising_strength": None, "extra_generation_params": extra,
        "index_of_first_image": 0, "infotexts": [image.parameters for image in images], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": None,
    }
    encoded = [base64.b64encode(image.data).decode("ascii") for image in images] if req.send_images else []
    return {"images": encoded, "parameters": req.echo(), "info": json.dumps(info)}


# -- errors -------------------------------------------------------------------------------------
def a1111_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A1111's error shape (its ``handle_exception``): ``{"error", "detail", "body", "errors"}``."""
    return JSONResponse({"error": "HTTPException", "detail": message, "body": "", "errors": f"{status}: {message}"},
                        status_code=status, headers=headers)


def from_error(exc: Exception) -> JSONResponse:
    if isinstance(exc, ValidationError):
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in error["loc"])
        return a1111_error(400, f"{field}: {error['msg']}" if field else error["msg"])
    assert isinstance(exc, ServiceError)
    return a1111_error(exc.status, exc.message, exc.headers())


answers_a1111_errors = answers_in(from_error)
"""Decorator for the txt2img API method: every error it raises is answered in A1111's shape."""


# -- who started which job (so that /interrupt stops only the caller's own) -----------------------
class JobOwners:
    """Scheduler jobs started through A1111's txt2img, by API key name (weakly held)."""

    def __init__(self) -> None:
        self._owners: weakref.WeakKeyDictionary[Job, str] = weakref.WeakKeyDictionary()

    def recorder(self, owner: str) -> Callable[[list[Job]], None]:
        """For ``RequestContext.on_submit``."""
        def record(jobs: list[Job]) -> None:
            for job in jobs:
                self._owners[job] = owner
        return record

    def owner(self, job: Job) -> str | None:
        return self._owners.get(job)


# -- progress, models, samplers, interrupt --------------------------------------------------------
def progress_view(scheduler: Scheduler | None) -> dict[str, Any]:
    """A1111's ``/progress`` from the scheduler's view: ``progress`` and ``sampling_step`` are those of
    the batch on the GPU, ``eta_relative`` the seconds until it ends, ``job_count`` the requests in
    the service (running and waiting)."""
    waiting, running_count = scheduler.depth() if scheduler is not None else (0, 0)
    running: list[Job] = list(scheduler._running) if scheduler is not None else []
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
             "job_count": waiting + running_count, "job_timestamp": "0", "job_no": 0,
             "sampling_step": 0, "sampling_steps": 0}
    progress = eta = 0.0
    if running and scheduler is not None:
        job = running[0]
        step, total = job.step, max(1, job.total_steps)
        progress = min(1.0, step / total)
        elapsed = scheduler.clock() - (job.started if job.started is not None else scheduler.clock())
        measured = scheduler.eta(job)
        eta = measured if measured is not None else (elapsed / progress - elapsed if progress > 0 else 0.0)
        state.update(job="txt2img", sampling_step=step, sampling_steps=job.total_steps,
                     interrupted=all(j.cancel_requested for j in running),
                     job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(time.time() - elapsed)))
    return {"progress": round(progress, 4), "eta_relative": round(max(0.0, eta), 2), "state": state,
            "current_image": None, "textinfo": None}


def sd_models(models: list[Any]) -> list[dict[str, Any]]:
    """A1111's ``/sd-models`` from the model store's SDXL base pipelines (``store.StoredPipeline``)."""
    out = []
    for model in models:
        if model.metadata.get("role") != "base":
            continue
        sha256 = model.metadata.get("sha256")
        out.append({"title": model.tag, "model_name": model.tag.split(":")[0],
                    "hash": sha256[:10] if sha256 else None, "sha256": sha256, "filename": str(model.path),
                    "config": None})
    return out


def samplers() -> list[dict[str, Any]]:
    return [{"name": spec.label, "aliases": list(spec.aliases), "options": dict(spec.options)} for spec in SAMPLERS]


def interrupt(scheduler: Scheduler | None, owners: JobOwners | None, caller: str | None) -> int:
    """Cancel the running batch's jobs (at the next denoising step): all of them when ``caller`` is
    None (a service without keys), else those the caller started. Returns how many were cancelled."""
    if scheduler is None:
        return 0
    running: list[Job] = list(scheduler._running)
    mine = [job for job in running if caller is None or (owners is not None and owners.owner(job) == caller)]
    return sum(1 for job in mine if scheduler.cancel(job))


def a1111_app(models: Callable[[], list[Any]], service: Callable[[], Any] | None = None) -> Starlette:
    """A Starlette app for ``/sdapi/v1``: ``GET /progress``, ``GET /sd-models``, ``GET /samplers``,
    ``POST /interrupt`` (txt2img is an API method of the service).

    It reaches the service instance through ``service`` (BentoML's ``get_current_service`` by default): its
    ``runtime.scheduler``, ``front.a1111_owners`` and ``front.keys``. With keys, interrupt needs the gateway's
    principal (``/sdapi/v1`` is guarded; else 401) and stops only the caller's own generations.
    """
    if service is None:
        from bentoml import get_current_service as service

    def scheduler() -> Scheduler | None:
        runtime = getattr(service(), "runtime", None)
        return runtime.scheduler if runtime is not None else None

    async def progress(request: Request) -> JSONResponse:
        return JSONResponse(progress_view(scheduler()))

    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse(sd_models(models()))

    async def list_samplers(request: Request) -> JSONResponse:
        return JSONResponse(samplers())

    async def stop(request: Request) -> JSONResponse:
        known, caller = caller_name(request.scope)
        front = service().front
        if front.keys is not None and (not known or caller is None):
            return a1111_error(401, "a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)")
        interrupt(scheduler(), front.a1111_owners, caller)
        return JSONResponse({})

    return Starlette(routes=[
        Route("/progress", progress, methods=["GET"]),
        Route("/sd-models", list_models, methods=["GET"]),
        Route("/samplers", list_samplers, methods=["GET"]),
        Route("/interrupt", stop, methods=["POST"]),
    ])
