"""Live progress of a task as Server-Sent Events: ``GET /jobs/events?task_id=`` (``sse-starlette``).

A task's events are ``queued`` (position, ETA), ``running`` (step k of n, ETA), ``preview`` (a small JPEG every
few steps) and one terminal event: ``completed`` (the task's answer, as ``/jobs/get`` gives it), ``failed`` (its
reason) or ``cancelled``. Why they are kept, not just sent:

- **Resuming loses nothing.** Events are rows of a SQLite file in the state folder, numbered per task (1, 2, ...);
  the number is the SSE ``id``. A client that reconnects with ``Last-Event-ID: N`` gets every event after N, from
  whichever worker of the server answers (they share the file), and through any replica (forwarded, as status is).
- **The GPU never waits for a disk.** The scheduler's thread only puts events into a queue; one writer thread per
  process numbers and stores them. Numbers come from the file in one write transaction, so two processes never
  give one number twice.
- **The journal has the last word.** The terminal event is written when the journal records the task's end; a
  task whose process died (a restart) has no such event, so a stream that finds the journal ended and no terminal
  event writes it from the journal (``failed``, reason ``restart``). A stream ends after its terminal event.
- **Proxies keep the stream open**: a comment line every ``SDXL_BENTO_EVENTS_HEARTBEAT_S``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from .statedb import open_shared

logger = logging.getLogger(__name__)

TERMINAL = {"completed": "completed", "failed": "failed", "canceled": "cancelled"}
"""Journal status -> terminal event name."""
TERMINAL_EVENTS = frozenset(TERMINAL.values())
STEP_EVENTS_EVERY_S = 0.1
"""``running`` events come at most this often per task (first and last step always)."""
QUEUE_TICK_S = 0.5


@dataclass(frozen=True)
class Event:
    seq: int
    event: str
    data: str
    """JSON text."""


def terminal_data(record: Any) -> tuple[str, dict[str, Any]]:
    """The terminal event of an ended journal record: its name and data (the result, or the reason and error)."""
    name = TERMINAL.get(record.status, "failed")
    data: dict[str, Any] = {"task_id": record.task_id, "status": record.status}
    if record.reason is not None:
        data["reason"] = record.reason
    if record.status == "completed" and record.result is not None:
        data["result"] = json.loads(record.result)
    elif record.error is not None:
        data["error"] = json.loads(record.error).get("error")
    return name, data


class EventLog:
    """Events of tasks, in ``<state dir>/events.db``; ``publish`` never blocks on the disk."""

    def __init__(self, path: Path) -> None:
        self._db = open_shared(path, "synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS events (task_id TEXT NOT NULL, seq INTEGER NOT NULL, "
                         "event TEXT NOT NULL, data TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (task_id, seq))")
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, str, dict[str, Any]] | None] = queue.Queue()
        self._written = threading.Condition()
        self.version = 0
        """Counts this process's writes: a stream asks the file again only when it moved (or every half second,
        for the other workers' writes)."""
        self._thread: threading.Thread | None = None  # started by the first event (not in BentoML's parent process)

    # -- writing ----------------------------------------------------------------------------------------------
    def publish(self, task_id: str, event: str, data: dict[str, Any]) -> None:
        """Queue an event (from any thread, the scheduler's included); numbered and stored by the writer."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._writer, name="sdxl-events", daemon=True)
                    self._thread.start()
        self._queue.put((task_id, event, data))

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until what was published before is stored (tests, shutdown)."""
        if self._thread is None:
            return
        done = threading.Event()
        self._queue.put(("", "__flush__", {"done": done}))
        done.wait(timeout)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            task_id, event, data = item
            if event == "__flush__":
                data["done"].set()
                continue
            try:
                self.append(task_id, event, data)
            except Exception:  # an event lost is a gap in a progress bar; the writer must go on
                logger.exception("event %s of task %s not stored", event, task_id)

    def append(self, task_id: str, event: str, data: dict[str, Any], *, now: float | None = None) -> int | None:
        """Store an event now with the next number; None when the task already has its terminal event (nothing
        follows it, and a terminal event is written once)."""
        text = json.dumps(data, separators=(",", ":"), default=str)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                ended = self._db.execute(
                    f"SELECT 1 FROM events WHERE task_id=? AND event IN ({','.join('?' * len(TERMINAL_EVENTS))}) "
                    "LIMIT 1", (task_id, *TERMINAL_EVENTS)).fetchone()
                if ended:
                    self._db.execute("COMMIT")
                    return None
                seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE task_id=?",
                                       (task_id,)).fetchone()[0]
                self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                                 (task_id, seq, event, text, time.time() if now is None else now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        with self._written:
            self.version += 1
            self._written.notify_all()
        return seq

    # -- reading ----------------------------------------------------------------------------------------------
    def since(self, task_id: str, after: int = 0, limit: int = 500) -> list[Event]:
        with self._lock:
            rows = self._db.execute("SELECT seq, event, data FROM events WHERE task_id=? AND seq>? ORDER BY seq "
                                    "LIMIT ?", (task_id, after, limit)).fetchall()
        return [Event(*row) for row in rows]

    def terminal_seq(self, task_id: str) -> int | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT MIN(seq) FROM events WHERE task_id=? AND event IN ({','.join('?' * len(TERMINAL_EVENTS))})",
                (task_id, *TERMINAL_EVENTS)).fetchone()
        return row[0] if row else None

    def prune(self, older_than_s: float, now: float | None = None) -> int:
        """Forget the events of tasks whose last event is older than ``older_than_s``."""
        cutoff = (time.time() if now is None else now) - older_than_s
        with self._lock:
            return self._db.execute("DELETE FROM events WHERE task_id IN (SELECT task_id FROM events GROUP BY task_id "
                                    "HAVING MAX(at) < ?)", (cutoff,)).rowcount

    async def stream(self, task_id: str, after: int, journal: Any, *, poll_s: float = 0.05,
                     reread_s: float = 0.5) -> AsyncIterator[Event]:
        """Events after ``after`` until the terminal one; the journal's end when no terminal event was written."""
        seen_version, reread_at = -1, 0.0
        while True:
            if self.version != seen_version or time.monotonic() >= reread_at:
                seen_version, reread_at = self.version, time.monotonic() + reread_s
                events = await asyncio.to_thread(self.since, task_id, after)
                for event in events:
                    after = event.seq
                    yield event
                    if event.event in TERMINAL_EVENTS:
                        return
                if events:
                    continue
                terminal = await asyncio.to_thread(self.terminal_seq, task_id)
                if terminal is not None and terminal <= after:
                    return  # the client saw the end before it reconnected
                record = await asyncio.to_thread(journal.get, task_id)
                if record is None:
                    return
                if record.status != "in_progress":
                    name, data = terminal_data(record)
                    await asyncio.to_thread(self.append, task_id, name, data)  # no-op when one exists
                    reread_at = 0.0
                    continue
            await asyncio.sleep(poll_s)


class Progress:
    """Turns the scheduler's job notifications into a task's events (and ``job.progress`` webhooks).

    ``watch`` is called when a task's jobs exist (``TaskRegistry.attach``). The scheduler calls the listener from
    its own thread; everything here only computes a little and queues."""

    def __init__(self, log: EventLog, *, webhooks: Any = None, scheduler: Callable[[], Any] = lambda: None) -> None:
        self.log = log
        self.webhooks = webhooks
        self.scheduler = scheduler
        self._lock = threading.Lock()
        self._queued: dict[str, tuple[Any, tuple[Any, Any]]] = {}
        """task id -> (job, last (position, eta) published), while queued."""
        self._step_at: dict[str, tuple[float, int]] = {}
        """task id -> (when, step) of its last ``running`` event."""
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    def watch(self, task_id: str, jobs: list[Any]) -> None:
        if not jobs:
            return
        job = jobs[0]
        if job.state.value == "queued":  # published before listening, so that it comes before the job's first step
            info = self._queue_info(job)
            with self._lock:
                self._queued[task_id] = (job, (info.get("queue_position"), info.get("eta_s")))
            self._publish(task_id, "queued", info)
            self._ensure_ticker()
        for each in jobs:
            each.listen(lambda kind, info, job=each: self._notified(task_id, job, kind, info), previews=True)

    def _queue_info(self, job: Any) -> dict[str, Any]:
        scheduler = self.scheduler()
        position = scheduler.position(job) if scheduler is not None else None
        eta = scheduler.eta(job) if scheduler is not None else None
        return {"state": "queued", "queue_position": position, "eta_s": None if eta is None else round(eta, 2)}

    def _running_info(self, job: Any, step: int, total: int) -> dict[str, Any]:
        scheduler = self.scheduler()
        eta = scheduler.eta(job) if scheduler is not None else None
        return {"state": "running", "step": step, "total_steps": total, "eta_s": None if eta is None else round(eta, 2)}

    def _notified(self, task_id: str, job: Any, kind: str, info: dict[str, Any]) -> None:
        try:
            if kind == "running":
                with self._lock:
                    self._queued.pop(task_id, None)
                    self._step_at[task_id] = (time.monotonic(), 0)
                self._publish(task_id, "running", self._running_info(job, 0, info.get("total_steps", 0)))
            elif kind == "step":
                step, total = info["step"], info["total_steps"]
                now = time.monotonic()
                with self._lock:
                    last_at, last_step = self._step_at.get(task_id, (0.0, -1))
                    due = step != last_step and (step in (1, total) or now - last_at >= STEP_EVENTS_EVERY_S)
                    if due:
                        self._step_at[task_id] = (now, step)
                if due:
                    self._publish(task_id, "running", self._running_info(job, step, total))
            elif kind == "preview":
                self.log.publish(task_id, "preview", {
                    "step": info["step"], "total_steps": info["total_steps"], "media_type": "image/jpeg",
                    "images": [base64.b64encode(jpeg).decode() for jpeg in info["images"]]})
            elif kind == "ended":
                with self._lock:
                    self._queued.pop(task_id, None)
                    self._step_at.pop(task_id, None)
        except Exception:  # a listener must never break the GPU loop
            logger.exception("progress of task %s", task_id)

    def _publish(self, task_id: str, event: str, info: dict[str, Any]) -> None:
        self.log.publish(task_id, event, {"task_id": task_id, **info})
        if self.webhooks is not None:
            try:
                self.webhooks.progress(task_id, info)
            except Exception:
                logger.exception("job.progress webhook of task %s", task_id)

    # -- queue positions move while a task waits --------------------------------------------------------------
    def _ensure_ticker(self) -> None:
        with self._lock:
            if self._ticker is not None:
                return
            self._ticker = threading.Thread(target=self._tick, name="sdxl-progress", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(QUEUE_TICK_S):
            with self._lock:
                watched = list(self._queued.items())
            for task_id, (job, last) in watched:
                if job.state.value != "queued":
                    with self._lock:
                        self._queued.pop(task_id, None)
                    continue
                info = self._queue_info(job)
                now = (info.get("queue_position"), info.get("eta_s"))
                moved = now[0] != last[0] or (now[1] is not None and last[1] is not None and abs(now[1] - last[1]) > 1)
                if moved:
                    with self._lock:
                        if task_id in self._queued:
                            self._queued[task_id] = (job, now)
                    self._publish(task_id, "queued", info)

    def stop(self) -> None:
        self._stop.set()
