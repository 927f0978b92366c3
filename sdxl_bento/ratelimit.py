"""Per-API-key token buckets: requests per minute and images per minute.

Why: the service has one GPU, and one greedy key could hold it for everyone. A token bucket per key
and per resource lets every key burst a little, then caps it at its fair rate.

Why Redis: the gateway runs several workers and replicas. Buckets kept in-process would give each
of them a whole limit; in Redis, one Lua script refills, checks and charges all buckets of a call at
once (all or nothing), using the Redis server's clock, so the limit holds exactly across processes
and machines whatever their clocks say.

Why fail-open: if Redis is unreachable, refusing every request (fail-closed) would turn a cache
outage into a full outage. Instead each process falls back to its own in-process buckets, which
still bound a key to `workers x limit`, logs the outage once, and retries Redis every few seconds.
"""

from __future__ import annotations

import logging
import math
import threading
import time
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


class RateLimiter:
    """All-or-nothing token buckets, in Redis when `redis_url` is given, else in this process.

    `take` never raises because Redis is down: it answers from the in-process buckets meanwhile."""

    def __init__(self, redis_url: Optional[str] = None, *, prefix: str = "sdxl-bento:rl:",
                 clock: Callable[[], float] = time.time, retry_interval_s: float = 5.0,
                 socket_timeout_s: float = 0.5) -> None:
        self._prefix = prefix
        self._memory = _MemoryBuckets(clock)
        self._retry_interval_s = retry_interval_s
        self._state_lock = threading.Lock()
        self._degraded = False
        self._next_try = 0.0  # time.monotonic() before which a degraded limiter does not try Redis
        self._last_backend = "redis" if redis_url else "memory"
        self.redis_failures = 0
        self._redis: Optional[redis.Redis] = None
        if redis_url:
            import redis as redis_mod
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self._redis_errors: tuple[type[Exception], ...] = (redis_mod.RedisError, OSError)
            # One immediate retry re-dials a pooled connection that went stale (Redis restarted);
            # anything longer would only delay the fallback.
            self._redis = redis_mod.Redis.from_url(
                redis_url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
                retry=Retry(NoBackoff(), 1))
            self._script = self._redis.register_script(_LUA)

    @property
    def backend(self) -> str:
        """"redis" or "memory": what answered the last call."""
        return self._last_backend

    @property
    def degraded(self) -> bool:
        """True while a Redis URL is configured but Redis is unreachable (serving from memory)."""
        return self._degraded

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
        if self._redis is not None and self._should_try_redis():
            try:
                out = self._script(keys=[self._prefix + n for n in names],
                                   args=[a for _, lim, cost in items for a in (repr(lim.per_second), lim.burst, cost)])
            except self._redis_errors as e:
                self._on_failure(e)
            else:
                self._on_success()
                return _decide(items, [float(x) for x in out[1:]], int(out[0]) == 1)
        self._last_backend = "memory"
        return self._memory.take(items)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        self._degraded = False

    def _should_try_redis(self) -> bool:
        with self._state_lock:
            if not self._degraded:
                return True
            now = time.monotonic()
            if now < self._next_try:
                return False
            self._next_try = now + self._retry_interval_s  # one probe per interval, whatever the threads
            return True

    def _on_failure(self, e: Exception) -> None:
        with self._state_lock:
            self.redis_failures += 1
            self._next_try = time.monotonic() + self._retry_interval_s
            if not self._degraded:
                self._degraded = True
                logger.warning("rate limiter: Redis unreachable (%s: %s); using in-process limits, "
                               "retrying every %.1f s", type(e).__name__, e, self._retry_interval_s)

    def _on_success(self) -> None:
        with self._state_lock:
            self._last_backend = "redis"
            if self._degraded:
                self._degraded = False
                logger.info("rate limiter: Redis is back; limits are shared again")
