"""The gateway: what every generation request passes before it reaches an API method.

An ASGI middleware, so that task submissions are checked before BentoML hands out a task id:
body size (413) and type (415) -> API key (401) -> the tier's limits (403) -> the key's
concurrent jobs and token buckets (429 with ``Retry-After`` and ``X-RateLimit-*``). It puts the
caller (``principal``) and its deadline into the request state for the API methods, and writes
exactly one audit line per request when the request is over (for a task: when the task ends),
merged with what the API method recorded in ``state["audit"]``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from . import a1111, openai_compat
from .audit import AuditLog
from .auth import OPEN_PRINCIPAL, KeyStore, Principal, Unauthorized, check_request, extract_key
from .errors import InvalidRequest, PayloadTooLarge, ServiceError, ShuttingDown, TooManyRequests, UnsupportedMediaType
from .ratelimit import Limit, RateLimiter

logger = logging.getLogger(__name__)

ANONYMOUS = OPEN_PRINCIPAL
DEADLINE_HEADER = "x-request-deadline"
"""Seconds the client is willing to wait; only a deadline shorter than the tier's default is honoured."""


@dataclass(frozen=True)
class Demand:
    """What a request asks of the GPU, read from its JSON body before validation."""

    width: int = 1024
    height: int = 1024
    steps: int = 30
    images: int = 1
    refine: bool = False


FOREIGN_BODIES = {"/v1/images/generations": openai_compat.demand_fields, "/sdapi/v1/txt2img": a1111.demand_fields}
"""Routes of other APIs: their bodies are read as our fields, so limits count their real images and steps."""
FOREIGN_ERRORS = {"/v1/images/generations": openai_compat.from_service_error, "/sdapi/v1/": a1111.from_error}
"""The gateway's own refusals on those routes come in that API's error shape."""


def demand(route: str, body: Any) -> Demand:
    if route in FOREIGN_BODIES and isinstance(body, dict):
        body = FOREIGN_BODIES[route](body)
    items = body.get("requests") if route == "/generate_batch" and isinstance(body, dict) else [body]
    items = [i for i in (items if isinstance(items, list) else []) if isinstance(i, dict)]
    if not items:
        return Demand()

    def num(item: dict, name: str, default: int) -> int:
        value = item.get(name, default)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    return Demand(
        width=max(num(i, "width", 1024) for i in items), height=max(num(i, "height", 1024) for i in items),
        steps=max(num(i, "steps", 30) for i in items),
        images=sum(num(i, "num_images", 1) for i in items),
        refine=route == "/refine" or any(i.get("refine", "none") not in ("none", None) for i in items),
    )


class ActiveJobs:
    """Requests in progress per key; a task counts until it ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def try_acquire(self, name: str, limit: int) -> bool:
        with self._lock:
            if self._counts[name] >= limit:
                return False
            self._counts[name] += 1
            return True

    def release(self, name: str) -> None:
        with self._lock:
            self._counts[name] -= 1
            if self._counts[name] <= 0:
                del self._counts[name]

    def get(self, name: str) -> int:
        with self._lock:
            return self._counts[name]


class Gateway:
    def __init__(self, app: Any, *, keys: KeyStore | None, limiter: RateLimiter, audit: AuditLog,
                 generation_routes: tuple[str, ...], protected_routes: tuple[str, ...], max_body_bytes: int,
                 active: ActiveJobs, drain: Any = None) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.audit = audit
        self.generation_routes = generation_routes
        self.protected_routes = protected_routes
        self.max_body_bytes = max_body_bytes
        self.active = active
        self.drain = drain

    @property
    def metrics(self) -> Any:
        from .telemetry import metrics

        return metrics()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "").rstrip("/") or "/"
        if scope["type"] != "http" or not path.startswith(self.protected_routes):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        is_generation = scope["method"] == "POST" and path in self.generation_routes
        started = time.monotonic()
        principal, body, params = ANONYMOUS, b"", None
        try:
            principal = self._authenticate(headers)
            state["principal"] = principal
            if not is_generation:
                return await self.app(scope, receive, send)
            if self.drain is not None and self.drain.draining:
                raise ShuttingDown("the service is shutting down; try again shortly (or another replica)",
                                   retry_after=30)
            body = await self._read_body(headers, receive)
            params = _json_or_none(body)
            state["deadline_s"] = self._deadline(principal, headers)
            rate_headers = self._admit(principal, path, params)
        except ServiceError as exc:
            self._reject(exc, principal, path, params, headers, started)
            return await _answer(exc, scope, receive, send)

        status: dict[str, int] = {}

        replayed = False

        async def replay() -> dict[str, Any]:
            """The body, once; after it, the real channel (which reports a disconnect)."""
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = dict(rate_headers)
                if state.get("audit", {}).get("cache"):
                    extra["x-cache"] = state["audit"]["cache"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k.lower().encode(), v.encode()) for k, v in extra.items())]}
            await send(message)

        try:
            await self.app(scope, replay, send_with_headers)
        finally:
            self.active.release(principal.name)
            self._record(principal, path, params, headers, started, status.get("code"), state.get("audit", {}))

    # -- the checks, in order ---------------------------------------------------------------------
    def _authenticate(self, headers: dict[str, str]) -> Principal:
        if self.keys is None:
            return ANONYMOUS
        principal = self.keys.authenticate(extract_key(headers))
        if principal is None:
            raise Unauthorized("a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)")
        return principal

    async def _read_body(self, headers: dict[str, str], receive: Any) -> bytes:
        media_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if media_type not in ("application/json", ""):
            raise UnsupportedMediaType(f"send the request as application/json, not {media_type}")
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {self.max_body_bytes}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(f"the request body is over the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    @staticmethod
    def _deadline(principal: Principal, headers: dict[str, str]) -> float:
        deadline = principal.tier.default_deadline_s
        asked = headers.get(DEADLINE_HEADER)
        if asked is not None:
            try:
                value = float(asked)
            except ValueError:
                raise InvalidRequest(f"{DEADLINE_HEADER} must be a number of seconds, not {asked!r}") from None
            if not 0 < value <= 86_400:
                raise InvalidRequest(f"{DEADLINE_HEADER} must be between 0 and 86400 seconds")
            deadline = min(deadline, value)
        return deadline

    def _admit(self, principal: Principal, path: str, params: Any) -> dict[str, str]:
        tier = principal.tier
        need = demand(path, params)
        if self.keys is not None and isinstance(params, dict):  # open: the schema's limits alone
            check_request(tier, width=need.width, height=need.height, steps=need.steps, num_images=need.images,
                          refine=need.refine)
        if not self.active.try_acquire(principal.name, tier.max_concurrent_jobs):
            raise TooManyRequests(
                f"key {principal.name!r} already has {tier.max_concurrent_jobs} requests in progress, the limit "
                f"of the {tier.name} tier", retry_after=5)
        if self.keys is None:
            return {}
        try:
            decision = self.limiter.take([
                (f"{principal.name}:requests", Limit(tier.requests_per_minute, tier.burst_requests), 1),
                (f"{principal.name}:images", Limit(tier.images_per_minute, tier.burst_images),
                 min(need.images, tier.burst_images)),
            ])
            self.metrics.ratelimit_degraded.set(1 if self.limiter.degraded else 0)
            if not decision.allowed:
                raise TooManyRequests(f"rate limit of the {tier.name} tier reached for key {principal.name!r}",
                                      retry_after=decision.retry_after_s, headers=decision.headers())
        except BaseException:
            self.active.release(principal.name)
            raise
        headers = decision.headers()
        return headers

    # -- audit -------------------------------------------------------------------------------------
    def _reject(self, exc: ServiceError, principal: Principal, path: str, params: Any, headers: dict[str, str],
                started: float) -> None:
        self.metrics.rejected.labels(reason=exc.type).inc()
        self._record(principal, path, params, headers, started, exc.status,
                     {"outcome": "rejected", "reason": exc.type})

    def _record(self, principal: Principal, path: str, params: Any, headers: dict[str, str], started: float,
                status: int | None, audit: dict[str, Any]) -> None:
        params = params if isinstance(params, dict) else {}
        outcome = audit.get("outcome") or ("ok" if status and status < 400 else "error")
        fields = {
            "key_name": principal.name, "tier": principal.tier.name, "endpoint": path,
            "prompt": params.get("prompt"), "negative_prompt": params.get("negative_prompt"),
            "parameters": audit.get("parameters") or {k: v for k, v in params.items()
                                                      if k not in ("prompt", "negative_prompt")},
            "model": audit.get("model"), "outcome": outcome, "reason": audit.get("reason"),
            "status": audit.get("status", status), "cache": audit.get("cache"), "queue_s": audit.get("queue_s"),
            "gpu_s": audit.get("gpu_s"), "image_ids": audit.get("image_ids", []), "seeds": audit.get("seeds"),
            "finish_reasons": audit.get("finish_reasons"),
            "task_id": audit.get("task_id"), "request_id": headers.get("x-request-id"),
            "duration_s": round(time.monotonic() - started, 4),
        }
        self.audit.record(**fields)
        self.metrics.requests.labels(endpoint=path, outcome=outcome).inc()


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


async def _answer(exc: ServiceError, scope: Any, receive: Any, send: Any) -> None:
    from .errors import to_response

    path = scope.get("path", "")
    shape = next((f for prefix, f in FOREIGN_ERRORS.items() if path.startswith(prefix)), to_response)
    await shape(exc)(scope, receive, send)
