"""Per-API-key limits: token buckets (requests and images per minute) and job slots (requests in progress).

Why: the service has one GPU, and one greedy key could hold it for everyone. A token bucket per key
and per resource lets every key burst a little, then caps it at its fair rate.

Why Redis: the gateway runs several workers and replicas. Buckets kept in-process would give each
of them a whole limit; in Redis, one Lua script refills, checks and charges all buckets of a call at
once (all or nothing), using the Redis server's clock, so the limit holds exactly across processes
and machines whatever their clocks say.

Why fail-open: if Redis is unreachable, refusing every request (fail-closed) would turn a cache
outage into a full outage. Instead each process falls back to its own in-process buckets, which
still bound a key to `workers x limit`, logs the outage once, and retries Redis every few seconds.
Each failed Redis call is reported to `on_redis_failure` (the service counts them in a metric), so an
outage shows on a dashboard, not only in the log.

`JobSlots` caps the requests a key has in progress the same way: leases in Redis, shared by every
process, that lapse when their process dies; counted in-process when Redis is not there.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

_EPS = 1e-9  # float slack: a bucket holding 0.9999999999 tokens after an exact refill still pays 1
_TTL_MARGIN_MS = 1000
_TTL_CAP_MS = 366 * 86400 * 1000
_SWEEP_MIN = 1024

Item = tuple[str, "Limit", int]

# KEYS[i]: bucket i; ARGV[3i-2], ARGV[3i-1], ARGV[3i]: its refill rate (tokens/s), burst and cost.
# Returns {allowed (1/0), tokens of bucket 1 after the call, ...}; floats as strings, since Redis
# truncates Lua numbers to integers on return.
_LUA = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #KEYS
local tokens, stamps = {}, {}
local ok = 1
for i = 1, n do
  local rate = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local v = redis.call('HMGET', KEYS[i], 't', 'ts')
  local tok, ts = tonumber(v[1]), tonumber(v[2])
  if tok == nil or ts == nil then tok, ts = burst, now end
  local elapsed = now - ts
  if elapsed < 0 then elapsed = 0 end
  tok = math.min(burst, tok + elapsed * rate)
  tokens[i] = tok
  stamps[i] = math.max(ts, now)
  if cost > burst or tok + 1e-9 < cost then ok = 0 end
end
local out = {ok}
for i = 1, n do
  local rate = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  local tok = tokens[i]
  if ok == 1 then tok = math.max(0, tok - tonumber(ARGV[3 * i])) end
  redis.call('HSET', KEYS[i], 't', string.format('%.17g', tok), 'ts', string.format('%.17g', stamps[i]))
  local ttl = math.min(math.ceil((burst - tok) / rate * 1000) + 1000, 31622400000)
  redis.call('PEXPIRE', KEYS[i], string.format('%d', ttl))
  out[i + 1] = string.format('%.17g', tok)
end
return out
"""


@dataclass(frozen=True)
class Limit:
    per_minute: float  # refill rate, tokens per minute
    burst: int  # bucket capacity (a full bucket at start)

    def __post_init__(self) -> None:
        if not self.per_minute > 0 or not math.isfinite(self.per_minute):
            raise ValueError(f"per_minute must be a positive finite number, not {self.per_minute!r}")
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, not {self.burst!r}")

    @property
    def per_second(self) -> float:
        return self.per_minute / 60.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int  # capacity of the most restrictive bucket (X-RateLimit-Limit)
    remaining: int  # whole tokens left in that bucket after this call (X-RateLimit-Remaining)
    reset_s: float  # seconds until that bucket is full again (X-RateLimit-Reset)
    retry_after_s: float  # when refused: seconds until the request would be allowed; 0 when allowed

    def headers(self) -> dict[str, str]:
        h = {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
             "X-RateLimit-Reset": str(_ceil(self.reset_s))}
        if not self.allowed:
            h["Retry-After"] = str(max(1, _ceil(self.retry_after_s)))
        return h


def _ceil(x: float) -> int:
    return math.ceil(round(x, 6))  # 6.0000000001 s of float noise is 6 s, not 7


def _wait_s(limit: Limit, tokens: float, cost: int) -> float:
    """Seconds until a bucket holding `tokens` can pay `cost`. A cost above the burst never fits;
    its wait is then the time to fill the bucket from empty (burst / rate): finite, for Retry-After."""
    if cost > limit.burst:
        return limit.burst / limit.per_second
    return max(0.0, cost - tokens) / limit.per_second if tokens + _EPS < cost else 0.0


def _decide(items: Sequence[Item], tokens: Sequence[float], allowed: bool) -> Decision:
    """The decision for `items` whose buckets hold `tokens` after the call (charged when allowed).

    The bucket reported in the headers is the most restrictive one: when refused, the one with the
    longest wait; when allowed, the one that would run out first (fewest further calls of this cost)."""
    waits = [_wait_s(lim, tok, cost) for (_, lim, cost), tok in zip(items, tokens)]
    if allowed:
        i = min(range(len(items)), key=lambda j: tokens[j] / items[j][2] if items[j][2] else math.inf)
    else:
        i = max(range(len(items)), key=lambda j: waits[j])
    _, lim, _ = items[i]
    tok = tokens[i]
    return Decision(allowed=allowed, limit=lim.burst, remaining=max(0, math.floor(tok + _EPS)),
                    reset_s=max(0.0, lim.burst - tok) / lim.per_second,
                    retry_after_s=0.0 if allowed else max(waits))


class _MemoryBuckets:
    """In-process buckets under one lock: name -> (tokens, timestamp, rate per second, burst)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, float, float, int]] = {}
        self._sweep_at = _SWEEP_MIN

    def take(self, items: Sequence[Item]) -> Decision:
        with self._lock:
            now = self._clock()
            tokens: list[float] = []
            stamps: list[float] = []
            for name, lim, _ in items:
                tok, ts, _, _ = self._state.get(name, (float(lim.burst), now, 0.0, 0))
                # A clock that steps back refills nothing and never moves the stamp back.
                tokens.append(min(float(lim.burst), tok + max(0.0, now - ts) * lim.per_second))
                stamps.append(max(ts, now))
            allowed = all(cost <= lim.burst and tok + _EPS >= cost for (_, lim, cost), tok in zip(items, tokens))
            if allowed:
                tokens = [max(0.0, tok - cost) for (_, _, cost), tok in zip(items, tokens)]
            for (name, lim, _), tok, ts in zip(items, tokens, stamps):
                self._state[name] = (tok, ts, lim.per_second, lim.burst)
            if len(self._state) > self._sweep_at:
                self._sweep(now)
            return _decide(items, tokens, allowed)

    def _sweep(self, now: float) -> None:
        """Forget buckets that are full again: a missing bucket starts full, so nothing changes."""
        self._state = {name: st for name, st in self._state.items()
                       if st[0] + max(0.0, now - st[1]) * st[2] < st[3]}
        self._sweep_at = max(_SWEEP_MIN, 2 * len(self._state))


class _Outage:
    """Whether one Redis client is to be used: after a failed call, it is tried again once per interval
    (whatever the threads), the outage is logged once, and ``on_failure`` hears of every failed call."""

    def __init__(self, who: str, fallback: str, back: str, retry_interval_s: float,
                 on_failure: Optional[Callable[[], None]]) -> None:
        self._who, self._fallback, self._back = who, fallback, back
        self._retry_interval_s = retry_interval_s
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self.degraded = False
        self.failures = 0
        self._next_try = 0.0  # time.monotonic() before which a degraded client does not try Redis

    def should_try(self) -> bool:
        with self._lock:
            if not self.degraded:
                return True
            now = time.monotonic()
            if now < self._next_try:
                return False
            self._next_try = now + self._retry_interval_s  # one probe per interval
            return True

    def failed(self, e: Exception) -> None:
        with self._lock:
            self.failures += 1
            self._next_try = time.monotonic() + self._retry_interval_s
            first = not self.degraded
            self.degraded = True
        if first:
            logger.warning("%s: Redis unreachable (%s: %s); %s, retrying every %.1f s", self._who,
                           type(e).__name__, e, self._fallback, self._retry_interval_s)
        if self._on_failure is not None:
            try:
                self._on_failure()
            except Exception:  # a metric that fails must not fail the request
                logger.exception("%s: on_redis_failure raised", self._who)

    def succeeded(self) -> None:
        with self._lock:
            back, self.degraded = self.degraded, False
        if back:
            logger.info("%s: Redis is back; %s", self._who, self._back)


class _RedisBacked:
    """What a Redis-backed counter tells ``/metrics`` about its Redis."""

    _outage: _Outage

    @property
    def degraded(self) -> bool:
        """True while a Redis URL is configured but Redis is unreachable (counting in this process meanwhile)."""
        return self._outage.degraded

    @property
    def redis_failures(self) -> int:
        """Redis calls that failed so far."""
        return self._outage.failures


def _redis_client(redis_url: str, socket_timeout_s: float) -> tuple[redis.Redis, tuple[type[Exception], ...]]:
    import redis as redis_mod
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # One immediate retry re-dials a pooled connection that went stale (Redis restarted); anything
    # longer would only delay the fallback.
    client = redis_mod.Redis.from_url(redis_url, socket_timeout=socket_timeout_s,
                                      socket_connect_timeout=socket_timeout_s, retry=Retry(NoBackoff(), 1))
    return client, (redis_mod.RedisError, OSError)


class RateLimiter(_RedisBacked):
    """All-or-nothing token buckets, in Redis when `redis_url` is given, else in this process.

    `take` never raises because Redis is down: it answers from the in-process buckets meanwhile, and
    calls `on_redis_failure` (a metric, say) once per failed Redis call."""

    def __init__(self, redis_url: Optional[str] = None, *, prefix: str = "sdxl-bento:rl:",
                 clock: Callable[[], float] = time.time, retry_interval_s: float = 5.0,
                 socket_timeout_s: float = 0.5, on_redis_failure: Optional[Callable[[], None]] = None) -> None:
        self._prefix = prefix
        self._memory = _MemoryBuckets(clock)
        self._outage = _Outage("rate limiter", "using in-process limits", "limits are shared again",
                               retry_interval_s, on_redis_failure)
        self._last_backend = "redis" if redis_url else "memory"
        self._redis: Optional[redis.Redis] = None
        if redis_url:
            self._redis, self._redis_errors = _redis_client(redis_url, socket_timeout_s)
            self._script = self._redis.register_script(_LUA)

    @property
    def backend(self) -> str:
        """"redis" or "memory": what answered the last call."""
        return self._last_backend

    def take(self, items: list[tuple[str, Limit, int]]) -> Decision:
        """Charge `cost` tokens from every bucket, or none if any lacks them.

        A cost larger than a bucket's burst can never pass: the call is refused, with a retry_after
        of that bucket's time to fill from empty (callers should reject such requests up front)."""
        if not items:
            raise ValueError("take() needs at least one bucket")
        names = [name for name, _, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"bucket named twice in one call: {names}")
        for name, lim, cost in items:
            if cost < 0:
                raise ValueError(f"negative cost {cost} for bucket {name!r}")
        if self._redis is not None and self._outage.should_try():
            try:
                out = self._script(keys=[self._prefix + n for n in names],
                                   args=[a for _, lim, cost in items for a in (repr(lim.per_second), lim.burst, cost)])
            except self._redis_errors as e:
                self._outage.failed(e)
            else:
                self._outage.succeeded()
                self._last_backend = "redis"
                return _decide(items, [float(x) for x in out[1:]], int(out[0]) == 1)
        self._last_backend = "memory"
        return self._memory.take(items)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        self._outage.degraded = False


# -- concurrent jobs --------------------------------------------------------------------------------

# KEYS[1]: the key's sorted set (member: lease id, score: expiry in ms of the Redis clock).
# ARGV: lease id, limit, lease ms, leases this process holds outside Redis (taken during an outage).
_ACQUIRE = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) + tonumber(ARGV[4]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""

# KEYS[1]: a key's sorted set; ARGV: lease ms, then the lease ids to extend. Expired leases are dropped
# first, and XX never adds one back: a lease that lapsed (or was released meanwhile) stays gone.
_REFRESH = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i]) end
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 0
"""

_HELD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


class JobSlots(_RedisBacked):
    """Requests in progress per key, capped by the tier's ``max_concurrent_jobs``, across processes.

    Why Redis: counted in each process, N workers or replicas would give a key N times its cap. Each
    slot is a lease in one sorted set per key (member: lease id, score: expiry), taken atomically by a
    Lua script (drop expired, count, add) on the Redis clock. One daemon thread extends the leases this
    process holds every ``lease_s / 3``; a process that dies stops extending, and its slots come free
    ``lease_s`` later instead of never.

    Why fail-open, as ``RateLimiter``: without Redis (no URL, or unreachable) slots are counted in this
    process (``degraded`` while Redis is down), so a key is held to ``processes x limit`` rather than
    refused. A lease is released where it was taken: the lease id says which.
    """

    def __init__(self, redis_url: Optional[str], *, lease_s: float = 60.0,
                 on_redis_failure: Optional[Callable[[], None]] = None, prefix: str = "sdxl-bento:slots:",
                 retry_interval_s: float = 5.0, socket_timeout_s: float = 0.5) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s must be above 0, not {lease_s!r}")
        self.lease_s = lease_s
        self._lease_ms = max(1, round(lease_s * 1000))
        self._prefix = prefix
        self._lock = threading.Lock()
        self._leases: dict[str, tuple[str, bool]] = {}  # lease id -> (key name, in Redis)
        self._local: Counter[str] = Counter()  # key name -> leases held outside Redis
        self._outage = _Outage("job slots", "counting jobs in this process", "slots are shared again",
                               retry_interval_s, on_redis_failure)
        self._redis: Optional[redis.Redis] = None
        self._stop = threading.Event()
        self._refresher: Optional[threading.Thread] = None
        if redis_url:
            self._redis, self._redis_errors = _redis_client(redis_url, socket_timeout_s)
            self._acquire = self._redis.register_script(_ACQUIRE)
            self._refresh = self._redis.register_script(_REFRESH)
            self._held = self._redis.register_script(_HELD)

    def __repr__(self) -> str:
        return f"JobSlots(redis={self._redis is not None}, leases={len(self._leases)}, degraded={self.degraded})"

    def acquire(self, name: str, limit: int) -> Optional[str]:
        """A lease id for one more request of key ``name``, or None when it already holds ``limit``."""
        lease = uuid.uuid4().hex
        if self._redis is not None and self._outage.should_try():
            with self._lock:
                outside = self._local[name]
            try:
                ok = self._acquire(keys=[self._prefix + name], args=[lease, limit, self._lease_ms, outside])
            except self._redis_errors as e:
                self._outage.failed(e)
            else:
                self._outage.succeeded()
                if not int(ok):
                    return None
                with self._lock:
                    self._leases[lease] = (name, True)
                    self._start_refresher()
                return lease
        with self._lock:
            if sum(1 for n, _ in self._leases.values() if n == name) >= limit:
                return None
            self._leases[lease] = (name, False)
            self._local[name] += 1
        return lease

    def release(self, lease_id: str) -> None:
        """Give the slot back; an unknown or already released lease id changes nothing."""
        with self._lock:
            found = self._leases.pop(lease_id, None)
            if found is None:
                return
            name, in_redis = found
            if not in_redis:
                self._local[name] -= 1
                if self._local[name] <= 0:
                    del self._local[name]
                return
        if self._redis is not None and self._outage.should_try():
            try:
                self._redis.zrem(self._prefix + name, lease_id)  # one command: atomic as it is
            except self._redis_errors as e:
                self._outage.failed(e)  # no longer extended: it lapses within lease_s
            else:
                self._outage.succeeded()

    def held(self, name: str) -> int:
        """Leases of key ``name``: in Redis (every process) plus this process's own outside it; this
        process's alone while Redis is unreachable."""
        with self._lock:
            mine = sum(1 for n, _ in self._leases.values() if n == name)
            outside = self._local[name]
        if self._redis is not None and self._outage.should_try():
            try:
                shared = int(self._held(keys=[self._prefix + name]))
            except self._redis_errors as e:
                self._outage.failed(e)
            else:
                self._outage.succeeded()
                return shared + outside
        return mine

    def close(self) -> None:
        """Stop extending leases and give back this process's leases in Redis."""
        self._stop.set()
        if self._refresher is not None and self._refresher is not threading.current_thread():
            self._refresher.join(timeout=5)
        with self._lock:
            in_redis = [(lease, name) for lease, (name, r) in self._leases.items() if r]
        if self._redis is not None:
            for lease, name in in_redis:
                self.release(lease)
            self._redis.close()
            self._redis = None

    def _start_refresher(self) -> None:
        """Under ``_lock``: the refresh thread, started with the first lease taken in Redis (and again if it
        is gone: after a fork, the parent's thread does not exist in the child)."""
        if (self._refresher is None or not self._refresher.is_alive()) and not self._stop.is_set():
            self._refresher = threading.Thread(target=self._refresh_loop, name="job-slots-refresh", daemon=True)
            self._refresher.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            self._extend()

    def _extend(self) -> None:
        """Extend every lease this process holds in Redis by ``lease_s``."""
        with self._lock:
            by_name: dict[str, list[str]] = {}
            for lease, (name, in_redis) in self._leases.items():
                if in_redis:
                    by_name.setdefault(name, []).append(lease)
        if self._redis is None or not by_name or not self._outage.should_try():
            return
        for name, leases in by_name.items():
            try:
                self._refresh(keys=[self._prefix + name], args=[self._lease_ms, *leases])
            except self._redis_errors as e:
                self._outage.failed(e)
                return
        self._outage.succeeded()
