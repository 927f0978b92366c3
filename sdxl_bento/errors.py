"""Domain errors, and the one place they become HTTP answers.

Every error the service returns has one JSON shape: ``{"error": {"type", "message", ...}}``, with
``Retry-After`` where trying again later can help.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable


class ServiceError(Exception):
    """An error with an HTTP status and a machine-readable type."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, **self.details}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class InvalidRequest(ServiceError):
    status, type = 400, "invalid_request"


class NotFound(ServiceError):
    status, type = 404, "not_found"


class Conflict(ServiceError):
    status, type = 409, "conflict"


class Gone(ServiceError):
    """It existed and is no more (a task's request after a restart)."""

    status, type = 410, "gone"


class Overloaded(ServiceError):
    """The queue is full: the request was not accepted, nothing was started."""

    status, type = 503, "overloaded"


class DeadlineExceeded(ServiceError):
    """The request could not start (or finish) before its deadline; expired work is never started."""

    status, type = 503, "deadline"


class ShuttingDown(ServiceError):
    """The service is stopping: not admitted, or not finished within the shutdown grace period."""

    status, type = 503, "shutdown"


class Cancelled(ServiceError):
    status, type = 409, "cancelled"


class Unavailable(ServiceError):
    """A capability that is not loaded (for example the refiner)."""

    status, type = 422, "unavailable"


class GenerationFailed(ServiceError):
    status, type = 500, "generation_failed"


class Unauthorized(ServiceError):
    """No API key, or one that matches no stored hash."""

    status, type = 401, "unauthorized"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": 'Bearer realm="sdxl-bento"'}


class Forbidden(ServiceError):
    """A valid key asking for more than its tier allows."""

    status, type = 403, "forbidden"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, type = 415, "unsupported_media_type"


class TooManyRequests(ServiceError):
    status, type = 429, "rate_limited"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self._extra = headers or {}

    def headers(self) -> dict[str, str]:
        return {**super().headers(), **self._extra}


class OutOfMemory(ServiceError):
    """One request does not fit in GPU memory even alone, after freeing the cache."""

    status, type = 503, "out_of_memory"


class ContentFiltered(ServiceError):
    """The prompt matches the operator's content policy; nothing was generated."""

    status, type = 400, "content_filtered"


class ModelMissing(RuntimeError):
    """A model the service needs is not in the Bento model store (raised at startup, not per request)."""


def to_response(exc: ServiceError):
    from starlette.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def invalid(exc: Any, prefix: str = "") -> InvalidRequest:
    """A pydantic ``ValidationError`` as one readable 400: ``steps: Input should be less than or equal to 100``."""
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    name = f"{prefix}{where}" if where else prefix.rstrip(".")
    message = error["msg"].removeprefix("Value error, ")
    return InvalidRequest(f"{name}: {message}" if name else message, field=name or None)


def native_error(exc: Exception) -> Any:
    """The service's own shape for a ``ServiceError`` or a pydantic ``ValidationError``."""
    from pydantic import ValidationError

    return to_response(invalid(exc) if isinstance(exc, ValidationError) else exc)  # type: ignore[arg-type]


def answers_in(shape: Callable[[Exception], Any] = native_error):
    """Decorator for a BentoML API method taking ``ctx``: a ``ServiceError`` or pydantic ``ValidationError``
    it raises is answered as ``shape(exc)`` (the service's shape, or a foreign API's). BentoML would hide the
    message of a 5xx, and it copies ``ctx.response.status_code`` onto the answer, so the status is set there."""
    from pydantic import ValidationError

    def decorate(func):
        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await func(*args, **kwargs)
            except (ValidationError, ServiceError) as exc:
                response = shape(exc)
                kwargs["ctx"].response.status_code = response.status_code
                return response

        return wrapper

    return decorate


class NotAcceptable(ServiceError):
    """The ``Accept`` header names no media type this route can answer in (RFC 9110, 406)."""

    status, type = 406, "not_acceptable"


class IdempotencyMismatch(ServiceError):
    """An ``Idempotency-Key`` reused with a different request (the IETF httpapi draft: 422)."""

    status, type = 422, "idempotency_key_reused"
