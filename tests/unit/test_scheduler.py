"""The scheduler against a fake engine: what it runs, in which batches, and how every job ends."""

import threading
import time

import pytest

from sdxl_bento.errors import Cancelled, DeadlineExceeded, GenerationFailed, Overloaded, ServiceError, ShuttingDown
from sdxl_bento.gpu.engine import BatchKey, Work
from sdxl_bento.gpu.scheduler import JobState, Scheduler

A = BatchKey(kind="txt2img", width=256, height=256, steps=4, guidance_scale=5.0, scheduler="euler")
B = BatchKey(kind="txt2img", width=512, height=256, steps=4, guidance_scale=5.0, scheduler="euler")


class FakeEngine:
    """Records each batch; holds until released, so tests control what is running."""

    def __init__(self, fail: Exception | None = None, hold: bool = False):
        self.batches: list[list[str]] = []
        self.fail = fail
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.started = threading.Event()

    def generate(self, works, on_step=None):
        self.batches.append([w.prompt for w in works])
        self.started.set()
        for step in range(1, 5):
            self.gate.wait(5)
            if on_step:
                on_step(step, 4)
        if self.fail:
            raise self.fail
        return [[f"{w.prompt}#{s}" for s in w.seeds] for w in works]


def work(prompt, key=A, n=1):
    return Work(key=key, prompt=prompt, negative_prompt="", seeds=list(range(n)))


@pytest.fixture
def make():
    made = []

    def _make(engine, **kw):
        s = Scheduler(engine, **{"max_batch_requests": 4, "max_batch_images": 8, "max_jobs": 8, **kw})
        made.append(s)
        s.start()
        return s

    yield _make
    for s in made:
        s.stop()


def test_compatible_waiting_requests_share_a_batch(make):
    engine = FakeEngine(hold=True)
    s = make(engine)
    first = s.submit([work("first")], timeout=10)[0]
    assert engine.started.wait(2)
    jobs = s.submit([work("a1"), work("b1", B), work("a2"), work("a3", n=7)], timeout=10)
    engine.gate.set()
    for job in [first, *jobs]:
        job.future.result(5)
    assert engine.batches[0] == ["first"]
    assert engine.batches[1] == ["a1", "a2"]  # a3 would pass 8 images; b1 has another size
    assert sorted(map(tuple, engine.batches[2:])) == [("a3",), ("b1",)]
    assert jobs[3].future.result() == [f"a3#{i}" for i in range(7)]
    assert all(job.state == JobState.done for job in jobs)


def test_batch_size_is_bounded_by_requests(make):
    engine = FakeEngine(hold=True)
    s = make(engine, max_batch_requests=2)
    s.submit([work("x")], timeout=10)
    engine.started.wait(2)
    jobs = s.submit([work(f"p{i}") for i in range(5)], timeout=10)
    engine.gate.set()
    [j.future.result(5) for j in jobs]
    assert [len(b) for b in engine.batches] == [1, 2, 2, 1]


def test_overload_is_refused_with_retry_after_and_nothing_is_lost(make):
    engine = FakeEngine(hold=True)
    s = make(engine, max_jobs=3)
    jobs = s.submit([work("a"), work("b"), work("c")], timeout=10)
    with pytest.raises(Overloaded) as info:
        s.submit([work("d")], timeout=10)
    assert info.value.status == 503 and int(info.value.headers()["Retry-After"]) >= 1
    engine.gate.set()
    assert [j.future.result(5) for j in jobs] == [["a#0"], ["b#0"], ["c#0"]]


def test_priority_then_deadline_then_arrival(make):
    engine = FakeEngine(hold=True)
    s = make(engine, max_batch_requests=1)
    s.submit([work("running")], timeout=10)
    engine.started.wait(2)
    low = s.submit([work("low")], timeout=10)[0]
    late = s.submit([work("high-late")], timeout=20, priority=5)[0]
    soon = s.submit([work("high-soon")], timeout=10, priority=5)[0]
    assert [s.position(j) for j in (soon, late, low)] == [0, 1, 2]
    engine.gate.set()
    low.future.result(5)
    assert engine.batches[1:] == [["high-soon"], ["high-late"], ["low"]]


def test_expired_work_is_never_started(make):
    engine = FakeEngine(hold=True)
    s = make(engine)
    s.submit([work("long")], timeout=10)
    engine.started.wait(2)
    doomed = s.submit([work("doomed", B)], timeout=0.05)[0]
    time.sleep(0.1)
    engine.gate.set()
    with pytest.raises(DeadlineExceeded):
        doomed.future.result(5)
    assert doomed.state == JobState.failed
    assert ["doomed"] not in engine.batches


def test_cancel_a_queued_job_and_a_running_one(make):
    engine = FakeEngine(hold=True)
    s = make(engine)
    running = s.submit([work("running")], timeout=10)[0]
    engine.started.wait(2)
    queued = s.submit([work("queued", B)], timeout=10)[0]
    assert s.cancel(queued) and s.cancel(running)
    with pytest.raises(Cancelled):
        queued.future.result(1)
    engine.gate.set()
    with pytest.raises(Cancelled):
        running.future.result(5)
    assert engine.batches == [["running"]]
    assert not s.cancel(running)  # already ended


def test_failed_batch_fails_each_job_with_the_reason(make):
    s = make(FakeEngine(fail=RuntimeError("CUDA error: boom")))
    jobs = s.submit([work("a"), work("b")], timeout=10)
    for job in jobs:
        with pytest.raises(GenerationFailed, match="boom"):
            job.future.result(5)
        assert job.state == JobState.failed


def test_progress_and_eta(make):
    engine = FakeEngine()
    s = make(engine)
    s.submit([work("warm")], timeout=10)[0].future.result(5)
    engine.gate.clear()
    engine.started.clear()
    job = s.submit([work("observed")], timeout=10)[0]
    engine.started.wait(2)
    assert job.state == JobState.running and s.eta(job) is not None
    engine.gate.set()
    job.future.result(5)
    assert (job.step, job.total_steps) == (4, 4)


class SteppedEngine:
    """Makes one step each time it is told to, so a test sees a batch part way."""

    def __init__(self):
        self.step = threading.Semaphore(0)
        self.started = threading.Event()

    def generate(self, works, on_step=None):
        self.started.set()
        for step in range(1, 5):
            self.step.acquire(timeout=5)
            on_step(step, 4)
        return [[None] * len(w.seeds) for w in works]


def test_eta_exists_from_the_first_job_after_a_start(make):
    """Seeded by the warm-up's pace before any batch has finished; the running batch then goes at its own."""
    engine = SteppedEngine()
    s = make(engine, max_batch_requests=1)
    running = s.submit([work("first")], timeout=30)[0]
    queued = s.submit([work("second", key=B)], timeout=30)[0]
    engine.started.wait(2)
    assert s.eta(running) is None  # nothing measured, no step made
    s.seed_rate(1e-6)  # seconds per step x pixel x image, as the warm-up measured
    assert s.eta(queued) == pytest.approx((4 * 256 * 256 + 4 * 512 * 256) * 1e-6, rel=0.01)
    engine.step.release()
    for _ in range(100):
        if running.step == 1:
            break
        time.sleep(0.01)
    time.sleep(0.2)
    first = s.eta(running)
    assert first is not None and 0.3 < first < 5  # ~3 more steps at the pace of the first (>= 0.2 s each)
    assert s.eta(queued) > first
    s.seed_rate(5.0)  # a pace once measured is kept
    assert s.eta(queued) < 60
    for _ in range(8):
        engine.step.release()
    running.future.result(5)
    queued.future.result(5)


def test_stop_fails_waiting_jobs_with_a_reason(make):
    engine = FakeEngine(hold=True)
    s = make(engine)
    s.submit([work("running")], timeout=10)
    engine.started.wait(2)
    waiting = s.submit([work("waiting", B)], timeout=10)[0]
    engine.gate.set()
    s.stop()
    if waiting.state == JobState.failed:
        with pytest.raises(ShuttingDown, match="shutdown"):
            waiting.future.result(1)
    else:
        assert waiting.state == JobState.done
    with pytest.raises(ShuttingDown):
        s.submit([work("late")], timeout=10)


def test_drain_closes_admission_lets_running_work_finish_then_fails_the_rest(make):
    """Graceful shutdown: after close() nothing new is admitted, admitted work goes on; at the end of the
    grace period stop(cancel_running=True) fails what is left with reason shutdown, at the next step."""
    engine = FakeEngine(hold=True)
    s = make(engine)
    running = s.submit([work("running")], timeout=10)[0]
    engine.started.wait(2)
    queued = s.submit([work("queued", B)], timeout=10)[0]
    s.close()
    with pytest.raises(ShuttingDown) as info:
        s.submit([work("new")], timeout=10)
    assert info.value.status == 503 and info.value.headers()["Retry-After"] == "30"
    s.stop(reason="shutdown", cancel_running=True)
    engine.gate.set()
    for job in (running, queued):
        with pytest.raises(ShuttingDown) as info:
            job.future.result(5)
        assert info.value.details["reason"] == "shutdown" and job.state == JobState.failed


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_aging_lets_a_low_tier_progress_under_constant_premium_load():
    """A free request (priority 0) waiting behind a stream of premium ones (priority 10) starts once it has
    waited long enough: 10 priority points per minute of waiting."""
    clock = FakeClock()
    s = Scheduler(FakeEngine(), max_batch_requests=1, max_jobs=100, aging_per_minute=10, clock=clock)
    free = s.submit([work("free", B)], timeout=3600, priority=0)[0]
    started = []
    for minute in range(5):
        clock.now += 30
        s.submit([work(f"premium{minute}")], timeout=3600, priority=10)
        with s._cond:
            batch = s._next_batch()
        started.append(batch[0].work.prompt)
        s._running = []
    assert started[0] == "premium0"  # fresh: premium first
    assert "free" in started          # after about a minute of waiting, free outranks a new premium request
    assert started.index("free") <= 2
    assert free.state == JobState.running


def test_without_aging_priority_is_strict():
    clock = FakeClock()
    s = Scheduler(FakeEngine(), max_batch_requests=1, max_jobs=100, aging_per_minute=0, clock=clock)
    s.submit([work("free", B)], timeout=3600, priority=0)
    started = []
    for minute in range(5):
        clock.now += 30
        s.submit([work(f"premium{minute}")], timeout=3600, priority=10)
        with s._cond:
            started.append(s._next_batch()[0].work.prompt)
        s._running = []
    assert "free" not in started


def hot(celsius):
    from sdxl_bento.gpu.thermal import GpuReading

    return [GpuReading(index=0, name="fake", temperature_c=celsius, utilization_pct=50, memory_used_bytes=0,
                       memory_total_bytes=1, power_w=None, sm_clock_mhz=None, mem_clock_mhz=None)]


def test_a_hot_gpu_gets_smaller_batches_then_a_pause_then_resumes(make):
    from sdxl_bento.gpu.thermal import StaticSource, Throttle

    source = StaticSource(hot(85))
    engine = FakeEngine(hold=True)
    s = make(engine, max_batch_requests=4, throttle=Throttle(source, interval_s=0))
    s.submit([work("first")], timeout=30)
    engine.started.wait(2)
    jobs = s.submit([work(f"p{i}") for i in range(4)], timeout=30)
    source.set(hot(95))  # paused: nothing new starts
    engine.gate.set()
    time.sleep(1.0)
    assert engine.batches == [["first"]] and all(j.state == JobState.queued for j in jobs)
    source.set(hot(80))  # cooler, but not below the resume threshold (78): slow, half-size batches
    [j.future.result(10) for j in jobs]
    assert engine.batches[1:] == [["p0", "p1"], ["p2", "p3"]]
    source.set(hot(70))  # below resume: full batches again
    more = s.submit([work(f"q{i}") for i in range(4)], timeout=30)
    [j.future.result(10) for j in more]
    assert engine.batches[-1] == ["q0", "q1", "q2", "q3"]


def test_vram_budget_splits_batches():
    from sdxl_bento.gpu.vram import MemoryModel, VramBudget

    model = MemoryModel(bytes_per_pixel_image=1.0, fixed_bytes=0)
    budget = VramBudget(256 * 256 * 3, model)  # three 256x256 images fit
    engine = FakeEngine()
    s = Scheduler(engine, max_batch_requests=8, max_batch_images=8, max_jobs=20, budget=budget)
    jobs = s.submit([work(f"p{i}") for i in range(5)], timeout=30)
    s.start()
    try:
        [j.future.result(5) for j in jobs]
    finally:
        s.stop()
    assert [len(b) for b in engine.batches] == [3, 2]


def test_out_of_memory_is_retried_in_halves_and_the_worker_survives(make):
    import torch

    class OomAbove1(FakeEngine):
        def generate(self, works, on_step=None):
            if sum(w.num_images for w in works) > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().generate(works, on_step)

    engine = OomAbove1()
    s = make(engine)
    jobs = s.submit([work(f"p{i}") for i in range(4)], timeout=30)
    assert [j.future.result(5) for j in jobs] == [[f"p{i}#0"] for i in range(4)]
    big = s.submit([work("big", n=2)], timeout=30)[0]
    with pytest.raises(ServiceError) as info:
        big.future.result(5)
    assert info.value.status == 503 and info.value.type == "out_of_memory"
    assert s.submit([work("after")], timeout=30)[0].future.result(5) == ["after#0"]


def test_work_for_the_loaded_checkpoint_goes_first_so_alternating_requests_do_not_thrash(make):
    """Alternating requests for two checkpoints: the loaded one's are batched first, then one swap."""
    import dataclasses

    loaded = {"model-a"}
    engine = FakeEngine(hold=True)
    s = make(engine, max_batch_requests=8, is_loaded=lambda tag: tag in loaded)
    s.submit([work("warm")], timeout=30)
    engine.started.wait(2)
    a_key, b_key = dataclasses.replace(A, model="model-a"), dataclasses.replace(A, model="model-b")
    # b arrives first: without the preference it would start, forcing a swap away from the loaded a
    jobs = s.submit([Work(key=b_key if i % 2 == 0 else a_key, prompt=f"{'ba'[i % 2]}{i}", negative_prompt="",
                          seeds=[0]) for i in range(6)], timeout=30)
    engine.gate.set()
    [j.future.result(5) for j in jobs]
    assert engine.batches[1:] == [["a1", "a3", "a5"], ["b0", "b2", "b4"]]
