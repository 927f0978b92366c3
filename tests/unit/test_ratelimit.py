"""Token buckets and job slots: in memory (buckets with a fake clock), then against a real redis-server
(no mocks), then through a Redis outage and back, and a slot holder that dies."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdxl_bento.http.ratelimit import Decision, JobSlots, Limit, RateLimiter

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH (CI installs it)")


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(port: int, workdir) -> subprocess.Popen:
    import redis

    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--daemonize", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.2, socket_timeout=0.2)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                if client.ping():
                    return proc
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"redis-server on port {port} did not start")
                time.sleep(0.02)
    finally:
        client.close()


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (CI installs it)")
    port = _free_port()
    proc = _start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    _stop(proc)


@pytest.fixture
def prefix() -> str:
    return f"test-rl:{uuid.uuid4().hex[:8]}:"


def _hammer(limiters: list[RateLimiter], threads_per_limiter: int, calls: int, items) -> int:
    allowed = [0]
    lock = threading.Lock()
    start = threading.Barrier(len(limiters) * threads_per_limiter)

    def work(rl: RateLimiter) -> None:
        start.wait()
        n = sum(rl.take(items).allowed for _ in range(calls))
        with lock:
            allowed[0] += n

    threads = [threading.Thread(target=work, args=(rl,)) for rl in limiters for _ in range(threads_per_limiter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return allowed[0]


# ---------------------------------------------------------------------------------------- memory

def test_memory_burst_then_refusal_and_headers():
    rl = RateLimiter(clock=FakeClock())
    lim = Limit(per_minute=60, burst=5)  # one token per second
    got = [rl.take([("k:req", lim, 1)]) for _ in range(5)]
    assert [d.allowed for d in got] == [True] * 5
    assert [d.remaining for d in got] == [4, 3, 2, 1, 0]
    assert got[0].headers() == {"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "4", "X-RateLimit-Reset": "1"}
    assert got[-1].reset_s == pytest.approx(5.0) and got[-1].retry_after_s == 0

    refused = rl.take([("k:req", lim, 1)])
    assert refused == Decision(allowed=False, limit=5, remaining=0, reset_s=5.0, retry_after_s=1.0)
    assert refused.headers() == {"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
                                 "X-RateLimit-Reset": "5", "Retry-After": "1"}
    assert rl.backend == "memory" and not rl.degraded and rl.redis_failures == 0


def test_memory_refills_with_the_clock_and_ignores_a_clock_stepping_back():
    clock = FakeClock()
    rl = RateLimiter(clock=clock)
    lim = Limit(per_minute=60, burst=3)
    for _ in range(3):
        assert rl.take([("k", lim, 1)]).allowed
    clock.t += 2.5  # 2.5 tokens back
    assert rl.take([("k", lim, 1)]).allowed
    assert rl.take([("k", lim, 1)]).allowed
    d = rl.take([("k", lim, 1)])
    assert not d.allowed and d.retry_after_s == pytest.approx(0.5) and d.headers()["Retry-After"] == "1"
    assert d.reset_s == pytest.approx(2.5) and d.headers()["X-RateLimit-Reset"] == "3"

    clock.t -= 100  # a clock stepping back refills nothing, and is not credited again later
    assert not rl.take([("k", lim, 1)]).allowed
    clock.t += 100.5  # back where it was, +0.5 s: 1 token
    assert rl.take([("k", lim, 1)]).allowed
    assert not rl.take([("k", lim, 1)]).allowed

    clock.t += 1000  # refill caps at burst
    assert rl.take([("k", lim, 0)]) == Decision(allowed=True, limit=3, remaining=3, reset_s=0.0, retry_after_s=0.0)


def test_memory_all_or_nothing_across_buckets():
    rl = RateLimiter(clock=FakeClock())
    req, img = Limit(per_minute=60, burst=10), Limit(per_minute=60, burst=4)
    d = rl.take([("k:req", req, 1), ("k:img", img, 4)])
    # the image bucket runs out first, so it is the one reported
    assert d.allowed and (d.limit, d.remaining) == (4, 0) and d.reset_s == pytest.approx(4.0)

    d = rl.take([("k:req", req, 1), ("k:img", img, 2)])
    assert not d.allowed and (d.limit, d.remaining) == (4, 0) and d.retry_after_s == pytest.approx(2.0)
    # the request token was not spent by the refused call: 9 left, 8 after this one
    assert rl.take([("k:req", req, 1)]).remaining == 8


def test_memory_cost_above_burst_is_never_allowed():
    clock = FakeClock()
    rl = RateLimiter(clock=clock)
    req, img = Limit(per_minute=60, burst=10), Limit(per_minute=30, burst=4)
    d = rl.take([("k:req", req, 1), ("k:img", img, 5)])
    # retry_after is the image bucket's time to fill from empty: 4 tokens at 0.5/s
    assert not d.allowed and d.limit == 4 and d.remaining == 4 and d.retry_after_s == pytest.approx(8.0)
    assert d.headers()["Retry-After"] == "8"
    clock.t += 10_000
    assert not rl.take([("k:img", img, 5)]).allowed
    assert rl.take([("k:req", req, 1)]).remaining == 9  # nothing was charged


def test_memory_is_thread_safe():
    rl = RateLimiter(clock=FakeClock())
    assert _hammer([rl], 8, 50, [("k", Limit(per_minute=60, burst=100), 1)]) == 100


def test_memory_forgets_full_buckets_without_changing_answers():
    clock = FakeClock()
    rl = RateLimiter(clock=clock)
    lim = Limit(per_minute=60, burst=2)
    for i in range(3000):
        rl.take([(f"key{i}", lim, 1)])
    assert not rl.take([("key0", lim, 2)]).allowed  # 1 token left: the bucket is still remembered
    clock.t += 10
    for i in range(3000):
        rl.take([(f"other{i}", lim, 1)])
    assert len(rl._memory._state) < 6000  # full buckets were dropped
    assert rl.take([("key0", lim, 2)]).allowed


def test_bad_arguments_are_refused():
    rl = RateLimiter()
    lim = Limit(per_minute=1, burst=1)
    with pytest.raises(ValueError):
        rl.take([])
    with pytest.raises(ValueError):
        rl.take([("a", lim, 1), ("a", lim, 1)])
    with pytest.raises(ValueError):
        rl.take([("a", lim, -1)])
    with pytest.raises(ValueError):
        Limit(per_minute=0, burst=1)
    with pytest.raises(ValueError):
        Limit(per_minute=1, burst=0)


# ----------------------------------------------------------------------------------------- redis

@needs_redis
def test_redis_burst_refusal_refill_and_ttl(redis_url, prefix):
    import redis

    rl = RateLimiter(redis_url, prefix=prefix, clock=lambda: 0.0)  # the server's clock is used, not this one
    lim = Limit(per_minute=60, burst=5)
    got = [rl.take([("k:req", lim, 1)]) for _ in range(5)]
    assert [d.allowed for d in got] == [True] * 5 and [d.remaining for d in got] == [4, 3, 2, 1, 0]
    d = rl.take([("k:req", lim, 1)])
    assert not d.allowed and (d.limit, d.remaining) == (5, 0)
    assert 0.9 < d.retry_after_s <= 1.0 and 4.5 < d.reset_s <= 5.0
    assert d.headers() == {"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
                           "X-RateLimit-Reset": "5", "Retry-After": "1"}
    assert rl.backend == "redis" and not rl.degraded

    fast = Limit(per_minute=600, burst=2)  # 10 tokens per second
    assert rl.take([("k:fast", fast, 2)]).allowed
    assert not rl.take([("k:fast", fast, 1)]).allowed
    time.sleep(0.25)
    assert rl.take([("k:fast", fast, 2)]).allowed

    client = redis.Redis.from_url(redis_url)
    try:
        assert set(client.scan_iter(prefix + "*")) == {f"{prefix}k:req".encode(), f"{prefix}k:fast".encode()}
        ttl = client.pttl(prefix + "k:req")
        assert 5000 < ttl <= 6000  # time to refill fully (5 s) plus margin
    finally:
        client.close()
        rl.close()


@needs_redis
def test_redis_all_or_nothing_and_cost_above_burst(redis_url, prefix):
    rl = RateLimiter(redis_url, prefix=prefix)
    req, img = Limit(per_minute=0.001, burst=10), Limit(per_minute=0.001, burst=4)
    d = rl.take([("k:req", req, 1), ("k:img", img, 4)])
    assert d.allowed and (d.limit, d.remaining) == (4, 0)
    d = rl.take([("k:req", req, 1), ("k:img", img, 1)])
    assert not d.allowed and (d.limit, d.remaining) == (4, 0) and d.retry_after_s > 50_000
    assert rl.take([("k:req", req, 1)]).remaining == 8  # 9 left before: the refused call spent nothing

    d = rl.take([("k:req", req, 1), ("k:big", Limit(per_minute=60, burst=4), 5)])
    assert not d.allowed and d.limit == 4 and d.retry_after_s == pytest.approx(4.0)
    assert rl.take([("k:req", req, 1)]).remaining == 7  # 8 before: nothing charged
    assert rl.backend == "redis"
    rl.close()


@needs_redis
def test_redis_two_limiters_share_one_limit_exactly(redis_url, prefix):
    # two workers / replicas, with clocks that disagree by 30 years: only the Redis server's counts
    a = RateLimiter(redis_url, prefix=prefix, clock=lambda: 0.0)
    b = RateLimiter(redis_url, prefix=prefix, clock=lambda: 1e9)
    lim = Limit(per_minute=0.001, burst=10)
    results = [(a if i % 2 else b).take([("k", lim, 1)]).allowed for i in range(20)]
    assert sum(results) == 10 and results[:10] == [True] * 10

    lim = Limit(per_minute=0.001, burst=50)
    assert _hammer([a, b], 4, 25, [("k:threads:req", Limit(per_minute=0.001, burst=1000), 1),
                                   ("k:threads:img", lim, 1)]) == 50
    assert a.backend == b.backend == "redis" and a.redis_failures == b.redis_failures == 0
    a.close()
    b.close()


# ---------------------------------------------------------------------------------------- outage

@needs_redis
def test_redis_outage_falls_back_to_memory_and_comes_back(tmp_path, prefix, caplog):
    port = _free_port()
    proc = _start_redis(port, tmp_path)
    calls = []
    rl = RateLimiter(f"redis://127.0.0.1:{port}/0", prefix=prefix, retry_interval_s=0.2, socket_timeout_s=0.5,
                     on_redis_failure=lambda: calls.append(1))
    lim = Limit(per_minute=0.001, burst=3)
    try:
        assert rl.take([("k", lim, 1)]).allowed and rl.backend == "redis" and not rl.degraded

        _stop(proc)
        caplog.set_level(logging.INFO, logger="sdxl_bento.http.ratelimit")
        t0 = time.monotonic()
        # local buckets start full: 3 allowed, then refused, and no exception
        assert [rl.take([("k", lim, 1)]).allowed for _ in range(4)] == [True, True, True, False]
        assert rl.backend == "memory" and rl.degraded and rl.redis_failures == 1 and len(calls) == 1
        while time.monotonic() - t0 < 0.5:
            assert not rl.take([("k", lim, 1)]).allowed and rl.degraded
            time.sleep(0.01)
        # Redis was re-tried at most every 0.2 s, and the outage logged once
        assert 2 <= rl.redis_failures <= 4 and len(calls) == rl.redis_failures  # one call per failed Redis call
        warnings = [r for r in caplog.records if r.name == "sdxl_bento.http.ratelimit" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()

        proc = _start_redis(port, tmp_path)  # a fresh server: empty script cache, stale pooled connection
        time.sleep(0.25)
        d = rl.take([("k", lim, 1)])
        assert rl.backend == "redis" and not rl.degraded
        assert d.allowed and d.remaining == 2  # the new server has no state: a full bucket
        assert any("back" in r.getMessage() for r in caplog.records if r.name == "sdxl_bento.http.ratelimit")
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        assert len(calls) == rl.redis_failures  # none since Redis came back
    finally:
        rl.close()
        _stop(proc)


def test_a_failing_failure_callback_does_not_fail_the_call(caplog):
    def broken() -> None:
        raise RuntimeError("metric down")

    rl = RateLimiter(f"redis://127.0.0.1:{_free_port()}/0", on_redis_failure=broken)  # nothing listens there
    assert rl.take([("k", Limit(per_minute=60, burst=1), 1)]).allowed
    assert rl.degraded and rl.redis_failures == 1 and "on_redis_failure raised" in caplog.text
    rl.close()


# ------------------------------------------------------------------------------------------- slots

def _peak(slots: list[JobSlots], name: str, limit: int, threads: int, rounds: int) -> tuple[int, int]:
    """Threads that take a slot, hold it briefly and give it back: (most held at once, slots taken)."""
    lock = threading.Lock()
    state = {"now": 0, "peak": 0, "taken": 0}
    start = threading.Barrier(threads)

    def work(s: JobSlots) -> None:
        start.wait()
        for _ in range(rounds):
            lease = s.acquire(name, limit)
            if lease is None:
                continue
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
                state["taken"] += 1
            time.sleep(0.001)
            with lock:
                state["now"] -= 1
            s.release(lease)

    pool = [threading.Thread(target=work, args=(slots[i % len(slots)],)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return state["peak"], state["taken"]


def test_slots_in_memory():
    slots = JobSlots(None)
    a, b = slots.acquire("k", 2), slots.acquire("k", 2)
    assert a and b and a != b and slots.acquire("k", 2) is None and slots.held("k") == 2
    assert slots.acquire("other", 1) is not None and slots.held("other") == 1
    slots.release(a)
    slots.release(a)  # twice, or an unknown id: counted once, or not at all
    slots.release("no-such-lease")
    assert slots.held("k") == 1 and slots.acquire("k", 2) is not None and slots.acquire("k", 2) is None
    assert not slots.degraded and "leases=3" in repr(slots)
    with pytest.raises(ValueError):
        JobSlots(None, lease_s=0)


def test_slots_in_memory_are_thread_safe():
    slots = JobSlots(None)
    peak, taken = _peak([slots], "k", 3, threads=8, rounds=100)
    assert peak == 3 and taken > 3 and slots.held("k") == 0


@needs_redis
def test_slots_are_shared_through_redis(redis_url, prefix):
    import redis

    a, b = JobSlots(redis_url, prefix=prefix), JobSlots(redis_url, prefix=prefix)  # two workers or replicas
    client = redis.Redis.from_url(redis_url)
    try:
        la, lb = a.acquire("k", 2), b.acquire("k", 2)
        assert la and lb and a.acquire("k", 2) is None and b.acquire("k", 2) is None
        assert a.held("k") == b.held("k") == 2 and a.acquire("other", 2) is not None
        members = dict(client.zrange(prefix + "k", 0, -1, withscores=True))
        server_ms = client.time()[0] * 1000
        assert set(members) == {la.encode(), lb.encode()}
        assert all(server_ms + 55_000 < score <= server_ms + 61_000 for score in members.values())
        assert 55_000 < client.pttl(prefix + "k") <= 60_000

        b.release(la)  # not b's lease: nothing happens
        assert a.held("k") == 2
        a.release(la)
        assert b.held("k") == 1 and (lc := b.acquire("k", 2)) and a.acquire("k", 2) is None
        b.release(lb)
        b.release(lc)
        assert a.held("k") == 0 and not a.degraded and a.redis_failures == b.redis_failures == 0

        peak, taken = _peak([a, b], "busy", 3, threads=6, rounds=40)
        assert peak <= 3 and taken > 3 and a.held("busy") == 0
    finally:
        a.close()  # gives back its "other" lease
        b.close()
        assert client.zcard(prefix + "other") == 0
        client.close()


HOLDER = """
import sys, time
from sdxl_bento.http.ratelimit import JobSlots
slots = JobSlots(sys.argv[1], prefix=sys.argv[2], lease_s=1.0)
print(slots.acquire("k", 1), flush=True)
time.sleep(60)
"""


@needs_redis
def test_a_dead_holders_slots_come_free_after_the_lease(redis_url, prefix):
    root = Path(__file__).resolve().parents[2]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, redis_url, prefix], stdout=subprocess.PIPE, text=True,
                              cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    other = JobSlots(redis_url, prefix=prefix, lease_s=1.0)
    try:
        assert holder.stdout.readline().strip() not in ("", "None")
        time.sleep(2.5)  # two and a half leases: still held, because the holder's thread extends it
        assert other.acquire("k", 1) is None and other.held("k") == 1
        holder.kill()  # SIGKILL: no release, no clean-up
        holder.wait(timeout=10)
        died = time.monotonic()
        while (lease := other.acquire("k", 1)) is None:
            assert time.monotonic() - died < 3, "the dead holder's slot never came free"
            time.sleep(0.05)
        assert time.monotonic() - died <= 1.5  # at most one lease (1 s) after its last extension
        other.release(lease)
    finally:
        holder.kill()
        holder.wait(timeout=10)
        other.close()


@needs_redis
def test_slots_through_a_redis_outage(tmp_path, prefix, caplog):
    port = _free_port()
    proc = _start_redis(port, tmp_path)
    calls = []
    slots = JobSlots(f"redis://127.0.0.1:{port}/0", prefix=prefix, retry_interval_s=0.2,
                     on_redis_failure=lambda: calls.append(1))
    try:
        shared = slots.acquire("k", 2)
        assert shared and not slots.degraded

        _stop(proc)
        caplog.set_level(logging.INFO, logger="sdxl_bento.http.ratelimit")
        local = slots.acquire("k", 2)  # counted here now, with the lease still held from Redis
        assert local and slots.degraded and slots.redis_failures == len(calls) == 1
        assert slots.acquire("k", 2) is None and slots.held("k") == 2
        slots.release(shared)  # taken in Redis, released there: fails quietly, and lapses unextended
        assert slots.held("k") == 1
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "job slots: Redis unreachable" in warnings[0].getMessage()

        proc = _start_redis(port, tmp_path)  # a fresh, empty server
        time.sleep(0.25)
        again = slots.acquire("k", 2)  # in Redis again; the lease taken in memory still counts
        assert again and not slots.degraded and slots.acquire("k", 2) is None
        assert slots.held("k") == 2
        slots.release(local)  # released in memory, where it was taken
        assert slots.held("k") == 1 and slots.acquire("k", 2) is not None
        assert len(calls) == slots.redis_failures and any("back" in r.getMessage() for r in caplog.records)
    finally:
        slots.close()
        _stop(proc)
