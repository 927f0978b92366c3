"""Domain errors, and the one place they become HTTP answers.

Every error the service returns has one JSON shape: ``{"error": {"type", "message", ...}}``, with
``Retry-After`` where trying again later can help.
"""

from __future__ import annotations

import math
from typing import Any


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
