"""What BentoML's task routes lack: real cancellation and progress.

BentoML's local server keeps task state in SQLite and, on ``PUT /<task>/cancel``, only marks the
row cancelled while the work runs on (see NOTES). ``TaskControl`` is an ASGI middleware that
answers cancel itself, stopping the scheduler job at its next denoising step, and adds queue
position, step progress and an ETA to ``GET /<task>/status``. The ``TaskRegistry`` links BentoML
task ids to scheduler jobs; it lives in the worker process that runs the tasks.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from .journal import TaskJournal, TaskRecord
from .replicas import TaskDirectory
from .scheduler import Job, JobState, Scheduler

logger = logging.getLogger(__name__)


class TaskCancelled(BaseException):
    """Raised by a cancelled task's handler. It passes BentoML's task runner (which catches only
    ``Exception``), so no result is written and BentoML's row keeps the status ``canceled``;
    ``TaskControl`` catches it around the submit request that ran the task."""


@dataclass
class _Entry:
    jobs: list[Job] = field(default_factory=list)
    cancelled: bool = False
    ended: str | None = None


class TaskRegistry:
    def __init__(self, journal: TaskJournal | None = None) -> None:
        self.journal = journal
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self.scheduler: Scheduler | None = None

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

    def is_cancelled(self, task_id: str) -> bool:
        with self._lock:
            entry = self._entries.get(task_id)
            return bool(entry and entry.cancelled)

    def ended(self, task_id: str, status: str, reason: str | None = None) -> None:
        with self._lock:
            if task_id in self._entries:
                self._entries[task_id].ended = status
        if self.journal is not None:
            self.journal.finished(task_id, status, reason)

    def cancel(self, task_id: str) -> str:
        """``cancelled``, ``ended:<status>`` or ``unknown``."""
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is None:
                return "unknown"
            if entry.ended is not None:
                return f"ended:{entry.ended}"
            entry.cancelled = True
            jobs = list(entry.jobs)
        if self.scheduler is not None:
            for job in jobs:
                self.scheduler.cancel(job)
        return "cancelled"

    def progress(self, task_id: str) -> dict[str, Any] | None:
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


def _caller(scope: dict[str, Any]) -> str | None:
    """The API key's name set by the gateway; None when the service runs without keys."""
    principal = scope.get("state", {}).get("principal")
    return None if principal is None or principal.tier.name == "open" else principal.name


async def _not_found(task_id: str, scope, receive, send) -> None:
    await _json_response(404, {"error": {"type": "not_found", "message": f"no task {task_id}"}})(scope, receive, send)


def _json_response(status: int, body: dict[str, Any]):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status)


class TaskControl:
    """ASGI middleware for the task routes: submit, status, get, cancel.

    It records each accepted task in the journal with its owner (the API key's name, when keys are
    in use: a key sees and cancels only its own tasks; others get 404, as for an unknown id).
    """

    def __init__(self, app: Any, registry: TaskRegistry, journal: TaskJournal,
                 task_routes: tuple[str, ...], directory: TaskDirectory | None = None) -> None:
        self.app = app
        self.registry = registry
        self.journal = journal
        self.routes = task_routes
        self.directory = directory
        """With several replicas: who owns which task, so any replica can answer for it."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"].rstrip("/"), scope["method"]
        route, _, action = path.rpartition("/")
        if route not in self.routes:
            return await self.app(scope, receive, send)
        task_id = parse_qs(scope.get("query_string", b"").decode()).get("task_id", [""])[0]
        caller = _caller(scope)
        if action in ("submit", "retry") and method == "POST":
            if action == "retry" and not self._visible(task_id, caller):
                return await _not_found(task_id, scope, receive, send)
            return await self._rewrite(scope, receive, send, lambda body: self._on_submit(body, caller, scope))
        if not task_id or action not in ("cancel", "get", "status"):
            return await self.app(scope, receive, send)
        if self.directory is not None and self.journal.get(task_id) is None:
            owner = self.directory.owner(task_id)
            if owner is not None:
                return await self.directory.forward(owner, scope, receive, send)
        if not self._visible(task_id, caller):
            return await _not_found(task_id, scope, receive, send)
        record = self.journal.get(task_id)
        if action == "cancel" and method == "PUT":
            return await self._cancel(scope, receive, send, task_id)
        if action == "get" and method == "GET" and self.registry.is_cancelled(task_id):
            response = _json_response(409, {"error": {"type": "cancelled", "message": f"task {task_id} was cancelled"}})
            return await response(scope, receive, send)
        if record is not None and record.reason in ("restart", "shutdown"):
            return await self._lost(action, record, scope, receive, send)
        if action == "status" and method == "GET":
            return await self._rewrite(scope, receive, send, lambda body: self._on_status(task_id, body))
        return await self.app(scope, receive, send)

    def _visible(self, task_id: str, caller: str | None) -> bool:
        """Open service: every task. With keys: only the caller's own."""
        if caller is None:
            return True
        record = self.journal.get(task_id)
        return record is not None and record.owner == caller

    async def _lost(self, action: str, record: TaskRecord, scope, receive, send) -> None:
        """A task the service was running when it stopped: BentoML has forgotten it, the journal has not."""
        how = "restarted" if record.reason == "restart" else "shut down"
        message = f"task {record.task_id} did not finish: the service {how} first; submit it again"
        if action == "status":
            response = _json_response(200, {"task_id": record.task_id, "status": "failed", "reason": record.reason,
                                             "message": message})
        else:
            response = _json_response(410, {"error": {"type": record.reason, "message": message}})
        await response(scope, receive, send)

    async def _cancel(self, scope, receive, send, task_id: str) -> None:
        outcome = self.registry.cancel(task_id)
        record = self.journal.get(task_id)
        if outcome == "unknown" and record is not None and record.status != "in_progress":
            outcome = f"ended:{record.status}"
        if outcome == "unknown":
            response = _json_response(404, {"error": {"type": "not_found", "message": f"no task {task_id}"}})
        elif outcome.startswith("ended:"):
            status = outcome.split(":", 1)[1]
            response = _json_response(409, {"error": {"type": "conflict",
                                                      "message": f"task {task_id} has already ended ({status})"}})
        else:
            # Let BentoML mark its row cancelled, then answer for it: the work really stops.
            await self.app(scope, receive, _discard)
            response = _json_response(200, {"task_id": task_id, "status": "canceled"})
        await response(scope, receive, send)

    def _on_submit(self, body: dict[str, Any], caller: str | None, scope: dict[str, Any]) -> dict[str, Any]:
        if isinstance(body, dict) and "task_id" in body:
            self.registry.submitted(body["task_id"])
            self.journal.accepted(body["task_id"], caller)
            if self.directory is not None:
                self.directory.announce(body["task_id"])
            scope.setdefault("state", {}).setdefault("audit", {})["task_id"] = body["task_id"]
        return body

    def _on_status(self, task_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if isinstance(body, dict) and body.get("status") == "in_progress":
            progress = self.registry.progress(task_id)
            if progress is not None:
                body.update(progress)
        return body

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


async def _discard(message: dict[str, Any]) -> None:
    return None
