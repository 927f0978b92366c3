"""The AUTOMATIC1111 web UI API (``/sdapi/v1``) for tools that speak it, mapped onto the service.

``POST /sdapi/v1/txt2img`` and ``POST /sdapi/v1/img2img`` take A1111's field names and defaults
(``A1111Txt2ImgRequest``, ``A1111Img2ImgRequest``), map them onto the native requests (so the limits and the
tiers are the native ones) and answer as A1111 does: ``{"images": [base64], "parameters": {the request},
"info": "<JSON string>"}``. ``a1111_app`` serves the rest of ``/sdapi/v1`` (options, progress, interrupt,
models, samplers, schedulers, styles, LoRAs, upscalers, memory, ...); every answer there, errors and unknown
paths included, is JSON in A1111's shape.

Every A1111 field that changes the image does what A1111 does, or is refused (400, naming the field) when it
asks for something this service cannot do: face restoration, scripts, upscalers that need weights, ... (the
README's "AUTOMATIC1111 API" lists them). Fields that change nothing in the image (``save_images``,
``comments``, ...) are accepted. Unknown fields are ignored, as A1111 ignores them.

Defaults are A1111's (seed -1 = random, steps 50, cfg_scale 7, sampler Euler, batch_size 1, n_iter 1,
denoising_strength 0.75) except width and height, 1024 for txt2img (SDXL's size; A1111's 512 gives poor SDXL
images) and the init image's own size for img2img. ``<lora:name:weight>`` in a prompt becomes the native
``loras`` field and leaves the prompt the model sees, as A1111 does. Per-key settings (``/options``) and a
request's ``override_settings`` are ``a1111_options``. Errors have A1111's shape ``{"error", "detail",
"body", "errors"}`` with the service's statuses (invalid input 400, ``Retry-After`` on 503/429).
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional

from pydantic import ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import samplers as sampler_table
from ..errors import InvalidRequest, ServiceError, answers_in
from ..samplers import SAMPLERS, SCHEDULES, Sampler
from ..samplers import label as sampler_label
from ..schemas import MAX_SEED, GenerateRequest, Img2ImgRequest, InpaintRequest
from . import a1111_options
from .a1111_options import OPTIONS, OptionsStore
from .common import ForeignRequest, caller_name, first_error, kept_images, wire_model

if TYPE_CHECKING:  # both import torch
    from ..core.cache import CachedImage
    from ..gpu.scheduler import Job, Scheduler

HR_UPSCALERS: dict[str, str] = {
    "latent": "latent", "latent (antialiased)": "latent-antialiased", "latent (bicubic)": "latent-bicubic",
    "latent (bicubic antialiased)": "latent-bicubic-antialiased", "latent (nearest)": "latent-nearest",
    "latent (nearest-exact)": "latent-nearest-exact", "lanczos": "lanczos", "nearest": "nearest",
    "none": "lanczos",
}
"""A1111's hires upscalers that need no weights -> the native ``hires.upscaler`` (its "None" resizes with
Lanczos). The others (ESRGAN, LDSR, SwinIR, ScuNET, ...) are refused with this list."""
LATENT_MODES = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                "Latent (nearest)", "Latent (nearest-exact)")
UPSCALERS = ("None", "Lanczos", "Nearest")
RESIZE_MODES = {0: "stretch", 1: "crop", 2: "fill"}
"""img2img ``resize_mode``: 0 Just resize, 1 Crop and resize, 2 Resize and fill (3, latent upscale: refused)."""
_SAME = ("", "none", "use same checkpoint", "use same sampler", "use same scheduler")
_NAMES = {"guidance_scale": "cfg_scale", "scheduler": "sampler_name", "high_noise_frac": "refiner_switch_at",
          "strength": "denoising_strength", "num_images": "batch_size", "hires": "enable_hr",
          "image": "init_images", "mask_padding": "inpaint_full_res_padding",
          "mask_invert": "inpainting_mask_invert", "inpaint_fill": "inpainting_fill", "loras": "prompt"}
"""A native field -> the A1111 field that carried it, for error messages."""


class _A1111Request(ForeignRequest):
    """What txt2img and img2img share (A1111's ``StableDiffusionProcessing``)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field("", description="What to draw; <lora:name:weight> applies a LoRA.")
    negative_prompt: str = Field("", description="What to avoid.")
    styles: list[str] = Field([], description="Names from GET /sdapi/v1/prompt-styles, applied in order.")
    seed: int = Field(-1, description="-1: random. Image i of the batch uses seed+i.")
    subseed: int = Field(-1, description="Variation seed (-1: random); image i uses subseed+i.")
    subseed_strength: float = Field(0.0, description="How far the noise moves towards the variation seed's.")
    seed_resize_from_h: int = Field(-1, description="Not supported (only -1 or 0).")
    seed_resize_from_w: int = Field(-1, description="Not supported (only -1 or 0).")
    sampler_name: Optional[str] = Field(None, description="A name from GET /sdapi/v1/samplers.")
    sampler_index: str = Field("Euler", description="Deprecated name of sampler_name.")
    scheduler: Optional[str] = Field(None, description="Schedule type: Automatic, Uniform, Karras, Exponential.")
    batch_size: int = Field(1, ge=1, description="Images per batch.")
    n_iter: int = Field(1, ge=1, description="Batches; batch_size x n_iter images in all (at most 8).")
    steps: int = Field(50, description="Denoising steps.")
    cfg_scale: float = Field(7.0, description="Classifier-free guidance scale.")
    width: Optional[int] = Field(None, description="Image width (multiple of 8).")
    height: Optional[int] = Field(None, description="Image height (multiple of 8).")
    restore_faces: Optional[bool] = Field(None, description="Not supported (no face restorer): false or absent.")
    tiling: Optional[bool] = Field(None, description="A seamlessly tileable image.")
    do_not_save_samples: bool = Field(False, description="Accepted; images are kept in the image store.")
    do_not_save_grid: bool = Field(False, description="Accepted; no grids are made.")
    eta: Optional[float] = Field(None, description="DDIM: its eta; ancestral and SDE samplers: 1 only.")
    s_min_uncond: Optional[float] = Field(None, description="Not supported: 0 or absent.")
    s_churn: Optional[float] = Field(None, description="Not supported: 0 or absent.")
    s_tmax: Optional[float] = Field(None, description="Accepted (matters only with s_churn).")
    s_tmin: Optional[float] = Field(None, description="Accepted (matters only with s_churn).")
    s_noise: Optional[float] = Field(None, description="Not supported: 1 or absent.")
    override_settings: Optional[dict[str, Any]] = Field(None, description="Options for this request only "
                                                                          "(GET /sdapi/v1/options lists them).")
    override_settings_restore_afterwards: bool = Field(True, description="Accepted (overrides never outlive the "
                                                                         "request here).")
    refiner_checkpoint: Optional[str] = Field(None, description="Any name: refine with the served refiner.")
    refiner_switch_at: Optional[float] = Field(None, description="Fraction of steps where the refiner takes over.")
    disable_extra_networks: bool = Field(False, description="<lora:...> in the prompt is removed, not applied.")
    comments: Optional[dict[str, Any]] = Field(None, description="Accepted.")
    force_task_id: Optional[str] = Field(None, description="Accepted.")
    script_name: Optional[str] = Field(None, description="Not supported (no scripts): absent or empty.")
    script_args: list[Any] = Field([], description="Accepted with no script_name.")
    send_images: bool = Field(True, description="Return the images (base64) in the answer.")
    save_images: bool = Field(False, description="Accepted; images are kept in the image store.")
    alwayson_scripts: dict[str, Any] = Field({}, description="Not supported (no scripts): empty.")
    infotext: Optional[str] = Field(None, description="Not supported: send the fields themselves.")
    clip_skip: Optional[int] = Field(None, description="Extension (as SD.Next): CLIP_stop_at_last_layers for this "
                                                       "request.")

    def echo(self) -> dict[str, Any]:
        """``parameters`` of the answer: the request with A1111's defaults filled in."""
        return self.model_dump()


class A1111Txt2ImgRequest(_A1111Request):
    """AUTOMATIC1111 ``POST /sdapi/v1/txt2img`` body."""

    width: int = Field(1024, description="Image width (multiple of 8).")
    height: int = Field(1024, description="Image height (multiple of 8).")
    denoising_strength: Optional[float] = Field(None, description="Hires fix: how much the second pass redoes "
                                                                  "(default 0.75).")
    enable_hr: bool = Field(False, description="Hires fix: a second pass at a larger size.")
    firstphase_width: int = Field(0, description="Old API: the first pass's width (width is then the target).")
    firstphase_height: int = Field(0, description="Old API: the first pass's height.")
    hr_scale: float = Field(2.0, description="Hires: enlargement when hr_resize_x/y are 0.")
    hr_upscaler: Optional[str] = Field(None, description="Hires: Latent (and its modes), Lanczos, Nearest, None.")
    hr_second_pass_steps: int = Field(0, description="Hires: the second pass's steps (0: steps).")
    hr_resize_x: int = Field(0, description="Hires: target width (0: from hr_scale or the aspect ratio).")
    hr_resize_y: int = Field(0, description="Hires: target height.")
    hr_checkpoint_name: Optional[str] = Field(None, description="Hires: only the same checkpoint.")
    hr_sampler_name: Optional[str] = Field(None, description="Hires: the second pass's sampler.")
    hr_scheduler: Optional[str] = Field(None, description="Hires: the second pass's schedule type.")
    hr_prompt: str = Field("", description="Hires: the second pass's prompt (empty: prompt).")
    hr_negative_prompt: str = Field("", description="Hires: the second pass's negative prompt.")


class A1111Img2ImgRequest(_A1111Request):
    """AUTOMATIC1111 ``POST /sdapi/v1/img2img`` body."""

    init_images: Optional[list[str]] = Field(None, description="One image, base64 (PNG, JPEG, WebP).")
    resize_mode: int = Field(0, description="0 Just resize, 1 Crop and resize, 2 Resize and fill.")
    denoising_strength: float = Field(0.75, description="How much of the image is redone.")
    image_cfg_scale: Optional[float] = Field(None, description="Accepted (instruct-pix2pix models only).")
    mask: Optional[str] = Field(None, description="Inpainting mask, base64; white = repaint.")
    mask_blur_x: int = Field(4, description="Mask blur (pixels), with mask_blur_y.")
    mask_blur_y: int = Field(4, description="Mask blur (pixels), with mask_blur_x.")
    mask_blur: Optional[int] = Field(None, description="Mask blur in pixels (sets mask_blur_x and mask_blur_y).")
    mask_round: bool = Field(True, description="Accepted.")
    inpainting_fill: int = Field(0, description="0 fill (blurred surroundings), 1 original.")
    inpaint_full_res: bool = Field(True, description="Only masked: inpaint the masked area at full size.")
    inpaint_full_res_padding: int = Field(0, description="Only masked: the margin around it, pixels.")
    inpainting_mask_invert: int = Field(0, description="1: repaint the black area.")
    initial_noise_multiplier: Optional[float] = Field(None, description="Not supported: 1 or absent.")
    latent_mask: Optional[str] = Field(None, description="Not supported: absent.")
    include_init_images: bool = Field(False, description="Echo init_images and mask in parameters.")


A1111Wire = wire_model(A1111Txt2ImgRequest, "A1111Txt2ImgRequest")
"""BentoML ``input_spec`` for txt2img: the same fields, unchecked, so that errors get A1111's shape."""
A1111Img2ImgWire = wire_model(A1111Img2ImgRequest, "A1111Img2ImgRequest")


def sampler(name: Optional[str], schedule: Optional[str] = None, *, field: str = "sampler_name") -> Sampler:
    """The sampler for an A1111 sampler name (its label or an alias, any case) and schedule type; an
    ``InvalidRequest`` (400) naming the valid ones otherwise."""
    try:
        return Sampler(sampler_table.find(name, schedule).name)
    except sampler_table.UnknownSampler as exc:
        wrong = field if exc.field == "sampler_name" else field.replace("sampler_name", "scheduler")
        raise InvalidRequest(f"{wrong}: {exc}", field=wrong) from None


# -- <lora:name:weight> ---------------------------------------------------------------------------
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def extract_loras(prompt: str, *, apply: bool = True, field: str = "prompt") -> tuple[str, list[dict[str, Any]]]:
    """The prompt without its ``<lora:name:weight>`` tags (as the model sees it) and the LoRAs they name; with
    ``apply`` False (``disable_extra_networks``) the tags are removed and nothing is applied. Other extra
    networks (hypernetworks, ...) do not exist here: a 400 naming the field."""
    loras: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        kind, args = match.group(1).lower(), [a.strip() for a in match.group(2).split(":")]
        if kind not in ("lora", "lyco"):
            raise InvalidRequest(f"{field}: <{match.group(1)}:...> is an extra network this service does not have "
                                 "(only <lora:name:weight>)", field=field)
        name, weights = args[0], args[1:]
        try:
            numbers = [float(w) for w in weights if "=" not in w] or [1.0]
        except ValueError:
            raise InvalidRequest(f"{field}: the weight in {match.group(0)} is not a number", field=field) from None
        if any(n != numbers[0] for n in numbers) or any("=" in w for w in weights):
            raise InvalidRequest(f"{field}: {match.group(0)} gives the text encoder and the UNet different weights; "
                                 "one weight applies to both here", field=field)
        if any(lora["name"] == name for lora in loras):
            raise InvalidRequest(f"{field}: <lora:{name}> appears twice", field=field)
        if apply:
            loras.append({"name": name, "weight": numbers[0]})
        return ""

    text = _EXTRA_NETWORK.sub(take, prompt)
    text = re.sub(r"\s+,", ",", re.sub(r"[ \t]{2,}", " ", text))
    text = re.sub(r",\s*(,\s*)+", ", ", text).strip().strip(",").strip()
    return text, loras


# -- the mapping ----------------------------------------------------------------------------------
def _refuse(req: _A1111Request) -> None:
    """Fields that ask for what this service cannot do: a 400 naming the field."""
    def no(field: str, why: str) -> InvalidRequest:
        return InvalidRequest(f"{field}: {why}", field=field)

    if req.restore_faces:
        raise no("restore_faces", "face restoration needs face-restorer weights this service does not have "
                                  "(GET /sdapi/v1/face-restorers is empty); send false")
    if (req.script_name or "").strip().lower() not in ("", "none"):
        raise no("script_name", f"this service runs no scripts (asked for {req.script_name!r}; GET /sdapi/v1/scripts "
                                "is empty)")
    if req.alwayson_scripts:
        raise no("alwayson_scripts", f"this service runs no scripts (asked for: {', '.join(req.alwayson_scripts)})")
    if (req.infotext or "").strip():
        raise no("infotext", "parameters are not read from infotext here; send them as fields")
    for field in ("seed_resize_from_h", "seed_resize_from_w"):
        if getattr(req, field) > 0:
            raise no(field, "resizing the seed's noise is not supported; send -1")
    if req.s_min_uncond:
        raise no("s_min_uncond", "skipping the negative prompt at low noise is not supported; send 0")
    if req.s_churn:
        raise no("s_churn", "stochastic churn is not supported; send 0")
    if req.s_noise is not None and req.s_noise != 1:
        raise no("s_noise", "the noise multiplier is 1 here; send 1")
    if req.seed < -1 or req.seed > MAX_SEED:
        raise no("seed", f"must be -1 (random) or 0..{MAX_SEED}, not {req.seed}")
    if req.subseed < -1 or req.subseed > MAX_SEED:
        raise no("subseed", f"must be -1 (random) or 0..{MAX_SEED}, not {req.subseed}")
    if not 0 <= req.subseed_strength <= 1:
        raise no("subseed_strength", f"must be between 0 and 1, not {req.subseed_strength}")


def _settings(req: _A1111Request, options: dict[str, Any] | None,
              resolve: Callable[[str], str] | None) -> dict[str, Any]:
    """The options in force: the caller's (``POST /options``), then the request's ``override_settings``."""
    overrides, _ = a1111_options.validate(req.override_settings or {}, where="override_settings.", resolve=resolve)
    return {**(options or {}), **overrides}


def _common(req: _A1111Request, settings: dict[str, Any]) -> dict[str, Any]:
    """The native fields txt2img and img2img share."""
    _refuse(req)
    spec = sampler(req.sampler_name or req.sampler_index, req.scheduler)
    prompt, loras = extract_loras(req.prompt, apply=not req.disable_extra_networks)
    negative, negative_loras = extract_loras(req.negative_prompt, apply=False, field="negative_prompt")
    clip_skip = req.clip_skip if req.clip_skip is not None else settings.get("CLIP_stop_at_last_layers", 1)
    fields: dict[str, Any] = {
        "prompt": prompt, "negative_prompt": negative, "seed": None if req.seed == -1 else req.seed,
        "steps": req.steps, "guidance_scale": req.cfg_scale, "scheduler": spec,
        "num_images": req.batch_size * req.n_iter, "output_format": settings.get("samples_format", "png"),
        "quality": settings.get("jpeg_quality", 80), "tiling": bool(req.tiling), "clip_skip": clip_skip,
        "styles": list(req.styles), "loras": loras,
    }
    if settings.get("sd_model_checkpoint"):
        fields["model"] = settings["sd_model_checkpoint"]
    row = sampler_table.BY_NAME[spec.value]
    eta = req.eta
    if row.family == "DDIM":
        eta = eta if eta is not None else settings.get("eta_ddim", 0.0)
        fields["eta"] = eta or None
    elif row.ancestral and eta is not None and eta != 1:
        raise InvalidRequest(f"eta: {row.label} adds its full noise here (eta 1); send 1 or leave eta out",
                             field="eta")
    return fields


def uses_refiner(req: A1111Txt2ImgRequest) -> bool:
    named = (req.refiner_checkpoint or "").strip() not in ("", "None", "none")
    return named and (req.refiner_switch_at is None or req.refiner_switch_at < 1)


def _hires(req: A1111Txt2ImgRequest, fields: dict[str, Any]) -> dict[str, Any] | None:
    """The native ``hires`` for an A1111 hires fix (None without ``enable_hr``), and the first pass's size set
    in ``fields`` (``firstphase_width/height``, the old API, make width x height the target)."""
    if not req.enable_hr:
        return None
    if (req.hr_checkpoint_name or "").strip().lower() not in _SAME \
            and a1111_options.checkpoint_name(req.hr_checkpoint_name or "") != fields.get("model"):
        raise InvalidRequest("hr_checkpoint_name: the hires pass runs on the same checkpoint here; send \"Use same "
                             "checkpoint\" or leave it out", field="hr_checkpoint_name")
    upscaler = HR_UPSCALERS.get((req.hr_upscaler or "Latent").strip().lower())
    if upscaler is None:
        raise InvalidRequest(f"hr_upscaler: {req.hr_upscaler!r} needs upscaler weights this service does not have; "
                             f"valid: {', '.join((*LATENT_MODES, *UPSCALERS))}", field="hr_upscaler")
    hires: dict[str, Any] = {"upscaler": upscaler, "scale": req.hr_scale,
                             "denoising_strength": 0.75 if req.denoising_strength is None else req.denoising_strength}
    if req.firstphase_width > 0 or req.firstphase_height > 0:
        if req.firstphase_width <= 0 or req.firstphase_height <= 0:
            raise InvalidRequest("firstphase_width: give firstphase_width and firstphase_height together",
                                 field="firstphase_width")
        hires.update(width=fields["width"], height=fields["height"])
        fields.update(width=req.firstphase_width, height=req.firstphase_height)
    elif req.hr_resize_x > 0 or req.hr_resize_y > 0:
        hires.update(width=req.hr_resize_x or None, height=req.hr_resize_y or None)
    if req.hr_second_pass_steps > 0:
        hires["steps"] = req.hr_second_pass_steps
    hr_sampler = (req.hr_sampler_name or "").strip()
    hr_schedule = (req.hr_scheduler or "").strip()
    if hr_sampler.lower() not in _SAME or hr_schedule.lower() not in _SAME:
        name = hr_sampler if hr_sampler.lower() not in _SAME else (req.sampler_name or req.sampler_index)
        hires["sampler"] = sampler(name, hr_schedule if hr_schedule.lower() not in _SAME else None,
                                   field="hr_sampler_name")
    if req.hr_prompt.strip():
        text, loras = extract_loras(req.hr_prompt, apply=not req.disable_extra_networks, field="hr_prompt")
        if sorted((lora["name"], lora["weight"]) for lora in loras) != \
                sorted((lora["name"], lora["weight"]) for lora in fields["loras"]):
            raise InvalidRequest("hr_prompt: its <lora:...> differ from the prompt's; the hires pass uses the "
                                 "prompt's LoRAs here", field="hr_prompt")
        hires["prompt"] = text
    if req.hr_negative_prompt.strip():
        hires["negative_prompt"] = extract_loras(req.hr_negative_prompt, apply=False, field="hr_negative_prompt")[0]
    if uses_refiner(req):
        raise InvalidRequest("enable_hr: a hires fix and the refiner do not combine here; use one of them",
                             field="enable_hr")
    return hires


def to_generate_request(req: A1111Txt2ImgRequest, model: type[GenerateRequest] = GenerateRequest, *,
                        options: dict[str, Any] | None = None,
                        resolve: Callable[[str], str] | None = None) -> GenerateRequest:
    """The native request; its limits apply. A value it refuses is an ``InvalidRequest`` naming the A1111
    field that carried it. ``options``: the caller's A1111 settings; ``resolve`` checks a checkpoint name."""
    settings = _settings(req, options, resolve)
    fields = _common(req, settings)
    fields.update(width=req.width, height=req.height)
    refine = uses_refiner(req)
    fields["refine"] = "ensemble" if refine else "none"
    if refine and req.refiner_switch_at is not None:
        fields["high_noise_frac"] = req.refiner_switch_at
    hires = _hires(req, fields)
    if hires is not None:
        fields["hires"] = hires
    if req.subseed_strength > 0:
        fields.update(subseed=None if req.subseed == -1 else req.subseed, subseed_strength=req.subseed_strength)
    return _validated(model, fields, req)


def to_image_request(req: A1111Img2ImgRequest, img2img: type[Img2ImgRequest] = Img2ImgRequest,
                     inpaint: type[InpaintRequest] = InpaintRequest, *, options: dict[str, Any] | None = None,
                     resolve: Callable[[str], str] | None = None) -> Img2ImgRequest:
    """The native /img2img request, or /inpaint's when a mask is given."""
    if not req.init_images:
        raise InvalidRequest("init_images: give one image (base64)", field="init_images")
    if len(req.init_images) > 1:
        raise InvalidRequest(f"init_images: one image per request here, not {len(req.init_images)}",
                             field="init_images")
    if req.resize_mode not in RESIZE_MODES:
        raise InvalidRequest(f"resize_mode: {req.resize_mode} is not supported; 0 (just resize), 1 (crop and "
                             "resize) or 2 (resize and fill)", field="resize_mode")
    if req.subseed_strength > 0:
        raise InvalidRequest("subseed_strength: variation seeds are for txt2img here; send 0",
                             field="subseed_strength")
    if req.initial_noise_multiplier is not None and req.initial_noise_multiplier != 1:
        raise InvalidRequest("initial_noise_multiplier: only 1 here", field="initial_noise_multiplier")
    if req.latent_mask:
        raise InvalidRequest("latent_mask: a separate latent mask is not supported; send the mask only",
                             field="latent_mask")
    settings = _settings(req, options, resolve)
    fields = _common(req, settings)
    fields.update(image=req.init_images[0], strength=req.denoising_strength,
                  resize_mode=RESIZE_MODES[req.resize_mode], width=req.width, height=req.height)
    if not req.mask:
        return _validated(img2img, fields, req)
    blur = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
    if req.mask_blur is None and req.mask_blur_x != req.mask_blur_y:
        raise InvalidRequest("mask_blur_x: the blur is the same across and down here; give mask_blur",
                             field="mask_blur_x")
    if req.inpainting_fill not in (0, 1):
        raise InvalidRequest(f"inpainting_fill: {req.inpainting_fill} (latent noise / latent nothing) is not "
                             "supported; 0 (fill) or 1 (original)", field="inpainting_fill")
    fields.update(mask=req.mask, mask_blur=blur, mask_invert=bool(req.inpainting_mask_invert),
                  inpaint_fill="fill" if req.inpainting_fill == 0 else "original",
                  mask_padding=req.inpaint_full_res_padding if req.inpaint_full_res else None)
    return _validated(inpaint, fields, req)


def _validated(model: type[Any], fields: dict[str, Any], req: _A1111Request) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        name, detail = first_error(exc)
        named = re.match(r"(\w+): ", detail)  # a check of the whole request names its field first
        if name is None and named and named.group(1) in model.model_fields:
            name, detail = named.group(1), detail[len(named.group(0)):]
        if name is None:
            raise InvalidRequest(detail) from None
        if name == "num_images":
            raise InvalidRequest(f"batch_size x n_iter is {req.batch_size} x {req.n_iter} = "
                                 f"{req.batch_size * req.n_iter} images; the limit is 8", field="batch_size") from None
        field = _NAMES.get(name, name)
        if name == "clip_skip" and req.clip_skip is None:
            field = "CLIP_stop_at_last_layers"
        raise InvalidRequest(f"{field}: {detail}", field=field) from None


def parse_body(body: Any, model: type[GenerateRequest] = GenerateRequest) -> list[GenerateRequest]:
    """A raw txt2img body as the native request it runs (the gateway's parser for this route)."""
    return [to_generate_request(A1111Txt2ImgRequest.model_validate(body), model)]


def parse_img2img_body(body: Any, img2img: type[Img2ImgRequest] = Img2ImgRequest,
                       inpaint: type[InpaintRequest] = InpaintRequest) -> list[Img2ImgRequest]:
    """A raw img2img body as the native request it runs (the gateway's parser for this route)."""
    return [to_image_request(A1111Img2ImgRequest.model_validate(body), img2img, inpaint)]


def to_a1111_response(req: _A1111Request, generated: Any, images: list[CachedImage],
                      model_name: str) -> dict[str, Any]:
    """A1111's answer; ``info`` is a JSON string, with the real seeds and each image's infotext. Images the
    safety check withheld are left out (counted in ``extra_generation_params``); all withheld:
    ``ContentFiltered`` (400)."""
    kept = kept_images(images)
    withheld, images = len(images) - len(kept), kept
    count = len(images)
    seeds = [image.seed for image in images]
    subseeds = [_infotext_value(image.parameters, "Variation seed") for image in images]
    label = sampler_label(generated.scheduler.value)
    extra: dict[str, Any] = {}
    if getattr(generated, "refine", None) is not None and generated.refine.value != "none":
        extra = {"Refiner": req.refiner_checkpoint, "Refiner switch at": generated.high_noise_frac}
    hires = getattr(generated, "hires", None)
    if hires is not None:
        extra.update({"Hires upscale": hires.scale, "Hires steps": hires.steps or generated.steps,
                      "Hires upscaler": req.hr_upscaler or "Latent"})  # type: ignore[attr-defined]
    if withheld:
        extra["Content filtered"] = withheld
    strength = getattr(generated, "strength", None) if isinstance(generated, Img2ImgRequest) else (
        hires.denoising_strength if hires is not None else None)
    ran = [_infotext_prompts(image.parameters) for image in images]  # with the styles applied, as A1111's all_*
    info = {
        "prompt": generated.prompt, "all_prompts": [prompt for prompt, _ in ran] or [generated.prompt] * count,
        "negative_prompt": generated.negative_prompt,
        "all_negative_prompts": [negative for _, negative in ran] or [generated.negative_prompt] * count,
        "seed": seeds[0] if seeds else None, "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds and subseeds[0] is not None else -1,
        "all_subseeds": [s if s is not None else -1 for s in subseeds],
        "subseed_strength": getattr(generated, "subseed_strength", 0),
        "width": images[0].width if images else generated.width, "height": images[0].height if images else
        generated.height, "sampler_name": label, "cfg_scale": generated.guidance_scale, "steps": generated.steps,
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": strength,
        "extra_generation_params": extra, "index_of_first_image": 0,
        "infotexts": [image.parameters for image in images], "styles": list(generated.styles),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": generated.clip_skip,
        "is_using_inpainting_conditioning": False, "version": None,
    }
    encoded = [base64.b64encode(image.data).decode("ascii") for image in images] if req.send_images else []
    parameters = req.echo()
    if isinstance(req, A1111Img2ImgRequest) and not req.include_init_images:
        parameters.update(init_images=None, mask=None)
    return {"images": encoded, "parameters": parameters, "info": json.dumps(info)}


def _infotext_prompts(text: str) -> tuple[str, str]:
    """The prompt and negative prompt an image's infotext records (the last line holds the parameters)."""
    head = text.rsplit("\n", 1)[0] if "\n" in text else ""
    prompt, _, negative = head.partition("\nNegative prompt: ")
    if head.startswith("Negative prompt: "):
        prompt, negative = "", head.removeprefix("Negative prompt: ")
    return prompt, negative


def _infotext_value(text: str, key: str) -> int | None:
    match = re.search(rf"(?:^|, ){re.escape(key)}: (\d+)", text.splitlines()[-1] if text else "")
    return int(match.group(1)) if match else None


# -- errors -------------------------------------------------------------------------------------
def a1111_error(status: int, message: str, headers: dict[str, str] | None = None, *, error: str = "HTTPException",
                errors: str | None = None) -> JSONResponse:
    """A1111's error shape (its ``handle_exception``): ``{"error", "detail", "body", "errors"}``."""
    return JSONResponse({"error": error, "detail": message, "body": "",
                         "errors": errors if errors is not None else f"{status}: {message}"},
                        status_code=status, headers=headers)


def from_error(exc: Exception) -> JSONResponse:
    if isinstance(exc, ValidationError):
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in error["loc"])
        return a1111_error(400, f"{field}: {error['msg']}" if field else error["msg"])
    assert isinstance(exc, ServiceError)
    return a1111_error(exc.status, exc.message, exc.headers(), error=exc.details.get("a1111_error", "HTTPException"),
                       errors=exc.details.get("a1111_errors"))


answers_a1111_errors = answers_in(from_error)
"""Decorator for the generation API methods: every error they raise is answered in A1111's shape."""


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
        kind = getattr(getattr(job.work, "key", None), "kind", "txt2img")
        state.update(job="txt2img" if kind == "txt2img" else "img2img", sampling_step=step,
                     sampling_steps=job.total_steps, interrupted=all(j.cancel_requested for j in running),
                     job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(time.time() - elapsed)))
    return {"progress": round(progress, 4), "eta_relative": round(max(0.0, eta), 2), "state": state,
            "current_image": None, "textinfo": None}


def sd_models(models: list[Any], usable: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
    """A1111's ``/sd-models`` from the model store's SDXL base pipelines (``store.StoredPipeline``): those a
    request can run (``usable``; all when it is None)."""
    out = []
    for model in models:
        if model.metadata.get("role") != "base" or (usable is not None and not usable(model.tag)):
            continue
        sha256 = model.metadata.get("sha256")
        out.append({"title": model.tag, "model_name": model.tag.split(":")[0],
                    "hash": sha256[:10] if sha256 else None, "sha256": sha256, "filename": str(model.path),
                    "config": None})
    return out


def samplers() -> list[dict[str, Any]]:
    """Every row of the sampler table by its A1111 name (``options.scheduler``: the schedule Automatic picks)."""
    return [{"name": spec.label, "aliases": list(spec.aliases), "options": dict(spec.options)} for spec in SAMPLERS]


def schedulers() -> list[dict[str, Any]]:
    """A1111 1.9+'s ``/schedulers``: the schedule types the samplers here have."""
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name, label in SCHEDULES.items()]


def upscalers() -> list[dict[str, Any]]:
    """The upscalers that need no weights (A1111 lists its built-in ones the same way)."""
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None,
             "scale": 1 if name == "None" else 4} for name in UPSCALERS]


def loras_view(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A1111's ``/loras`` (its Lora extension's shape) from the model store's LoRAs; ``name`` is what
    ``<lora:name:weight>`` takes."""
    return [{"name": row["tag"].split(":")[0], "alias": row["tag"].split(":")[0], "path": row["tag"],
             "metadata": {k: v for k, v in row.items() if k != "tag" and v is not None}} for row in rows]


def memory_view(readings: list[Any]) -> dict[str, Any]:
    """A1111's ``/memory``: the process's RAM (psutil) and, from the GPU telemetry (NVML), the first GPU's
    memory; ``{"error": "unavailable"}`` without a GPU, as A1111 answers then."""
    try:
        import psutil

        rss = psutil.Process(os.getpid()).memory_info().rss
        total = psutil.virtual_memory().total
        ram: dict[str, Any] = {"free": total - rss, "used": rss, "total": total}
    except Exception as exc:  # noqa: BLE001 - A1111 reports the error in place
        ram = {"error": str(exc)}
    if not readings:
        return {"ram": ram, "cuda": {"error": "unavailable"}}
    gpu = readings[0]
    used, total = int(gpu.memory_used_bytes), int(gpu.memory_total_bytes)
    cuda = {"system": {"free": total - used, "used": used, "total": total}, "name": gpu.name,
            "gpus": [{"index": r.index, "name": r.name, "used": int(r.memory_used_bytes),
                      "total": int(r.memory_total_bytes)} for r in readings]}
    return {"ram": ram, "cuda": cuda}


def interrupt(scheduler: Scheduler | None, owners: JobOwners | None, caller: str | None) -> int:
    """Cancel the running batch's jobs (at the next denoising step): all of them when ``caller`` is
    None (a service without keys), else those the caller started. Returns how many were cancelled."""
    if scheduler is None:
        return 0
    running: list[Job] = list(scheduler._running)
    mine = [job for job in running if caller is None or (owners is not None and owners.owner(job) == caller)]
    return sum(1 for job in mine if scheduler.cancel(job))


ROUTES = {
    "GET": ("options", "progress", "sd-models", "samplers", "schedulers", "prompt-styles", "loras", "cmd-flags",
            "embeddings", "hypernetworks", "upscalers", "latent-upscale-modes", "face-restorers", "sd-vae",
            "realesrgan-models", "memory", "scripts", "script-info", "extensions"),
    "POST": ("txt2img", "img2img", "options", "interrupt", "skip", "refresh-checkpoints", "refresh-vae",
             "refresh-loras"),
}
"""What ``/sdapi/v1`` answers (txt2img and img2img are API methods of the service); anything else: 404 JSON."""


def a1111_app(models: Callable[[], list[Any]], service: Callable[[], Any] | None = None, *,
              loras: Callable[[], list[dict[str, Any]]] = list, options: OptionsStore | None = None) -> Starlette:
    """A Starlette app for ``/sdapi/v1`` (txt2img and img2img are API methods of the service).

    It reaches the service instance through ``service`` (BentoML's ``get_current_service`` by default): its
    ``runtime`` (scheduler, generation, throttle, checkpoints) and ``front`` (keys, job owners, styles, options).
    With keys, every route needs the gateway's principal (``/sdapi/v1`` is guarded; else 401); ``interrupt``
    stops only the caller's own generations and ``options`` are the caller's own.
    """
    if service is None:
        from bentoml import get_current_service as service

    def runtime() -> Any:
        return getattr(service(), "runtime", None)

    def scheduler() -> Scheduler | None:
        rt = runtime()
        return rt.scheduler if rt is not None else None

    def store() -> OptionsStore | None:
        return options if options is not None else getattr(service().front, "a1111_options", None)

    def resolve(tag: str) -> str:
        generation = getattr(runtime(), "generation", None)
        return generation.resolve_model(tag) if generation is not None else tag

    def usable(tag: str) -> bool:
        try:
            return resolve(tag) == tag
        except ServiceError:
            return False

    def who(request: Request) -> tuple[bool, str | None]:
        """(allowed, the caller's key name): with keys a caller is needed (the gateway has checked the key)."""
        known, caller = caller_name(request.scope)
        return not (service().front.keys is not None and (not known or caller is None)), caller

    def guarded(handler: Callable[[Request, str | None], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            allowed, caller = who(request)
            if not allowed:
                return a1111_error(401, "a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)")
            try:
                answer = await handler(request, caller)
            except ServiceError as exc:
                return from_error(exc)
            return answer if isinstance(answer, Response) else JSONResponse(answer)
        return endpoint

    def current_options(caller: str | None) -> dict[str, Any]:
        mine = store().get(caller) if store() is not None else {}
        default = resolve("")
        tag = mine.get("sd_model_checkpoint") or default
        stored = {m.tag: m for m in models()}
        sha256 = stored[tag].metadata.get("sha256") if tag in stored else None
        values = {name: option.default for name, option in OPTIONS.items()}
        values.update(mine)
        values.update(sd_model_checkpoint=tag, sd_checkpoint_hash=sha256, sd_checkpoint_name=tag.split(":")[0])
        return values

    async def get_options(request: Request, caller: str | None) -> Any:
        return current_options(caller)

    async def set_options(request: Request, caller: str | None) -> Any:
        try:
            body = await request.json()
        except ValueError:
            raise InvalidRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidRequest("send the options as a JSON object")
        values, ignored = a1111_options.validate(body, resolve=resolve)
        if store() is None:
            raise InvalidRequest("options cannot be changed on this server")
        if "sd_model_checkpoint" in values and values["sd_model_checkpoint"] == resolve(""):
            values["sd_model_checkpoint"] = None  # the server's default: follow it
        if values:
            store().update(caller, values)
        headers = {"X-Ignored-Options": ", ".join(ignored)} if ignored else None
        return JSONResponse(None, headers=headers)  # A1111 answers null

    async def progress(request: Request, caller: str | None) -> Any:
        return progress_view(scheduler())

    async def list_models(request: Request, caller: str | None) -> Any:
        return sd_models(models(), usable if getattr(runtime(), "generation", None) is not None else None)

    async def list_samplers(request: Request, caller: str | None) -> Any:
        return samplers()

    async def list_schedulers(request: Request, caller: str | None) -> Any:
        return schedulers()

    async def styles(request: Request, caller: str | None) -> Any:
        book = getattr(service().front, "styles", None)
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in (book.styles() if book is not None else [])]

    async def list_loras(request: Request, caller: str | None) -> Any:
        return loras_view(loras())

    async def cmd_flags(request: Request, caller: str | None) -> Any:
        front = service().front
        settings = getattr(front, "settings", None)
        styles_file = getattr(settings, "styles_file", None)
        return {"api": True, "nowebui": True, "api_auth": None, "ckpt": resolve(""),
                "styles_file": [str(styles_file)] if styles_file else [], "lora_dir": None, "ckpt_dir": None,
                "vae_dir": None, "embeddings_dir": None, "hypernetwork_dir": None, "no_half": None,
                "lowvram": False, "medvram": False, "xformers": False, "listen": True, "port": None,
                "freeze_settings": False, "api_keys": front.keys is not None}

    async def embeddings(request: Request, caller: str | None) -> Any:
        return {"loaded": {}, "skipped": {}}

    async def empty(request: Request, caller: str | None) -> Any:
        return []

    async def list_upscalers(request: Request, caller: str | None) -> Any:
        return upscalers()

    async def latent_modes(request: Request, caller: str | None) -> Any:
        return [{"name": name} for name in LATENT_MODES]

    async def memory(request: Request, caller: str | None) -> Any:
        throttle = getattr(runtime(), "throttle", None)
        if throttle is not None:
            throttle.update()
        return memory_view(list(getattr(throttle, "readings", []) or []))

    async def scripts(request: Request, caller: str | None) -> Any:
        return {"txt2img": [], "img2img": []}

    async def stop(request: Request, caller: str | None) -> Any:
        interrupt(scheduler(), service().front.a1111_owners, caller)
        return {}

    async def skip(request: Request, caller: str | None) -> Any:
        return JSONResponse(None)  # A1111 skips the current image of a batch; a batch here is one pipeline call

    async def refresh(request: Request, caller: str | None) -> Any:
        rt = runtime()
        if rt is not None and hasattr(rt, "refresh_checkpoints"):
            rt.refresh_checkpoints()
        return JSONResponse(None)

    async def refreshed(request: Request, caller: str | None) -> Any:
        return JSONResponse(None)  # nothing cached to refresh: VAEs are the checkpoints', LoRAs read per request

    async def not_found(request: Request) -> Response:
        path = request.path_params.get("path", "").strip("/")
        other = [m for m, names in ROUTES.items() if path in names and m != request.method]
        if other:
            return a1111_error(405, "Method Not Allowed", headers={"Allow": ", ".join(other)})
        return a1111_error(404, "Not Found")

    handlers: dict[tuple[str, str], Callable[[Request, str | None], Any]] = {
        ("GET", "options"): get_options, ("POST", "options"): set_options, ("GET", "progress"): progress,
        ("GET", "sd-models"): list_models, ("GET", "samplers"): list_samplers, ("GET", "schedulers"): list_schedulers,
        ("GET", "prompt-styles"): styles, ("GET", "loras"): list_loras, ("GET", "cmd-flags"): cmd_flags,
        ("GET", "embeddings"): embeddings, ("GET", "hypernetworks"): empty, ("GET", "upscalers"): list_upscalers,
        ("GET", "latent-upscale-modes"): latent_modes, ("GET", "face-restorers"): empty, ("GET", "sd-vae"): empty,
        ("GET", "realesrgan-models"): empty, ("GET", "memory"): memory, ("GET", "scripts"): scripts,
        ("GET", "script-info"): empty, ("GET", "extensions"): empty, ("POST", "interrupt"): stop,
        ("POST", "skip"): skip, ("POST", "refresh-checkpoints"): refresh, ("POST", "refresh-vae"): refreshed,
        ("POST", "refresh-loras"): refreshed,
    }
    routes = [Route(f"/{path}", guarded(handler), methods=[method]) for (method, path), handler in handlers.items()]
    routes.append(Route("/{path:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]))
    return Starlette(routes=routes)
