"""The OpenAI Images API, ``POST /v1/images/generations``, mapped onto ``GenerateRequest``.

Any OpenAI client works against ``base_url=<server>/v1`` with the service's API key as its key:
``OpenAI(base_url="http://host:3000/v1", api_key=KEY).images.generate(prompt=..., size="1024x1024")``.

Mapping: ``size`` "WxH" -> width, height (any size ``GenerateRequest`` accepts; "auto" -> 1024x1024);
``n`` -> num_images; ``quality`` -> steps (``QUALITY_STEPS``); ``output_format`` and
``output_compression`` -> output_format, quality; ``model``, ``style``, ``user`` are accepted and
not used for generation (``model`` is any string; ``user`` is recorded in the audit line).
Extensions, not OpenAI's (send them with the client's ``extra_body``): ``negative_prompt``,
``seed``, ``steps`` (wins over ``quality``), ``guidance_scale``. Other unknown fields, such as the
newer ``background`` or ``moderation``, are ignored. Limits are those of ``GenerateRequest``;
every error has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Mounting (service.py): an API method with ``input_spec=OpenAIImageWire`` and
``route="/v1/images/generations"``, decorated with ``@answers_openai_errors``; it validates
``OpenAIImageRequest.model_validate(given(fields))``, maps with ``to_generate_request``, runs
``Generation.run`` and answers ``to_openai_response(...)``. The route belongs in the gateway's
generation routes (API key, tier limits, rate limits, audit), which parse the body the same way.
"""

from __future__ import annotations

import base64
import re
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

from pydantic import ConfigDict, Field, ValidationError, field_validator
from starlette.responses import JSONResponse

from ..errors import InvalidRequest, ServiceError, answers_in
from ..schemas import GenerateRequest
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
    style: Optional[str] = Field(None, description="Accepted and ignored.")
    user: Optional[str] = Field(None, max_length=256, description="Your end user's id; recorded in the audit log.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image file format.")
    output_compression: Optional[int] = Field(None, ge=0, le=100, description="JPEG/WebP quality, 0..100.")
    stream: Optional[bool] = Field(None, description="Streaming is not supported: false or absent.")
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


def parse_body(body: Any, model: type[GenerateRequest] = GenerateRequest) -> list[GenerateRequest]:
    """A raw body as the native request it runs (the gateway's parser for this route)."""
    return [to_generate_request(OpenAIImageRequest.model_validate(body), model)]


def to_generate_request(req: OpenAIImageRequest, model: type[GenerateRequest] = GenerateRequest) -> GenerateRequest:
    """The native request; its limits apply. A value it refuses is an ``InvalidRequest`` naming the
    OpenAI parameter (``field``) that carried it."""
    width, height = req.dimensions
    fields: dict[str, Any] = {
        "prompt": req.prompt, "negative_prompt": req.negative_prompt, "width": width, "height": height,
        "num_images": req.n, "steps": req.steps if req.steps is not None else QUALITY_STEPS[req.quality],
        "seed": req.seed, "output_format": req.output_format,
    }
    if req.guidance_scale is not None:
        fields["guidance_scale"] = req.guidance_scale
    if req.output_compression is not None:
        fields["quality"] = max(1, req.output_compression)
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
                       response_format: str, url_for: Callable[[str], str]) -> dict[str, Any]:
    """``{"created", "data": [{"b64_json" | "url", "revised_prompt"}]}``; ``url_for(image_id)`` gives
    each image's link (absolute, as OpenAI's are: see ``absolute_url``). Images the safety check withheld
    are left out (OpenAI's answer has no per-image flag); all withheld: ``ContentFiltered`` (400,
    code ``content_policy_violation``)."""
    kept = kept_images(images)
    key = "b64_json" if response_format == "b64_json" else "url"
    data = [{key: base64.b64encode(image.data).decode("ascii") if key == "b64_json" else url_for(image.id),
             "revised_prompt": revised_prompt} for image in kept]
    return {"created": created, "data": data}


def absolute_url(base_url: str, url: str) -> str:
    """An image link that clients can fetch: ``url`` as is when absolute (``SDXL_BENTO_PUBLIC_URL`` is
    set), else joined to the address the request came to."""
    return url if re.match(r"^https?://", url) else base_url.rstrip("/") + "/" + url.lstrip("/")


def record(audit: dict[str, Any], req: OpenAIImageRequest) -> None:
    """Note the OpenAI-only fields in the audit line's parameters (call after ``Generation.run``,
    which sets the parameters)."""
    audit.setdefault("parameters", {}).update(
        api="openai", user=req.user, requested_model=req.model, size=req.size, quality=req.quality)


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

