"""The OpenAI Images API, ``POST /v1/images/generations``, mapped onto ``GenerateRequest``.

Any OpenAI client works against ``base_url=<server>/v1`` with the service's API key as its key:
``OpenAI(base_url="http://host:3000/v1", api_key=KEY).images.generate(prompt=..., size="1024x1024")``.

Mapping: ``size`` "WxH" -> width, height (any size ``GenerateRequest`` accepts; "auto" -> 1024x1024);
``n`` -> num_images; ``quality`` (low, medium, high, auto; standard, hd) -> steps (``QUALITY_STEPS``);
``output_format`` (png, jpeg, webp) and ``output_compression`` -> output_format, quality; ``model``: a
checkpoint of ``GET /v1/models`` runs that checkpoint, any other name (``dall-e-3``, ``gpt-image-1``) the
default one; ``user`` and ``safety_identifier`` are recorded in the audit line. ``background`` (``auto``,
``opaque``: SDXL's images are opaque) and ``moderation`` (``auto``: the operator's NSFW check) are honoured
where they map; ``background: transparent``, ``moderation: low``, ``style`` (DALL-E 3's vivid/natural) and
the parameters of other models (``partial_images``, ``input_fidelity: high``, ``complexity``, frames, SVG) are
refused with a 400 naming the parameter. Extensions, not OpenAI's (send them with the client's ``extra_body``):
``negative_prompt``, ``seed``, ``steps`` (wins over ``quality``), ``guidance_scale``, and for edits
``strength``. Other unknown fields are ignored. Limits are those of the native requests; every error has
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

``POST /v1/images/edits`` (multipart, as OpenAI's clients send it; the gateway turns the form into JSON with
the files in base64) maps onto ``/img2img``, or ``/inpaint`` with a mask: OpenAI's mask is a PNG whose fully
transparent pixels are the area to edit (an image with transparent pixels and no mask: those pixels).
``GET /v1/models`` lists the checkpoints.

Mounting (service.py): an API method with ``input_spec=OpenAIImageWire`` and
``route="/v1/images/generations"``, decorated with ``@answers_openai_errors``; it validates
``OpenAIImageRequest.model_validate(given(fields))``, maps with ``to_generate_request``, runs
``Generation.run`` and answers ``to_openai_response(...)``. The route belongs in the gateway's
generation routes (API key, tier limits, rate limits, audit), which parse the body the same way.
"""

from __future__ import annotations

import base64
import io
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

from pydantic import ConfigDict, Field, ValidationError, field_validator
from starlette.responses import JSONResponse

from ..errors import InvalidRequest, ServiceError, answers_in
from ..schemas import GenerateRequest, Img2ImgRequest, InpaintRequest
from .common import ForeignRequest, first_error, kept_images, wire_model

if TYPE_CHECKING:
    from ..core.cache import CachedImage

SDXL_SIZES = ("1024x1024", "1152x896", "896x1152", "1216x832", "832x1216", "1344x768", "768x1344",
              "1536x640", "640x1536")
"""The sizes SDXL was trained on (about one megapixel); 256x256 and 512x512 work for quick tests."""
QUALITY_STEPS = {"standard": 30, "hd": 50, "low": 20, "medium": 30, "high": 50, "auto": 30}
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
_LIMIT_PARAMS = {"max_images": "n", "max_pixels": "size", "max_steps": "quality"}
"""A tier limit (``policy``) -> the OpenAI parameter that asked for more."""
_PARAMS = {"width": "size", "height": "size", "num_images": "n", "output_format": "output_format",
           "quality": "output_compression"}


class OpenAIImageRequest(ForeignRequest):
    """OpenAI ``POST /v1/images/generations`` body (unknown fields are ignored, as listed above)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(description="What to draw.")
    model: Optional[str] = Field(None, description="Accepted, any name; the served SDXL model answers.")
    n: int = Field(1, ge=1, le=8, description="Images to generate (1..8).")
    size: str = Field("1024x1024", description="WIDTHxHEIGHT: " + ", ".join(SDXL_SIZES) + "; or any size "
                                               "the service accepts (multiples of 8, 256..2048).")
    response_format: Literal["url", "b64_json"] = Field("url", description="url (a link to the image "
                                                                           "store) or b64_json.")
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] = Field(
        "auto", description="Denoising steps: low 20, standard/medium/auto 30, hd/high 50.")
    style: Optional[str] = Field(None, description="DALL-E 3's vivid/natural: not supported (absent).")
    user: Optional[str] = Field(None, max_length=256, description="Your end user's id; recorded in the audit log.")
    safety_identifier: Optional[str] = Field(None, max_length=256, description="Recorded in the audit log.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image file format.")
    output_compression: Optional[int] = Field(None, ge=0, le=100, description="JPEG/WebP quality, 0..100.")
    background: Literal["auto", "opaque"] = Field("auto", description="auto or opaque (SDXL's images are "
                                                                     "opaque); transparent is not supported.")
    moderation: Literal["auto"] = Field("auto", description="auto: the operator's NSFW check applies (low is not "
                                                            "supported).")
    stream: Optional[bool] = Field(None, description="Streaming is not supported: false or absent.")
    partial_images: Optional[int] = Field(None, description="Streaming only: not supported (absent or 0).")
    complexity: Optional[str] = Field(None, description="Not supported (absent).")
    frame_count: Optional[int] = Field(None, description="Not supported (absent).")
    frame_duration_ms: Optional[int] = Field(None, description="Not supported (absent).")
    svg: Optional[Any] = Field(None, description="Not supported (absent).")
    negative_prompt: str = Field("", description="Extension: what to avoid.")
    seed: Optional[int] = Field(None, description="Extension: seed of the first image (image i: seed+i).")
    steps: Optional[int] = Field(None, description="Extension: denoising steps, instead of quality.")
    guidance_scale: Optional[float] = Field(None, description="Extension: classifier-free guidance scale.")

    @field_validator("size")
    @classmethod
    def _size_format(cls, value: str) -> str:
        if value.strip().lower() == "auto":
            return "1024x1024"
        if not _SIZE.match(value):
            raise ValueError(f"size must be WIDTHxHEIGHT, for example {', '.join(SDXL_SIZES[:3])}")
        return value

    @field_validator("background", mode="before")
    @classmethod
    def _background(cls, value: Any) -> Any:
        if value == "transparent":
            raise ValueError("transparent backgrounds are not supported (SDXL's images are opaque); use auto or "
                             "opaque")
        return value

    @field_validator("moderation", mode="before")
    @classmethod
    def _moderation(cls, value: Any) -> Any:
        if value == "low":
            raise ValueError("low is not supported: the NSFW check is the operator's (auto)")
        return value

    @field_validator("style", "complexity", "svg")
    @classmethod
    def _absent(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("not supported by this service; leave it out")
        return value

    @field_validator("partial_images", "frame_count", "frame_duration_ms")
    @classmethod
    def _absent_or_zero(cls, value: Any) -> Any:
        if value:
            raise ValueError("not supported by this service; leave it out")
        return value

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: Optional[bool]) -> Optional[bool]:
        if value:
            raise ValueError("streaming is not supported; leave stream out or false")
        return value

    @property
    def dimensions(self) -> tuple[int, int]:
        match = _SIZE.match(self.size)
        assert match is not None  # checked by the validator
        return int(match.group(1)), int(match.group(2))


OpenAIImageWire = wire_model(OpenAIImageRequest, "OpenAIImageGenerationRequest")
"""BentoML ``input_spec`` for the route: the same fields, unchecked, so that errors get OpenAI's shape."""


class OpenAIEditRequest(OpenAIImageRequest):
    """OpenAI ``POST /v1/images/edits`` (the form's files in base64, as the gateway passes them on)."""

    image: Any = Field(description="The image to edit, base64 (PNG, JPEG, WebP); one image.")
    mask: Optional[str] = Field(None, description="PNG whose fully transparent pixels are the area to edit.")
    size: str = Field("auto", description="WIDTHxHEIGHT of the result; auto: the image's own size.")
    input_fidelity: Optional[Literal["low"]] = Field(None, description="low (the default); high is not "
                                                                       "supported.")
    strength: Optional[float] = Field(None, description="Extension: how much is redone (img2img 0.6, masked "
                                                        "0.99).")

    @field_validator("size")
    @classmethod
    def _size_format(cls, value: str) -> str:
        if value.strip().lower() == "auto":
            return "auto"
        if not _SIZE.match(value):
            raise ValueError(f"size must be auto or WIDTHxHEIGHT, for example {', '.join(SDXL_SIZES[:3])}")
        return value

    @field_validator("input_fidelity", mode="before")
    @classmethod
    def _fidelity(cls, value: Any) -> Any:
        if value == "high":
            raise ValueError("high is not supported; low (the default) or leave it out")
        return value


OpenAIEditWire = wire_model(OpenAIEditRequest, "OpenAIImageEditRequest")


def parse_body(body: Any, model: type[GenerateRequest] = GenerateRequest) -> list[GenerateRequest]:
    """A raw body as the native request it runs (the gateway's parser for this route)."""
    return [to_generate_request(OpenAIImageRequest.model_validate(body), model)]


def parse_edit_body(body: Any, img2img: type[Img2ImgRequest] = Img2ImgRequest,
                    inpaint: type[InpaintRequest] = InpaintRequest) -> list[Img2ImgRequest]:
    """An edit (the gateway's form, as JSON) as the native request it runs."""
    return [to_image_request(OpenAIEditRequest.model_validate(body), img2img, inpaint)]


def checkpoint(name: str | None, resolve: Callable[[str], str] | None) -> str | None:
    """The checkpoint ``model`` names, when it names one (``GET /v1/models``); None for any other name."""
    if not name or resolve is None:
        return None
    try:
        return resolve(name)
    except ServiceError:
        return None


def _fields(req: OpenAIImageRequest, resolve: Callable[[str], str] | None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "prompt": req.prompt, "negative_prompt": req.negative_prompt, "num_images": req.n,
        "steps": req.steps if req.steps is not None else QUALITY_STEPS[req.quality], "seed": req.seed,
        "output_format": req.output_format,
    }
    if req.guidance_scale is not None:
        fields["guidance_scale"] = req.guidance_scale
    if req.output_compression is not None:
        fields["quality"] = max(1, req.output_compression)
    chosen = checkpoint(req.model, resolve)
    if chosen is not None:
        fields["model"] = chosen
    return fields


def to_generate_request(req: OpenAIImageRequest, model: type[GenerateRequest] = GenerateRequest, *,
                        resolve: Callable[[str], str] | None = None) -> GenerateRequest:
    """The native request; its limits apply. A value it refuses is an ``InvalidRequest`` naming the
    OpenAI parameter (``field``) that carried it. ``resolve``: a checkpoint name -> its tag."""
    width, height = req.dimensions
    fields = {**_fields(req, resolve), "width": width, "height": height}
    return _validated(model, fields, req)


def to_image_request(req: OpenAIEditRequest, img2img: type[Img2ImgRequest] = Img2ImgRequest,
                     inpaint: type[InpaintRequest] = InpaintRequest, *,
                     resolve: Callable[[str], str] | None = None, max_upload_bytes: int = 12 * 2**20) -> Img2ImgRequest:
    """An edit as native /img2img, or /inpaint when there is an area to edit: the mask's fully transparent
    pixels, or (no mask) the image's own."""
    from ..core.imageops import transparent_to_mask
    from ..core.uploads import decode_base64_image

    images = req.image if isinstance(req.image, list) else [req.image]
    if len(images) != 1 or not isinstance(images[0], str) or not images[0]:
        raise InvalidRequest(f"image: give one image (this service edits one at a time, not {len(images)})",
                             field="image")
    fields = _fields(req, resolve)
    fields["image"] = images[0]
    if req.size != "auto":
        fields["width"], fields["height"] = req.dimensions
    if req.strength is not None:
        fields["strength"] = req.strength
    limit = 4096 * 4096
    source = decode_base64_image(images[0], max_pixels=limit, max_bytes=max_upload_bytes, field="image")
    if req.mask is not None:
        mask_image = decode_base64_image(req.mask, max_pixels=limit, max_bytes=max_upload_bytes, field="mask")
        if mask_image.size != source.size:
            raise InvalidRequest(f"mask: the mask is {mask_image.width}x{mask_image.height}, the image "
                                 f"{source.width}x{source.height}; they must be the same size", field="mask")
        mask = transparent_to_mask(mask_image)
        if mask is None:
            raise InvalidRequest("mask: the mask needs an alpha channel: its fully transparent pixels are the area "
                                 "to edit (a PNG with transparency)", field="mask")
    else:
        mask = transparent_to_mask(source)
        if mask is not None and mask.getextrema()[1] == 0:
            mask = None  # an alpha channel with nothing transparent: edit the whole image
    if mask is None:
        return _validated(img2img, fields, req)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    fields["mask"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return _validated(inpaint, fields, req)


def _validated(model: type[Any], fields: dict[str, Any], req: OpenAIImageRequest) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        field, detail = first_error(exc)
        name = field or _field_in(detail)
        param = "quality" if name == "steps" and req.steps is None else _PARAMS.get(name, name)
        if field and name != param:
            detail = f"{name}: {detail}"
        if param == "size":
            message = f"size {req.size} is not supported ({detail}). SDXL sizes: {', '.join(SDXL_SIZES)}"
        else:
            message = detail if detail.startswith(param) else f"{param}: {detail}"
        raise InvalidRequest(message, field=param) from None


def to_openai_response(images: list[CachedImage], revised_prompt: str, created: int,
                       response_format: str, url_for: Callable[[str], str],
                       req: OpenAIImageRequest | None = None) -> dict[str, Any]:
    """``{"created", "data": [{"b64_json" | "url", "revised_prompt"}]}``; ``url_for(image_id)`` gives
    each image's link (absolute, as OpenAI's are: see ``absolute_url``). Images the safety check withheld
    are left out (OpenAI's answer has no per-image flag); all withheld: ``ContentFiltered`` (400,
    code ``content_policy_violation``)."""
    kept = kept_images(images)
    key = "b64_json" if response_format == "b64_json" else "url"
    data = [{key: base64.b64encode(image.data).decode("ascii") if key == "b64_json" else url_for(image.id),
             "revised_prompt": revised_prompt} for image in kept]
    answer: dict[str, Any] = {"created": created, "data": data}
    if req is not None and kept:  # what the newer Images API reports beside the data
        answer.update(background="opaque", output_format=req.output_format, quality=req.quality,
                      size=f"{kept[0].width}x{kept[0].height}")
    return answer


def absolute_url(base_url: str, url: str) -> str:
    """An image link that clients can fetch: ``url`` as is when absolute (``SDXL_BENTO_PUBLIC_URL`` is
    set), else joined to the address the request came to."""
    return url if re.match(r"^https?://", url) else base_url.rstrip("/") + "/" + url.lstrip("/")


async def answer(generation: Any, req: Any, oreq: OpenAIImageRequest, rctx: Any, base_url: str) -> dict[str, Any]:
    """Run the native request ``req`` (``Generation.run`` for the caller ``rctx``) and answer in OpenAI's shape,
    links absolute and signed for the caller; the audit line gets the OpenAI fields whether it ran or failed."""
    try:
        outcome = await generation.run(req, rctx)
    finally:
        record(rctx.audit, oreq)
    return to_openai_response(
        outcome.images, oreq.prompt, int(time.time()), oreq.response_format,
        url_for=lambda image_id: absolute_url(base_url, generation.url(image_id, rctx.principal)), req=oreq)


def record(audit: dict[str, Any], req: OpenAIImageRequest) -> None:
    """Note the OpenAI-only fields in the audit line's parameters (call after ``Generation.run``,
    which sets the parameters)."""
    audit.setdefault("parameters", {}).update(
        api="openai", user=req.user, safety_identifier=req.safety_identifier, requested_model=req.model,
        size=req.size, quality=req.quality)


# -- errors -------------------------------------------------------------------------------------
def openai_error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def from_service_error(exc: ServiceError) -> JSONResponse:
    """A service error in OpenAI's shape; ``code`` is the service's error type (``overloaded``,
    ``deadline``, ``forbidden``...), ``Retry-After`` and rate-limit headers are kept."""
    if exc.status == 429:
        type_, code = "requests", "rate_limit_exceeded"
    elif exc.status >= 500:
        type_, code = "server_error", exc.type
    else:
        type_ = "invalid_request_error"
        code = {"invalid_request": "invalid_value", "unauthorized": "invalid_api_key",
                "content_filtered": "content_policy_violation"}.get(exc.type, exc.type)
    param = exc.details.get("field") or _LIMIT_PARAMS.get(exc.details.get("limit", ""))
    return openai_error(exc.status, exc.message, type_, code, param, exc.headers())


def from_validation_error(exc: ValidationError) -> JSONResponse:
    """An invalid OpenAI body: 400, ``param`` the failing field, OpenAI's phrasing."""
    error = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in error["loc"]) or None
    if error["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {_message(error['msg'])}."
    return openai_error(400, message, "invalid_request_error", "missing_required_parameter"
                        if error["type"] == "missing" else "invalid_value", param)


def error_response(exc: Exception) -> JSONResponse:
    """Any error of this route (a ``ServiceError`` or a pydantic ``ValidationError``) in OpenAI's shape."""
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    assert isinstance(exc, ServiceError)
    return from_service_error(exc)


answers_openai_errors = answers_in(error_response)
"""Decorator for the API method: every error it raises is answered in OpenAI's shape."""


def _field_in(message: str) -> str:
    """The field a model-level check names first (``prompt is 600 characters``, ``width x height``)."""
    text = _message(message)
    for name in ("negative_prompt", "prompt", "width"):
        if text.startswith(name):
            return name
    return "prompt"


def _message(message: str) -> str:
    return message.removeprefix("Value error, ")



# -- GET /v1/models ------------------------------------------------------------------------------
def models_view(checkpoints: list[dict[str, Any]], created: int) -> dict[str, Any]:
    """OpenAI's model list from the checkpoints a request can run (``model`` takes any of these ids)."""
    return {"object": "list", "data": [{"id": row["tag"], "object": "model", "created": created,
                                        "owned_by": "sdxl-bento"} for row in checkpoints]}


def openai_app(service: Callable[[], Any] | None = None) -> Any:
    """``/v1``'s GET routes (``/v1/models``, ``/v1/models/{id}``), and OpenAI's JSON 404 for other paths under
    ``/v1`` (the generation and edit routes are API methods of the service)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route

    if service is None:
        from bentoml import get_current_service as service

    started = int(time.time())

    def checkpoints() -> list[dict[str, Any]]:
        runtime = getattr(service(), "runtime", None)
        return runtime.engine.manager.available() if runtime is not None else []

    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse(models_view(checkpoints(), started))

    async def one_model(request: Request) -> JSONResponse:
        wanted = request.path_params["model"]
        for row in models_view(checkpoints(), started)["data"]:
            if wanted in (row["id"], row["id"].split(":")[0]):
                return JSONResponse(row)
        return openai_error(404, f"The model '{wanted}' does not exist", code="model_not_found", param="model")

    async def not_found(request: Request) -> JSONResponse:
        return openai_error(404, f"Invalid URL ({request.method} {request.url.path})")

    return Starlette(routes=[
        Route("/models", list_models, methods=["GET"]),
        Route("/models/{model:path}", one_model, methods=["GET"]),
        Route("/{path:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
    ])
