"""The scheduler owns the GPU: one thread drains a bounded queue and calls the engine.

Every path to the GPU (sync, batchable and task APIs) submits ``Work`` here and waits on a
future. The loop is: pick the next job (priority, then deadline, then arrival), gather the
waiting jobs that share its batch key, run them as one engine call, resolve each job's future.
A job once accepted always ends: done, failed with a reason, or cancelled.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Protocol

from ..errors import Cancelled, DeadlineExceeded, GenerationFailed, Overloaded, ServiceError, ShuttingDown
from ..jobs import StepCallback, Work
from .thermal import Throttle
from .vram import VramBudget, run_with_oom_retry

logger = logging.getLogger(__name__)


class EngineLike(Protocol):
    def generate(self, works: list[Work], on_step: StepCallback | None = None) -> list[list[Any]]: ...


class Observer(Protocol):
    """Receives what the scheduler measures (telemetry.Metrics is one)."""

    def observe_batch(self, images: int, steps: int, seconds: float) -> None: ...

    def observe_queue(self, waiting: int, running: int) -> None: ...


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


@dataclass(eq=False)
class Job:
    work: Work
    deadline: float
    """``time.monotonic()`` after which the job must not start."""
    priority: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.monotonic)
    state: JobState = JobState.queued
    step: int = 0
    total_steps: int = 0
    started: float | None = None
    finished: float | None = None
    future: Future = field(default_factory=Future)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _listeners: list[Callable[[str, dict[str, Any]], None]] = field(default_factory=list)
    wants_previews: bool = False
    """A listener asked for preview images (the engine makes them only then)."""
    batch_images: int = 0
    """Images of the pipeline call that ran the job (its own and its batch mates'): numerics may depend on it."""

    def listen(self, listener: Callable[[str, dict[str, Any]], None], *, previews: bool = False) -> None:
        """Call ``listener(kind, info)`` from the scheduler's thread as the job moves: ``running``
        (``total_steps``), ``step`` (``step``, ``total_steps``), ``preview`` (``step``, ``total_steps``, ``images``:
        one JPEG per image of the job), ``ended`` (``state``). It must be quick and is never allowed to fail the job."""
        self._listeners.append(listener)
        self.wants_previews = self.wants_previews or previews

    def _emit(self, kind: str, **info: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, info)
            except Exception:
                logger.exception("listener of job %s failed on %s", self.id, kind)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def queue_seconds(self) -> float:
        return ((self.started or time.monotonic()) - self.arrival)

    @property
    def run_seconds(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.monotonic()) - self.started

    def cost(self) -> float:
        """Work units (steps x pixels x images) for ETA estimates."""
        return self.work.key.units() * self.work.num_images


class Scheduler:
    def __init__(self, engine: EngineLike, *, max_batch_requests: int = 4, max_batch_images: int = 8,
                 max_jobs: int = 32, aging_per_minute: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, observer: Observer | None = None,
                 throttle: Throttle | None = None, budget: VramBudget | None = None,
                 is_loaded: Callable[[str], bool] | None = None) -> None:
        self.engine = engine
        self.observer = observer
        self.throttle = throttle
        """Temperature guard: smaller batches when hot, no new batch when paused."""
        self.budget = budget
        """VRAM guard: a batch never holds more images than the measured budget fits."""
        self.is_loaded = is_loaded
        """Which checkpoint is in memory: among equals, its work goes first, so swaps stay rare."""
        self.aging_per_s = aging_per_minute / 60.0
        self.max_batch_requests = max_batch_requests
        self.max_batch_images = max_batch_images
        self.max_jobs = max_jobs
        self.clock = clock
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._closed = False
        self._stop_reason = "shutdown"
        self._thread: threading.Thread | None = None
        self._seconds_per_unit: float | None = None
        self._batch_started: float | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sdxl-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Admit nothing new; what was admitted goes on."""
        with self._cond:
            self._closed = True

    def stop(self, reason: str = "shutdown", cancel_running: bool = False) -> None:
        """Stop the loop; jobs still waiting (and running ones, when asked) fail with ``reason``."""
        with self._cond:
            self._closed = self._stopping = True
            self._stop_reason = reason
            waiting, self._queue = self._queue, []
            running = list(self._running) if cancel_running else []
            self._cond.notify_all()
        for job in running:
            job._cancel.set()  # the engine stops at its next step
        for job in waiting:
            self._finish(job, JobState.failed, self._stopped_error())
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _stopped_error(self) -> ShuttingDown:
        return ShuttingDown(f"the service stopped ({self._stop_reason}) before this request finished",
                            reason=self._stop_reason, retry_after=30)

    # -- admission ---------------------------------------------------------------------------
    def submit(self, works: list[Work], *, timeout: float | list[float], priority: int | list[int] = 0) -> list[Job]:
        """Queue works atomically (so they can share a batch); raise Overloaded when full. ``timeout`` and
        ``priority`` are one for all, or one per work (a batch of several callers' items)."""
        now = self.clock()
        timeouts = timeout if isinstance(timeout, list) else [timeout] * len(works)
        priorities = priority if isinstance(priority, list) else [priority] * len(works)
        jobs = [Job(work=w, deadline=now + t, priority=p, arrival=now, total_steps=w.key.total_steps())
                for w, t, p in zip(works, timeouts, priorities, strict=True)]
        with self._cond:
            if self._closed:
                raise ShuttingDown("the service is shutting down; try again shortly (or another replica)",
                                   retry_after=30)
            in_system = len(self._queue) + len(self._running)
            if in_system + len(jobs) > self.max_jobs:
                raise Overloaded(
                    f"the queue is full ({in_system} requests admitted, limit {self.max_jobs}); try again later",
                    retry_after=self._retry_after(),
                )
            self._queue.extend(jobs)
            self._cond.notify_all()
        self._observe_queue()
        return jobs

    def cancel(self, job: Job) -> bool:
        """Cancel a job: at once if queued, at the next denoising step if running. False if it had ended."""
        with self._cond:
            if job.state in (JobState.done, JobState.failed, JobState.cancelled):
                return False
            job._cancel.set()
            if job in self._queue:
                self._queue.remove(job)
            else:
                return True
        self._finish(job, JobState.cancelled, Cancelled("the job was cancelled"))
        return True

    # -- observation -------------------------------------------------------------------------
    def position(self, job: Job) -> int | None:
        """0-based position among waiting jobs in the order they will start; None when not waiting."""
        with self._cond:
            order = sorted(self._queue, key=self._order)
            return order.index(job) if job in order else None

    def seed_rate(self, seconds_per_unit: float) -> None:
        """The warm-up's measured pace, until the first batch measures its own."""
        with self._cond:
            if self._seconds_per_unit is None and seconds_per_unit > 0:
                self._seconds_per_unit = seconds_per_unit

    def eta(self, job: Job) -> float | None:
        """Seconds until the job is expected to finish: the running batch at its own pace once it has made a
        step, the rest from measured step times (the warm-up's until a batch has finished)."""
        if job.state not in (JobState.queued, JobState.running):
            return None
        with self._cond:
            rate = self._seconds_per_unit
            order = sorted(self._queue, key=self._order)
            ahead = order[: order.index(job) + 1] if job in order else []
            running = list(self._running)
            started = self._batch_started
        stepped = [j for j in running if j.step > 0]
        if running and stepped and started is not None:  # the running batch's own pace, step by step
            done = stepped[0].step / max(1, stepped[0].total_steps)
            elapsed = time.perf_counter() - started
            left = elapsed / done - elapsed
            rate = rate if rate is not None else elapsed / (done * sum(j.cost() for j in running))
        elif rate is None:
            return None
        else:
            left = sum(j.cost() * (1 - j.step / max(1, j.total_steps)) for j in running) * rate
        return left + sum(j.cost() for j in ahead) * rate

    def depth(self) -> tuple[int, int]:
        with self._cond:
            return len(self._queue), len(self._running)

    def _observe_queue(self) -> None:
        if self.observer is not None:
            self.observer.observe_queue(*self.depth())

    def _retry_after(self) -> float:
        if self._seconds_per_unit is None:
            return 5.0
        units = sum(j.cost() for j in self._queue[: self.max_batch_requests]) or 1.0
        return max(1.0, units * self._seconds_per_unit)

    # -- the loop ----------------------------------------------------------------------------
    def _order(self, job: Job) -> tuple[float, float, float]:
        """Priority first, raised by the time waited (aging: a low tier still progresses under constant
        high-tier load), then the earliest deadline, then arrival."""
        aged = int(max(0.0, self.clock() - job.arrival) * self.aging_per_s)  # whole points, so ties stay ties
        return (-(job.priority + aged), job.deadline, job.arrival)

    def _next_batch(self) -> list[Job]:
        """Under the lock: expire what can no longer start, then take the head and its batch mates."""
        now = self.clock()
        expired = [j for j in self._queue if j.deadline <= now]
        for job in expired:
            self._queue.remove(job)
        for job in expired:
            self._finish(job, JobState.failed, DeadlineExceeded(
                "the request could not start before its deadline", reason="deadline", retry_after=self._retry_after()))
        if not self._queue:
            return []
        max_requests = self.max_batch_requests
        if self.throttle is not None:
            max_requests = self.throttle.batch_limit(max_requests)
            if max_requests == 0:  # paused: the GPU cools down; waiting work keeps its place
                return []
        ranked = sorted(((self._order(j), j) for j in self._queue), key=lambda pair: pair[0])
        order = [job for _, job in ranked]
        head = order[0]
        if self.is_loaded is not None and not self.is_loaded(head.work.key.model):
            # Prefer work for a loaded checkpoint of the same (aged) priority over a swap; aging still
            # lifts waiting work for another checkpoint above it in time, so nothing starves.
            band = ranked[0][0][0]
            head = next((j for rank, j in ranked if rank[0] == band and self.is_loaded(j.work.key.model)), head)
        key = head.work.key
        max_images = self.max_batch_images
        if self.budget is not None:
            uses_refiner = key.kind == "refine" or key.refine != "none"
            max_images = min(max_images, max(1, self.budget.max_images(*key.peak_size(), uses_refiner)))
        batch, images = [head], head.work.num_images
        for job in order:
            if job is head:
                continue
            if len(batch) >= max_requests:
                break
            if job.work.key == key and images + job.work.num_images <= max_images:
                batch.append(job)
                images += job.work.num_images
        for job in batch:
            self._queue.remove(job)
            job.state, job.started = JobState.running, self.clock()
        self._running = batch
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                if self.throttle is not None:
                    self.throttle.update()  # reads the GPU at most every few seconds
                batch = self._next_batch()
                if not batch:
                    self._cond.wait(0.5)  # throttled: look again shortly
                    continue
            self._observe_queue()
            self._run(batch)
            self._observe_queue()

    def _run(self, batch: list[Job]) -> None:
        started = self._batch_started = time.perf_counter()
        images = sum(job.work.num_images for job in batch)
        for job in batch:
            job.batch_images = images
            job._emit("running", total_steps=job.total_steps)

        def on_step(done: int, total: int) -> None:
            for job in batch:
                job.step, job.total_steps = done, total
                job._emit("step", step=done, total_steps=total)
            if all(job.cancel_requested for job in batch):
                raise _AllCancelled()

        def call(works: list[Work]) -> list[list[Any]]:
            jobs = [job for job in batch if any(job.work is w for w in works)]
            if not any(job.wants_previews or job.work.previews for job in jobs):
                return self.engine.generate(works, on_step=on_step)

            def on_preview(done: int, total: int, images: list[bytes]) -> None:
                start = 0
                for job in jobs:  # the batch's images in order, num_images per job
                    mine = images[start:start + job.work.num_images]
                    start += job.work.num_images
                    if (job.wants_previews or job.work.previews) and mine:
                        job._emit("preview", step=done, total_steps=total, images=mine)

            return self.engine.generate(works, on_step=on_step, on_preview=on_preview)  # type: ignore[call-arg]

        try:
            # Out of GPU memory: free it and retry in halves; a request that alone does not fit fails with 503.
            results = run_with_oom_retry(call, [job.work for job in batch], sizes=lambda work: work.num_images)
            if len(results) != len(batch) or any(len(r) != j.work.num_images for r, j in zip(results, batch)):
                raise RuntimeError("the engine returned images that do not match the requests")
        except _AllCancelled:
            for job in batch:
                if self._stopping:
                    self._finish(job, JobState.failed, self._stopped_error())
                else:
                    self._finish(job, JobState.cancelled, Cancelled("the job was cancelled"))
            return
        except Exception as exc:  # a failed batch fails each of its jobs with the reason
            logger.exception("batch of %d failed", len(batch))
            error = exc if isinstance(exc, ServiceError) else GenerationFailed(
                f"generation failed: {exc.__class__.__name__}: {exc}", reason="error")
            for job in batch:
                self._finish(job, JobState.failed, error)
            return
        finally:
            with self._cond:
                self._running = []
        elapsed = time.perf_counter() - started
        units = sum(job.cost() for job in batch)
        rate = elapsed / units
        self._seconds_per_unit = rate if self._seconds_per_unit is None else 0.7 * self._seconds_per_unit + 0.3 * rate
        if self.observer is not None:
            self.observer.observe_batch(sum(j.work.num_images for j in batch), batch[0].work.key.total_steps(), elapsed)
        for job, images in zip(batch, results):
            if job.cancel_requested:
                self._finish(job, JobState.cancelled, Cancelled("the job was cancelled"))
            else:
                self._finish(job, JobState.done, images)

    def _finish(self, job: Job, state: JobState, outcome: Any) -> None:
        with self._cond:
            if job.future.done():
                return
            job.state, job.finished = state, self.clock()
        job._emit("ended", state=state.value)
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)


class _AllCancelled(Exception):
    """Raised from the step callback to stop a batch whose every job was cancelled."""
