"""The task routes, answered from the journal: status, result, cancellation and progress of every task.

BentoML 1.4.39's local server keeps task state in ``$BENTOML_HOME/task_result.db``, which ``bentoml serve``
deletes and re-creates at every start, and on ``PUT /<task>/cancel`` only marks the row cancelled (answering
400) while the work runs on. So the journal (``journal.py``, in the state folder) is the one record of a task: its
owner, state, reason and, once it ended, its answer. ``TaskControl``, an ASGI middleware behind the
gateway, lets BentoML create and run tasks (``submit``, ``retry``) and answers ``status``, ``get`` and
``cancel`` itself, the same before and after a restart; BentoML's table is only its runner's. The
``TaskRegistry`` links task ids to the scheduler jobs running them, in the worker that runs them, for
real cancellation and progress.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse

from ..core.policy import may_use, owner_of
from ..errors import Conflict, Gone, NotFound, ServiceError
from ..gpu.scheduler import Job, JobState, Scheduler
from .journal import TaskJournal, TaskRecord
from .replicas import TaskDirectory
from .signing import Signer

logger = logging.getLogger(__name__)

LOST = ("restart", "shutdown")
"""Reasons of tasks that were running when the service stopped."""


class TaskCancelled(BaseException):
    """Raised by a cancelled task's handler. It passes BentoML's task runner (which catches only
    ``Exception``), so BentoML writes no result; the journal records the cancellation."""


@dataclass
class _Entry:
    jobs: list[Job] = field(default_factory=list)
    cancelled: bool = False


class TaskRegistry:
    """Running tasks of this worker and their scheduler jobs; an entry goes when its task ends."""

    def __init__(self, journal: TaskJournal | None = None) -> None:
        self.journal = journal
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self.scheduler: Scheduler | None = None
        self.events: Any = None
        """``events.Progress``: a task's jobs, once attached, report their progress as events."""

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def submitted(self, task_id: str) -> None:
        with self._lock:
            self._entries.setdefault(task_id, _Entry())

    def attach(self, task_id: str, jobs: list[Job]) -> None:
        """Link the task's jobs; a task cancelled before its jobs existed is cancelled now."""
        with self._lock:
            entry = self._entries.setdefault(task_id, _Entry())
            entry.jobs.extend(jobs)
            cancelled = entry.cancelled
        if cancelled and self.scheduler is not None:
            for job in jobs:
                self.scheduler.cancel(job)
        elif self.events is not None:
            self.events.watch(task_id, jobs)

    def ended(self, task_id: str, status: str, reason: str | None = None, *, result: Any = None,
              error: Any = None, http_status: int | None = None) -> None:
        """Record the task's end in the journal (with its answer) and forget its jobs."""
        with self._lock:
            self._entries.pop(task_id, None)
        if self.journal is not None:
            self.journal.finished(task_id, status, reason, result=None if result is None else json.dumps(result),
                                  error=None if error is None else json.dumps(error), http_status=http_status)

    def cancel(self, task_id: str) -> str:
        """Stop a task running here at its next denoising step: ``cancelled``; ``ended`` when its work had
        already finished (its answer is being stored); ``elsewhere`` when it does not run here."""
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is None:
                return "elsewhere"
            jobs = list(entry.jobs)
            if jobs and all(job.future.done() for job in jobs):
                return "ended"
            entry.cancelled = True
        if self.scheduler is not None:
            for job in jobs:
                self.scheduler.cancel(job)
        if self.journal is not None:  # answered at once; the handler's own record of it comes later
            self.journal.finished(task_id, "canceled", "cancelled")
        return "cancelled"

    def progress(self, task_id: str) -> dict[str, Any] | None:
        """Queue position, step and ETA of a task running here; None when it does not run here."""
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is None:
                return None
            jobs, cancelled = list(entry.jobs), entry.cancelled
        if cancelled:
            return {"state": "cancelled"}
        if not jobs:
            return {"state": "queued", "queue_position": None, "eta_s": None}
        job = jobs[0]
        info: dict[str, Any] = {"state": job.state.value}
        scheduler = self.scheduler
        if scheduler is not None and scheduler.throttle is not None:
            info["gpu_throttle"] = scheduler.throttle.state.value
        if job.state == JobState.queued and scheduler is not None:
            info["queue_position"] = scheduler.position(job)
        if job.state in (JobState.queued, JobState.running):
            info.update(step=job.step, total_steps=job.total_steps)
            eta = scheduler.eta(job) if scheduler is not None else None
            info["eta_s"] = None if eta is None else round(eta, 2)
        return info


async def run_task(ctx: Any, req: Any, *, front: Any, generation: Any) -> Any:
    """A task's handler: run its request as its owner (``front.task_context``) and record its end in the journal
    (completed with its answer, failed with a reason, cancelled), which answers for the task from then on."""
    from ..errors import Cancelled

    task_id = getattr(ctx.request.state, "task_id", None)
    registry: TaskRegistry = front.tasks
    try:
        record = front.journal.get(task_id) if task_id else None
        if record is None:
            raise NotFound(f"task {task_id} is not in the journal")
        rctx = front.task_context(ctx, record.owner)
        rctx.on_submit = lambda jobs: registry.attach(task_id, jobs)
        rctx.previews = True  # its event stream shows them
        answer = generation.response(req, await generation.run(req, rctx), rctx)
    except Cancelled:
        registry.ended(task_id, "canceled", "cancelled")
        raise TaskCancelled(task_id) from None
    except ServiceError as exc:
        registry.ended(task_id, "failed", exc.type, error=exc.body(), http_status=exc.status)
        raise
    except Exception as exc:
        registry.ended(task_id, "failed", "error", http_status=500,
                       error={"error": {"type": "error", "message": f"the task failed: {exc}"}})
        raise
    registry.ended(task_id, "completed", result=answer.model_dump(mode="json"), http_status=200)
    return answer


def status_body(record: TaskRecord) -> dict[str, Any]:
    """``GET /<task>/status``: BentoML's fields, and the reason of a failure or cancellation."""
    body: dict[str, Any] = {"task_id": record.task_id, "status": record.status,
                            "created_at": _iso(record.created), "executed_at": _iso(record.created),
                            "completed_at": None if record.status == "in_progress" else _iso(record.updated)}
    if record.reason is not None:
        body["reason"] = record.reason
    if record.reason in LOST:
        body["message"] = _lost_message(record)
    return body


def _iso(timestamp: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


def _lost_message(record: TaskRecord) -> str:
    how = "restarted" if record.reason == "restart" else "shut down"
    return f"task {record.task_id} did not finish: the service {how} first; submit it again"


class TaskControl:
    """ASGI middleware for the task routes (behind the gateway, which has authenticated the caller).

    With keys, a task belongs to the key that submitted it: another key gets 404, as for an unknown id
    (an operator key sees every task).
    """

    def __init__(self, app: Any, registry: TaskRegistry, journal: TaskJournal, task_routes: tuple[str, ...],
                 directory: TaskDirectory | None = None, signer: Signer | None = None,
                 on_accepted: list[Any] | None = None) -> None:
        self.app = app
        self.on_accepted = on_accepted or []
        """Called with (task id, request state, the retried task's id or None) when a task id is issued, before
        the task can end (the webhook subscription is recorded there)."""
        self.registry = registry
        self.journal = journal
        self.routes = task_routes
        self.directory = directory
        """With several replicas: who owns which task, so any replica can answer for it."""
        self.signer = signer
        self.started = time.time()
        """Tasks created before this process have no stored request in BentoML's table (it was re-created)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"].rstrip("/"), scope["method"]
        route, _, action = path.rpartition("/")
        if route not in self.routes:
            return await self.app(scope, receive, send)
        task_id = QueryParams(scope.get("query_string", b"")).get("task_id", "")
        principal = scope.get("state", {}).get("principal")
        try:
            if action == "submit" and method == "POST":
                return await self._rewrite(scope, receive, send, lambda body: self._on_submit(body, scope))
            if not task_id or (action, method) not in (("status", "GET"), ("get", "GET"), ("cancel", "PUT"),
                                                       ("retry", "POST")):
                return await self.app(scope, receive, send)
            record = self.journal.get(task_id)
            if record is None and self.directory is not None:
                owner = self.directory.owner(task_id)
                if owner is not None:
                    return await self._forward(owner, scope, receive, send, principal)
            if record is None or principal is None or not may_use(principal, record.owner):
                raise NotFound(f"no task {task_id}")
            if action == "retry":
                if record.created < self.started:
                    raise Gone(f"task {task_id} was submitted before the service restarted; its request is not "
                               "kept: submit it again", reason="restart")
                return await self._rewrite(scope, receive, send,
                                           lambda body: self._on_submit(body, scope, retry_of=task_id))
            if action == "cancel":
                return await self._cancel(scope, receive, send, record)
            if action == "status":
                return await _json(200, self._status(record))(scope, receive, send)
            return await self._result(record)(scope, receive, send)
        except ServiceError as exc:
            await _json(exc.status, exc.body(), exc.headers())(scope, receive, send)

    # -- answers from the journal -----------------------------------------------------------------
    def _status(self, record: TaskRecord) -> dict[str, Any]:
        body = status_body(record)
        if record.status == "in_progress":
            body.update(self.registry.progress(record.task_id) or {})
        return body

    def _result(self, record: TaskRecord) -> JSONResponse:
        """``GET /<task>/get``: the task's answer as it was, whenever it is asked."""
        if record.status == "in_progress":
            return _json(400, {"error": {"type": "not_completed",
                                         "message": f"task {record.task_id} is not completed yet"}})
        if record.status == "canceled":
            return _json(409, {"error": {"type": "cancelled", "message": f"task {record.task_id} was cancelled"}})
        if record.reason in LOST:
            return _json(410, {"error": {"type": record.reason, "message": _lost_message(record)}})
        if record.status == "completed" and record.result is not None:
            return _json(record.http_status or 200, json.loads(record.result))
        if record.error is not None:
            return _json(record.http_status or 500, json.loads(record.error))
        return _json(500, {"error": {"type": record.reason or "error",
                                     "message": f"task {record.task_id} failed ({record.reason or 'error'})"}})

    async def _cancel(self, scope, receive, send, record: TaskRecord) -> None:
        if record.status != "in_progress":
            raise Conflict(f"task {record.task_id} has already ended ({record.status})")
        outcome = self.registry.cancel(record.task_id)
        if outcome != "cancelled":
            now = self.journal.get(record.task_id)
            if outcome == "ended" or (now is not None and now.status != "in_progress"):  # it ended meanwhile
                raise Conflict(f"task {record.task_id} has already ended ({now.status if now else 'completed'})")
            raise NotFound(f"task {record.task_id} is not running in this worker; cancel it where it runs")
        # BentoML marks its row cancelled; the answer is ours, since the work really stops.
        await self.app(scope, receive, _discard)
        await _json(200, {"task_id": record.task_id, "status": "canceled"})(scope, receive, send)

    def _on_submit(self, body: dict[str, Any], scope: dict[str, Any], retry_of: str | None = None) -> dict[str, Any]:
        if isinstance(body, dict) and "task_id" in body:
            state = scope.setdefault("state", {})
            admission = state.get("admission")
            self.registry.submitted(body["task_id"])
            self.journal.accepted(body["task_id"], owner_of(state["principal"]),
                                  cost_images=admission.images if admission is not None else 1)
            for hook in self.on_accepted:
                try:
                    hook(body["task_id"], state, retry_of)
                except Exception:
                    logger.exception("task %s: accepted hook failed", body["task_id"])
            if self.directory is not None:
                self.directory.announce(body["task_id"])
            state.setdefault("audit", {})["task_id"] = body["task_id"]
        return body

    async def _forward(self, owner: str, scope, receive, send, principal: Any) -> None:
        """The owner replica answers; the caller is named in signed headers, never by the client's key."""
        headers = {}
        if self.signer is not None and principal is not None:
            headers = self.signer.forward_headers("" if principal.anonymous else principal.name, scope["method"],
                                                  scope["path"].rstrip("/") or "/",
                                                  scope.get("query_string", b"").decode("latin-1"))
        await self.directory.forward(owner, scope, receive, send, headers=headers)  # type: ignore[union-attr]

    async def _rewrite(self, scope, receive, send, edit) -> None:
        """Pass the request on, then edit a JSON body of a 200 answer."""
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await self._send_edited(start, b"".join(chunks), send, edit)
            else:
                await send(message)

        try:
            await self.app(scope, receive, capture)
        except TaskCancelled as exc:  # raised by a cancelled task, after its submit was answered
            logger.info("task %s cancelled", exc)

    @staticmethod
    async def _send_edited(start: dict[str, Any], body: bytes, send: Any, edit) -> None:
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        if start.get("status") == 200:
            try:
                body = json.dumps(edit(json.loads(body))).encode()
            except ValueError:
                pass
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def _discard(message: dict[str, Any]) -> None:
    return None
