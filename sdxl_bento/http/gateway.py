"""The gateway: what every request to a guarded route passes before it reaches BentoML.

An ASGI middleware (the outermost), so that task submissions are checked before BentoML hands out a task
id. In order: repeated query parameters or credential/content headers (400, since the framework and this
code could read different copies) -> API key, or a replica's signed forward (401) -> credentials removed
from the request, so that no task record or log holds them -> for generation routes: body size (413) and
type (415) -> the body turned into typed native requests by the route's parser (400, in the route's API
shape; a route that takes an image file reads it here, once, within its own limit: ``upload.py``) ->
``policy.police`` of each typed request (403) -> the key's concurrent jobs and token buckets (429
with ``Retry-After``). The caller (``principal``), its deadline and the admission go into the request
state. Exactly one audit line is written per generation request (for a task: when the task ends, merged with
what the API method recorded in ``state["audit"]``) and per request that changes something (a cancel, an
interrupt, an option set); reads (status, results, images, lists) are audited only when refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, Callable
from urllib.parse import parse_qsl

from pydantic import ValidationError

from ..core.policy import OPEN_PRINCIPAL, Admission, Principal, police
from ..errors import (
    InvalidRequest,
    ServiceError,
    ShuttingDown,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
    invalid,
)
from ..schemas import LIFECYCLE_FIELDS
from .audit import AuditLog
from .auth import extract_key
from .ratelimit import Limit, RateLimiter
from .routes import Route, RouteTable, read_form
from .signing import INTERNAL_HEADERS, Signer
from .upload import STATE_KEY as UPLOAD_STATE
from .upload import read_body, read_upload

logger = logging.getLogger(__name__)

DEADLINE_HEADER = "x-request-deadline"
"""Seconds the client is willing to wait; only a deadline shorter than the tier's default is honoured."""
CREDENTIALS = ("authorization", "x-api-key")
SINGLE_HEADERS = (*CREDENTIALS, *INTERNAL_HEADERS, "content-type", "content-length", DEADLINE_HEADER,
                  "idempotency-key", "prefer", "accept", "last-event-id")
"""Headers that change what is done: sent twice, the framework and the gateway could read different ones."""
AUDITED_HEADERS = ("x-request-id",)


class Gateway:
    def __init__(self, app: Any, *, keys: Any, limiter: RateLimiter, slots: Any, audit: AuditLog,
                 routes: RouteTable, signer: Signer, max_body_bytes: int, drain: Any = None,
                 task_cost: Callable[[str], int | None] | None = None, idempotency: Any = None,
                 targets: Any = None, wait_s: float = 600.0) -> None:
        self.app = app
        self.idempotency = idempotency
        """``idempotency.Idempotency``: a retried POST with an ``Idempotency-Key`` gets the first one's answer."""
        self.targets = targets
        """``webhooks.Targets``: a request's own webhook URL is checked (names resolved) before it is admitted."""
        self.wait_s = wait_s
        """How long a retry waits for the request holding its ``Idempotency-Key`` to answer."""
        self.keys = keys
        """``auth.KeyFile`` (reloaded on change), or None: the service runs open."""
        self.limiter = limiter
        self.slots = slots
        """``ratelimit.JobSlots``: requests in progress per key (a task counts until it ends)."""
        self.audit = audit
        self.routes = routes
        self.signer = signer
        self.max_body_bytes = max_body_bytes
        self.drain = drain
        self.task_cost = task_cost or (lambda task_id: None)
        """Images a retried task makes (from the journal), charged to the image bucket."""

    @property
    def metrics(self) -> Any:
        from ..telemetry import metrics

        return metrics()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "").rstrip("/") or "/"
        if scope["type"] != "http" or not self.routes.is_protected(path):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        template = self.routes.template(path)
        route = self.routes.generation.get(path) if scope["method"] == "POST" else None
        retry = scope["method"] == "POST" and path.endswith("/retry") and path in {
            f"{p}/retry" for p in self.routes.task_prefixes}
        started = time.monotonic()
        principal: Principal | None = None
        requests: list[Any] = []
        headers: dict[str, str] = {}
        try:
            headers = _single_headers(scope)
            query = _single_query(scope)
            principal = self._authenticate(headers, scope, path)
            _strip_credentials(scope)
            state["principal"] = principal
            if route is None and not retry:
                if scope["method"] in ("GET", "HEAD"):
                    return await self.app(scope, receive, send)  # reads are audited only when refused
                return await self._audited(scope, receive, send, principal, template, headers, started)
            assert principal is not None
            if self.drain is not None and self.drain.draining:
                raise ShuttingDown("the service is shutting down; try again shortly (or another replica)",
                                   retry_after=30)
            deadline = self._deadline(headers)
            raw = b""
            if route is not None and route.upload is not None:  # an image file: read once, handed over as is
                state[UPLOAD_STATE] = route.parse(await read_upload(
                    headers, receive, max_bytes=route.upload, max_json_bytes=self.max_body_bytes))[0]
                body = b"{}"
                admission = Admission(images=0, priority=principal.tier.priority,
                                      deadline_s=min(deadline or math.inf, principal.tier.default_deadline_s))
            elif route is not None:
                body = await self._read_body(headers, receive, form=route.form)
                if route.form and _media_type(headers) == "multipart/form-data":
                    body = json.dumps(await read_form(body, headers["content-type"])).encode()
                    _set_header(scope, "content-type", "application/json")
                    _set_header(scope, "content-length", str(len(body)))
                raw = body  # what an Idempotency-Key's fingerprint covers (a form: its fields, not its boundary)
                requests, admission = self._police(route, principal, body, deadline)
                await self._lifecycle(route, path, principal, headers, requests, state)
                if route.batch:
                    body = self._stamp(body, principal, admission.deadline_s)
            else:  # a retry runs the task's stored request again: it costs what the task cost
                body = b""
                images = self.task_cost(query.get("task_id", "")) or 1
                admission = Admission(images=images, priority=principal.tier.priority,
                                      deadline_s=deadline or principal.tier.default_deadline_s)
            state["deadline_s"] = admission.deadline_s
            state["admission"] = admission
            idem = self._idempotency_key(headers, principal, scope, path, raw) \
                if route is None or route.upload is None else None  # /verify generates nothing
            claim = await asyncio.to_thread(self.idempotency.begin, *idem) if idem else None
            if claim is not None and claim.state != "new":
                lease, rate_headers = None, {}
            else:
                lease, rate_headers = self._admit(principal, admission)
        except (ServiceError, ValidationError) as exc:
            error = exc if isinstance(exc, ServiceError) else invalid(exc)
            self._reject(error, principal, template, requests, headers, started)
            return await self.routes.shape(path)(exc)(scope, receive, send)

        if claim is not None and claim.state != "new":  # the answer of the request that holds this key
            claim = await self.idempotency.wait(*idem, timeout_s=self.wait_s)
            if claim.state == "new":  # that request gave the key up (its answer said "try again"): run this one
                try:
                    lease, rate_headers = self._admit(principal, admission)
                except ServiceError as exc:
                    self.idempotency.abandon(*idem)
                    self._reject(exc, principal, template, requests, headers, started)
                    return await self.routes.shape(path)(exc)(scope, receive, send)
            else:
                return await self._replay(claim, idem, principal, template, requests, headers, started, scope,
                                          receive, send)

        status: dict[str, int] = {}
        replayed = False
        kept: dict[str, Any] = {"headers": [], "body": []}

        async def replay() -> dict[str, Any]:
            """The (possibly stamped) body, once; after it, the real channel (which reports a disconnect)."""
            nonlocal replayed
            if replayed or route is None:
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
                if idem:
                    kept["headers"] = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
            elif idem and message["type"] == "http.response.body":
                kept["body"].append(message.get("body", b""))
                if not message.get("more_body", False):
                    kept["done"] = True
            await send(message)

        if route is not None and route.batch:
            _set_header(scope, "content-length", str(len(body)))
        if route is not None and route.upload is not None:  # BentoML reads an empty JSON body
            _set_header(scope, "content-type", "application/json")
            _set_header(scope, "content-length", str(len(body)))
        try:
            await self.app(scope, replay, send_with_headers)
        finally:
            self.slots.release(lease)
            if idem:
                if kept.get("done") and status.get("code"):
                    self.idempotency.finish(*idem, status["code"], kept["headers"], b"".join(kept["body"]))
                else:
                    self.idempotency.abandon(*idem)
            self._record(principal, template, requests, headers, started, status.get("code"), state.get("audit", {}))

    async def _audited(self, scope: dict[str, Any], receive: Any, send: Any, principal: Principal | None,
                       template: str, headers: dict[str, str], started: float) -> None:
        """A request that changes something without generating (a cancel, an interrupt, an option set)."""
        status: dict[str, int] = {}

        async def noting(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting)
        finally:
            self._record(principal, template, [], headers, started, status.get("code"),
                         scope.get("state", {}).get("audit", {}))

    # -- the lifecycle: webhooks, negotiation, idempotency --------------------------------------------
    async def _lifecycle(self, route: Route, path: str, principal: Principal, headers: dict[str, str],
                         requests: list[Any], state: dict[str, Any]) -> None:
        """The answer's media type (native routes; 406 when none is acceptable) and the request's webhook: its own
        (native routes; the URL checked now, names resolved: 400 when it points at a refused address), else its
        key's default, on every generation route (the OpenAI and AUTOMATIC1111 ones too)."""
        from .lifecycle import STATE_KEY, webhook_wanted
        from .negotiation import STATE_KEY as NEGOTIATED
        from .negotiation import negotiate

        if route.negotiates:
            state[NEGOTIATED] = negotiate(path, headers, requests)
        if not requests:
            return
        if route.batch:
            if any(getattr(req, "webhook", None) or getattr(req, "webhook_events", None) for req in requests):
                raise InvalidRequest("webhook: not taken by /generate_batch items; submit a task (/jobs/submit) with "
                                     "a webhook instead", field="webhook")
            return
        wanted = webhook_wanted(requests[0], principal)
        if wanted is None:
            if getattr(requests[0], "webhook_events", None):
                raise InvalidRequest("webhook_events: give a webhook too (or set one for the key)",
                                     field="webhook_events")
            return
        if wanted["own"] and self.targets is not None:
            await asyncio.to_thread(self.targets.check, wanted["webhook"])
        state[STATE_KEY] = wanted

    def _idempotency_key(self, headers: dict[str, str], principal: Principal, scope: dict[str, Any], path: str,
                         body: bytes) -> tuple[str, str, str] | None:
        """(the caller, the key, the request's fingerprint) when the request carries an ``Idempotency-Key``."""
        from .idempotency import HEADER, fingerprint, parse_key

        raw = headers.get(HEADER)
        if raw is None or self.idempotency is None:
            return None
        query = scope.get("query_string", b"").decode("latin-1")
        target = f"{path}?{query}" if query else path
        caller = "" if principal.anonymous else principal.name
        return caller, parse_key(raw), fingerprint(scope["method"], target, headers, body)

    async def _replay(self, claim: Any, idem: tuple[str, str, str], principal: Principal, template: str,
                      requests: list[Any], headers: dict[str, str], started: float, scope: dict[str, Any],
                      receive: Any, send: Any) -> None:
        from starlette.responses import Response

        from ..errors import Conflict
        from .idempotency import REPLAYED

        if claim.state != "done" or claim.stored is None:
            exc = Conflict("a request with this Idempotency-Key is still running; retry later", retry_after=5)
            self._reject(exc, principal, template, requests, headers, started)
            return await self.routes.shape(scope["path"].rstrip("/"))(exc)(scope, receive, send)
        stored = claim.stored
        response = Response(stored.body, status_code=stored.status)
        response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in stored.headers
                                if k.lower() != "content-length"]
        response.raw_headers += [(b"content-length", str(len(stored.body)).encode()), (REPLAYED.encode(), b"true")]
        self.metrics.idempotent_replays.inc()
        self._record(principal, template, requests, headers, started, stored.status,
                     {"outcome": "replayed", "reason": "idempotency_key"})
        await response(scope, receive, send)

    # -- the checks, in order ---------------------------------------------------------------------
    def _authenticate(self, headers: dict[str, str], scope: dict[str, Any], path: str) -> Principal | None:
        """The caller: a key, a replica's signed forward (task routes only), or nobody (open service; or a
        guarded read that a signed link can also open, where the route decides)."""
        if any(name in headers for name in INTERNAL_HEADERS):
            caller = self._forwarded(headers, scope, path)
            if caller is not None:
                return caller
            raise Unauthorized("the forwarded request's signature is invalid or expired")
        if self.keys is None:
            return OPEN_PRINCIPAL
        raw = extract_key(headers)
        if raw is None and any(path == p or path.startswith(p + "/") for p in self.routes.open_reads):
            return None
        principal = self.keys.authenticate(raw)
        if principal is None:
            raise Unauthorized("a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)")
        return principal

    def _forwarded(self, headers: dict[str, str], scope: dict[str, Any], path: str) -> Principal | None:
        if not any(path.startswith(p + "/") for p in self.routes.task_prefixes):
            return None
        query = scope.get("query_string", b"").decode("latin-1")
        name = self.signer.forwarded_caller(headers, scope["method"], path, query)
        if name is None:
            return None
        if self.keys is None:
            return OPEN_PRINCIPAL
        return self.keys.by_name(name)

    async def _read_body(self, headers: dict[str, str], receive: Any, form: bool = False) -> bytes:
        media_type = _media_type(headers)
        if form and media_type == "multipart/form-data":
            pass
        elif media_type not in ("application/json", ""):
            also = " or multipart/form-data" if form else ""
            raise UnsupportedMediaType(f"send the request as application/json{also}, not {media_type}")
        return await read_body(headers, receive, self.max_body_bytes)

    @staticmethod
    def _deadline(headers: dict[str, str]) -> float | None:
        asked = headers.get(DEADLINE_HEADER)
        if asked is None:
            return None
        try:
            value = float(asked)
        except ValueError:
            raise InvalidRequest(f"{DEADLINE_HEADER} must be a number of seconds, not {asked!r}") from None
        if not 0 < value <= 86_400:
            raise InvalidRequest(f"{DEADLINE_HEADER} must be between 0 and 86400 seconds")
        return value

    @staticmethod
    def _police(route: Route, principal: Principal, body: bytes,
                deadline: float | None) -> tuple[list[Any], Admission]:
        """The body as the typed requests it runs, each within the caller's tier; what they cost together."""
        try:
            params = json.loads(body) if body else None
        except ValueError:
            raise InvalidRequest("the request body is not valid JSON") from None
        requests = route.parse_for(params, principal) if route.parse_for is not None else route.parse(params)
        if not requests:
            raise InvalidRequest("requests: give at least one request", field="requests")
        admissions = []
        for i, req in enumerate(requests):
            try:
                admissions.append(police(principal, req, deadline_s=deadline))
            except ServiceError as exc:
                if route.batch:
                    exc.message = f"requests[{i}]: {exc.message}"
                raise
        first = admissions[0]
        return requests, Admission(images=sum(a.images for a in admissions), priority=first.priority,
                                   deadline_s=first.deadline_s)

    @staticmethod
    def _stamp(body: bytes, principal: Principal, deadline_s: float) -> bytes:
        """Each batch item gets its caller; BentoML merges items of several callers into one call."""
        params = json.loads(body)
        stamp = {"name": None if principal.anonymous else principal.name, "deadline_s": deadline_s}
        params["requests"] = [{**item, "caller": stamp} for item in params["requests"]]
        return json.dumps(params).encode()

    def _admit(self, principal: Principal, admission: Admission) -> tuple[Any, dict[str, str]]:
        tier = principal.tier
        lease = self.slots.acquire(principal.name, tier.max_concurrent_jobs)
        if lease is None:
            raise TooManyRequests(
                f"key {principal.name!r} already has {tier.max_concurrent_jobs} requests in progress, the limit "
                f"of the {tier.name} tier", retry_after=5)
        if self.keys is None:
            return lease, {}
        try:
            decision = self.limiter.take([
                (f"{principal.name}:requests", Limit(tier.requests_per_minute, tier.burst_requests), 1),
                (f"{principal.name}:images", Limit(tier.images_per_minute, tier.burst_images),
                 min(admission.images, tier.burst_images)),
            ])
            self.metrics.ratelimit_degraded.set(1 if self.limiter.degraded else 0)
            if not decision.allowed:
                raise TooManyRequests(f"rate limit of the {tier.name} tier reached for key {principal.name!r}",
                                      retry_after=decision.retry_after_s, headers=decision.headers())
        except BaseException:
            self.slots.release(lease)
            raise
        return lease, decision.headers()

    # -- audit -------------------------------------------------------------------------------------
    def _reject(self, exc: ServiceError, principal: Principal | None, template: str, requests: list[Any],
                headers: dict[str, str], started: float) -> None:
        self.metrics.rejected.labels(reason=exc.type).inc()
        self._record(principal, template, requests, headers, started, exc.status,
                     {"outcome": "rejected", "reason": exc.type, "message": exc.message})

    def _record(self, principal: Principal | None, template: str, requests: list[Any], headers: dict[str, str],
                started: float, status: int | None, audit: dict[str, Any]) -> None:
        outcome = audit.get("outcome") or ("ok" if status and status < 400 else "error")
        fields: dict[str, Any] = {
            "key_name": principal.name if principal else None, "tier": principal.tier.name if principal else None,
            "endpoint": template, "model": audit.get("model"), "outcome": outcome, "reason": audit.get("reason"),
            "message": audit.get("message"), "status": audit.get("status", status), "cache": audit.get("cache"),
            "queue_s": audit.get("queue_s"), "gpu_s": audit.get("gpu_s"), "image_ids": audit.get("image_ids", []),
            "seeds": audit.get("seeds"), "finish_reasons": audit.get("finish_reasons"),
            "task_id": audit.get("task_id"), "request_id": headers.get("x-request-id"),
            "duration_s": round(time.monotonic() - started, 4),
        }
        fields.update(prompt=None, negative_prompt=None, parameters={})  # one shape, even before the body is read
        if len(requests) == 1:
            fields.update(_described(requests[0]))
            if audit.get("parameters"):
                fields["parameters"] = audit["parameters"]
        elif requests:
            fields["items"] = [_described(req) for req in requests]
        self.audit.record(**fields)
        self.metrics.requests.labels(endpoint=template, outcome=outcome).inc()


def _described(req: Any) -> dict[str, Any]:
    """A typed request for the audit line: prompts apart, never an upload."""
    params = req.model_dump(mode="json", exclude={"prompt", "negative_prompt", "image", "mask", "caller",
                                                  *LIFECYCLE_FIELDS})
    return {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "parameters": params}


def _media_type(headers: dict[str, str]) -> str:
    return headers.get("content-type", "application/json").split(";")[0].strip().lower()


def _single_headers(scope: dict[str, Any]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").lower()
        if name in headers and name in SINGLE_HEADERS:
            raise InvalidRequest(f"the {name} header is sent more than once; send it once", field=name)
        headers.setdefault(name, raw_value.decode("latin-1"))
    return headers


def _single_query(scope: dict[str, Any]) -> dict[str, str]:
    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidRequest(f"the query parameter {repeated[0]} is given more than once; give it once",
                             field=repeated[0])
    return dict(pairs)


def _strip_credentials(scope: dict[str, Any]) -> None:
    """After authentication no one needs the key: BentoML stores task requests' headers on disk."""
    drop = {name.encode() for name in (*CREDENTIALS, *INTERNAL_HEADERS)}
    scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in drop]


def _set_header(scope: dict[str, Any], name: str, value: str) -> None:
    key = name.encode()
    scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != key] + [(key, value.encode())]
