"""A job's lifecycle beyond polling: who is told what, when, and where they read it.

``Lifecycle`` is an ASGI middleware between the gateway (which has authenticated the caller, policed the request,
checked its webhook target and negotiated the answer) and ``TaskControl``:

- ``GET /<task>/events?task_id=`` streams the task's events (``events.py``); ``GET /<task>/webhooks?task_id=`` lists
  its webhook deliveries and their attempts (``webhooks.py``). Both for the task's owner only (another key gets
  404, as for an unknown id); a task of another replica is forwarded there, as status is.
- ``Prefer: respond-async`` on ``/generate``, ``/img2img``, ``/inpaint``, ``/refine`` (the gateway decided it): the
  request goes on as ``/<task>/submit`` and its answer becomes ``202 Accepted`` with ``Location`` of the task's
  status (RFC 7240).
- A synchronous generation request with a webhook gets a job id (``X-Job-Id``); when its answer is sent the matching
  event is queued (``job.completed`` with the answer, or ``job.failed`` with the error).

Tasks are told from the journal: ``task_ended`` is the journal's listener, so the end recorded there (completed,
failed with its reason, cancelled, lost to a restart) is exactly the end announced, once.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse

from ..core.policy import may_use, owner_of
from ..errors import InvalidRequest, NotFound, ServiceError
from . import negotiation
from .events import TERMINAL, EventLog, Progress, terminal_data
from .journal import TaskJournal, TaskRecord
from .webhooks import Webhooks

logger = logging.getLogger(__name__)

STATE_KEY = "lifecycle"
"""Request state: ``{"webhook": url, "events": [...]}`` set by the gateway for a request with a webhook."""
JOB_HEADER = "x-job-id"


class Lifecycle:
    def __init__(self, app: Any, *, journal: TaskJournal, events: EventLog, webhooks: Webhooks,
                 task_prefixes: tuple[str, ...], generation_paths: tuple[str, ...], directory: Any = None,
                 signer: Any = None, heartbeat_s: float = 15.0) -> None:
        self.app = app
        self.journal = journal
        self.events = events
        self.webhooks = webhooks
        self.task_prefixes = task_prefixes
        self.generation_paths = set(generation_paths)
        """Synchronous generation routes (not task submissions) whose webhooks this middleware sends."""
        self.directory = directory
        self.signer = signer
        self.heartbeat_s = heartbeat_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"].rstrip("/") or "/", scope["method"]
        state = scope.setdefault("state", {})
        try:
            route, _, action = path.rpartition("/")
            if method == "GET" and route in self.task_prefixes and action in ("events", "webhooks"):
                return await self._read(scope, receive, send, action)
            decided = state.get(negotiation.STATE_KEY) or {}
            if method == "POST" and decided.get("async") and path in negotiation.ASYNC_ROUTES:
                return await self._respond_async(scope, receive, send, negotiation.ASYNC_ROUTES[path])
            if method == "POST" and path in self.generation_paths and state.get(STATE_KEY):
                return await self._with_webhook(scope, receive, send, state)
        except ServiceError as exc:
            return await JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())(scope, receive, send)
        await self.app(scope, receive, send)

    # -- events and deliveries, for their owner -------------------------------------------------------------
    async def _read(self, scope: dict[str, Any], receive: Any, send: Any, action: str) -> None:
        params = QueryParams(scope.get("query_string", b""))
        task_id = params.get("task_id", "")
        if not task_id:
            raise InvalidRequest("give task_id", field="task_id")
        principal = scope.get("state", {}).get("principal")
        record = self.journal.get(task_id)
        owner: str | None = record.owner if record is not None else None
        known = record is not None
        if not known and action == "webhooks":  # a synchronous request's webhook has no task record
            known, owner = self.webhooks.store.owner_of(task_id)
        if not known and self.directory is not None:
            elsewhere = self.directory.owner(task_id)
            if elsewhere is not None:
                return await self._forward(elsewhere, scope, receive, send, principal, stream=action == "events")
        if not known or principal is None or not may_use(principal, owner):
            raise NotFound(f"no task {task_id}")
        if action == "webhooks":
            body = {"task_id": task_id, "deliveries": self.webhooks.store.history(task_id)}
            return await JSONResponse(body, headers={"Cache-Control": "no-store"})(scope, receive, send)
        last = _last_event_id(scope, params)
        from sse_starlette.sse import EventSourceResponse, ServerSentEvent

        async def stream():
            async for event in self.events.stream(task_id, last, self.journal):
                yield ServerSentEvent(data=event.data, event=event.event, id=str(event.seq))

        response = EventSourceResponse(stream(), ping=self.heartbeat_s, headers={
            "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        await response(scope, receive, send)

    async def _forward(self, owner_url: str, scope, receive, send, principal: Any, *, stream: bool) -> None:
        headers = {}
        if self.signer is not None and principal is not None:
            headers = self.signer.forward_headers("" if principal.anonymous else principal.name, scope["method"],
                                                  scope["path"].rstrip("/") or "/",
                                                  scope.get("query_string", b"").decode("latin-1"))
        await self.directory.forward(owner_url, scope, receive, send, headers=headers, stream=stream)

    # -- Prefer: respond-async -----------------------------------------------------------------------------
    async def _respond_async(self, scope: dict[str, Any], receive: Any, send: Any, task: str) -> None:
        """Run the request as ``<task>/submit``; its ``200 {"task_id"}`` becomes ``202`` with ``Location``."""
        submit = f"{task}/submit"
        inner = {**scope, "path": submit, "raw_path": submit.encode()}
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            status = start.get("status", 500)
            try:
                answer = json.loads(body) if status == 200 else None
            except ValueError:
                answer = None
            if isinstance(answer, dict) and "task_id" in answer:
                task_id = str(answer["task_id"])
                query = urlencode({"task_id": task_id})
                answer = {**answer, "status": "in_progress", "status_url": f"{task}/status?{query}",
                          "result_url": f"{task}/get?{query}", "events_url": f"{task}/events?{query}",
                          "cancel_url": f"{task}/cancel?{query}"}
                body = json.dumps(answer).encode()
                status = 202
                headers += [(b"location", f"{task}/status?{query}".encode()),
                            (b"preference-applied", b"respond-async"), (b"content-type", b"application/json")]
                headers = _dedupe_content_type(headers)
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(inner, receive, capture)

    # -- synchronous requests with a webhook ----------------------------------------------------------------
    async def _with_webhook(self, scope: dict[str, Any], receive: Any, send: Any, state: dict[str, Any]) -> None:
        wanted = state[STATE_KEY]
        principal = state.get("principal")
        job_id = uuid.uuid4().hex
        self.webhooks.subscribe(job_id, owner_of(principal) if principal is not None else None, wanted["webhook"],
                                wanted.get("events"))
        if self.directory is not None:
            self.directory.announce(job_id)
        state.setdefault("audit", {})["task_id"] = job_id
        start: dict[str, Any] = {}
        chunks: list[bytes] = []
        json_answer = False

        async def tell(message: dict[str, Any]) -> None:
            nonlocal json_answer
            if message["type"] == "http.response.start":
                start.update(message)
                content_type = dict((k.lower(), v) for k, v in message.get("headers", [])).get(b"content-type", b"")
                json_answer = content_type.startswith(b"application/json")
                message = {**message, "headers": [*message.get("headers", []), (JOB_HEADER.encode(), job_id.encode())]}
            elif message["type"] == "http.response.body" and json_answer:
                chunks.append(message.get("body", b""))
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._sync_ended(job_id, start, b"".join(chunks) if json_answer else None)

        await self.app(scope, receive, tell)

    def _sync_ended(self, job_id: str, start: dict[str, Any], body: bytes | None) -> None:
        status = start.get("status", 500)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start.get("headers", [])}
        answer: Any = None
        if body:
            try:
                answer = json.loads(body)
            except ValueError:
                answer = None
        if isinstance(answer, list) and answer:  # BentoML's list-wrapped errors
            answer = answer[0]
        if 200 <= status < 300:
            result = answer if answer is not None else {  # /txt2img: the image is the body; its facts are headers
                "images": [{"id": headers.get("x-image-id"), "url": headers.get("x-image-url"),
                            "seed": int(headers["seed"]) if headers.get("seed", "").isdigit() else None,
                            "finish_reason": headers.get("finish-reason")}],
                "model": headers.get("x-model"), "media_type": headers.get("content-type")}
            data = {"result": result}
            outcome = "completed"
        else:
            error = answer.get("error") if isinstance(answer, dict) else None
            reason = error.get("type") if isinstance(error, dict) else "error"
            outcome = "canceled" if reason == "cancelled" else "failed"
            data = {"reason": reason, "error": error if isinstance(error, dict) else {"type": "error",
                                                                                      "message": str(error)},
                    "http_status": status}
        try:
            self.webhooks.ended(job_id, outcome, data)
        except Exception:
            logger.exception("webhook of job %s not queued", job_id)


# -- the task side: subscriptions at submission, announcements at the journal's record of the end ----------------
def task_accepted(webhooks: Webhooks, keys: Any = None):
    """``TaskControl``'s hook when a task id is issued: its webhook (from the request, or the key's default, as
    the gateway put it in the state) is recorded before the task can end. A retried task keeps its original's."""

    def accepted(task_id: str, state: dict[str, Any], retry_of: str | None = None) -> None:
        wanted = state.get(STATE_KEY)
        principal = state.get("principal")
        owner = owner_of(principal) if principal is not None else None
        if wanted:
            webhooks.subscribe(task_id, owner, wanted["webhook"], wanted.get("events"))
        elif retry_of:
            original = webhooks.store.subscription(retry_of)
            if original is not None:
                webhooks.subscribe(task_id, owner, original.url, original.events)

    return accepted


def task_ended(events: EventLog, webhooks: Webhooks, progress: Progress | None = None):
    """The journal's listener: the terminal event and the webhook of a task, from the record of its end."""

    def ended(record: TaskRecord) -> None:
        if record.status not in TERMINAL:
            return
        name, data = terminal_data(record)
        try:
            events.publish(record.task_id, name, data)
        except Exception:
            logger.exception("terminal event of task %s", record.task_id)
        try:
            webhooks.ended(record.task_id, record.status, {k: v for k, v in data.items() if k not in ("task_id",
                                                                                                     "status")})
        except Exception:
            logger.exception("webhook of task %s not queued", record.task_id)

    return ended


def webhook_wanted(req: Any, principal: Any) -> dict[str, Any] | None:
    """The webhook a request asks for: its own ``webhook``, else its key's default (with their events)."""
    url = getattr(req, "webhook", None)
    events = getattr(req, "webhook_events", None)
    if url is None and principal is not None and getattr(principal, "webhook", None):
        url = principal.webhook
        events = events or (list(principal.webhook_events) if principal.webhook_events else None)
    if url is None:
        return None
    return {"webhook": url, "events": [getattr(e, "value", e) for e in events] if events else None,
            "own": getattr(req, "webhook", None) is not None}


def _last_event_id(scope: dict[str, Any], params: QueryParams) -> int:
    raw = None
    for name, value in scope.get("headers", []):
        if name.lower() == b"last-event-id":
            raw = value.decode("latin-1").strip()
    raw = raw if raw else params.get("last_event_id")
    if not raw:
        return 0
    if not raw.isdigit():
        raise InvalidRequest("Last-Event-ID must be the id of an event of this stream (a number)",
                             field="last-event-id")
    return int(raw)


def _dedupe_content_type(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    out, seen = [], False
    for k, v in reversed(headers):
        if k.lower() == b"content-type":
            if seen:
                continue
            seen = True
        out.append((k, v))
    return list(reversed(out))
