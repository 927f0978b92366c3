"""``Idempotency-Key``: a POST that generates or submits, retried, never runs twice (IETF httpapi draft).

The gateway asks here after it has authenticated and policed a request, before it admits it (a retry costs no
job slot and no tokens). Keys are the caller's: stored under the key's name, so two keys may use the same value.

- The first request with a key **claims** it (an atomic insert, with its fingerprint: method, path, ``Prefer``,
  ``Accept`` and the canonical JSON body) and runs; its answer (status, headers, body) is **stored** for
  ``SDXL_BENTO_IDEMPOTENCY_TTL_S`` (24 h). A task route's answer holds the task id, so a retried submit gets the
  same task.
- A retry with the same fingerprint gets the stored answer, marked ``Idempotent-Replayed: true``; one that arrives
  while the first still runs **waits** for it and gets the same answer (no second GPU run).
- The same key with another fingerprint answers ``422`` (the draft's "key reused with a different payload").
- An answer that says nothing was done (``429``, ``503``, any 5xx) is not kept: the claim is dropped and the next
  retry runs. A claim whose process died is taken over once its lease (the longest a request may run) is over.

Stored in Redis when ``SDXL_BENTO_REDIS_URL`` is set (shared by every replica; ``SET NX`` claims), else in SQLite in
the state folder (shared by the workers of one server).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import IdempotencyMismatch, InvalidRequest
from .statedb import open_shared

HEADER = "idempotency-key"
REPLAYED = "idempotent-replayed"
NOT_KEPT = frozenset({408, 425, 429}) | frozenset(range(500, 600))
"""Answers after which retrying is the right thing: the claim is dropped, not stored."""
DROP_HEADERS = frozenset({"content-length", "date", "server", "x-ratelimit-limit", "x-ratelimit-remaining",
                          "x-ratelimit-reset", "retry-after", "x-cache", REPLAYED})
MAX_STORED_BYTES = 64 * 2**20


def parse_key(raw: str) -> str:
    """The key's value: an sf-string (``"abc"``, as the draft writes it) or a bare token; 1-255 printable ASCII."""
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if not 1 <= len(value) <= 255 or not all(32 < ord(c) < 127 for c in value):
        raise InvalidRequest("Idempotency-Key must be 1 to 255 printable ASCII characters without spaces",
                             field="idempotency-key")
    return value


def fingerprint(method: str, path: str, headers: dict[str, str], body: bytes) -> str:
    """What makes two requests the same request: a retry has the same one."""
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")) if body else ""
    except ValueError:
        canonical = body.decode("latin-1")
    parts = [method, path, headers.get("prefer", ""), headers.get("accept", ""), canonical]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Stored:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def to_json(self) -> str:
        return json.dumps({"status": self.status, "headers": self.headers, "body": base64.b64encode(self.body).decode()})

    @classmethod
    def from_json(cls, text: str | bytes) -> "Stored":
        raw = json.loads(text)
        return cls(raw["status"], [tuple(h) for h in raw["headers"]], base64.b64decode(raw["body"]))


@dataclass(frozen=True)
class Claim:
    """What ``begin`` found: ``new`` (run it; this request holds the key), ``done`` (``stored`` is the answer) or
    ``running`` (another request with this key and fingerprint is running)."""

    state: str
    stored: Stored | None = None


class Backend(Protocol):
    def claim(self, scope: str, key: str, fp: str, lease_s: float, ttl_s: float) -> tuple[str, str, Stored | None]:
        """(``new``|``running``|``done``, the stored fingerprint, the answer when done)."""

    def store(self, scope: str, key: str, fp: str, answer: Stored, ttl_s: float) -> None: ...

    def release(self, scope: str, key: str, fp: str) -> None: ...


class Idempotency:
    def __init__(self, backend: Backend, *, ttl_s: float = 24 * 3600, lease_s: float = 600, poll_s: float = 0.05) -> None:
        self.backend = backend
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        """How long a claim holds without an answer: the longest a request may run, then some."""
        self.poll_s = poll_s

    def begin(self, scope: str, key: str, fp: str) -> Claim:
        state, stored_fp, stored = self.backend.claim(scope, key, fp, self.lease_s, self.ttl_s)
        if stored_fp != fp:
            raise IdempotencyMismatch("this Idempotency-Key was used with a different request; use a new key for a "
                                      "new request", field="idempotency-key")
        return Claim(state, stored)

    async def wait(self, scope: str, key: str, fp: str, timeout_s: float) -> Claim:
        """Until the request holding the key has answered (``done``), or its claim was dropped or ran out, in which
        case this one holds the key now (``new``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            claim = await asyncio.to_thread(self.begin, scope, key, fp)
            if claim.state != "running" or time.monotonic() > deadline:
                return claim
            await asyncio.sleep(self.poll_s)

    def finish(self, scope: str, key: str, fp: str, status: int, headers: list[tuple[str, str]], body: bytes) -> bool:
        """Keep the answer (True), or drop the claim when the answer says to try again or is too large (False)."""
        if status in NOT_KEPT or len(body) > MAX_STORED_BYTES:
            self.backend.release(scope, key, fp)
            return False
        kept = [(k, v) for k, v in headers if k.lower() not in DROP_HEADERS]
        self.backend.store(scope, key, fp, Stored(status, kept, body), self.ttl_s)
        return True

    def abandon(self, scope: str, key: str, fp: str) -> None:
        self.backend.release(scope, key, fp)


class SqliteBackend:
    """``<state dir>/idempotency.db``: one row per (caller, key)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = open_shared(path, "synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS keys (scope TEXT NOT NULL, key TEXT NOT NULL, fp TEXT NOT NULL, "
                         "answer TEXT, lease REAL NOT NULL, expires REAL NOT NULL, PRIMARY KEY (scope, key))")

    def claim(self, scope: str, key: str, fp: str, lease_s: float, ttl_s: float) -> tuple[str, str, Stored | None]:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT fp, answer, lease, expires FROM keys WHERE scope=? AND key=?",
                                       (scope, key)).fetchone()
                if row is not None and row[3] <= now:
                    self._db.execute("DELETE FROM keys WHERE scope=? AND key=?", (scope, key))
                    row = None
                if row is not None and row[1] is None and row[2] <= now and row[0] == fp:  # its holder died
                    self._db.execute("DELETE FROM keys WHERE scope=? AND key=?", (scope, key))
                    row = None
                if row is None:
                    self._db.execute("INSERT INTO keys VALUES (?, ?, ?, NULL, ?, ?)",
                                     (scope, key, fp, now + lease_s, now + ttl_s))
                    self._db.execute("COMMIT")
                    return "new", fp, None
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        stored_fp, answer = row[0], row[1]
        return ("done", stored_fp, Stored.from_json(answer)) if answer is not None else ("running", stored_fp, None)

    def store(self, scope: str, key: str, fp: str, answer: Stored, ttl_s: float) -> None:
        with self._lock:
            self._db.execute("UPDATE keys SET answer=?, expires=? WHERE scope=? AND key=? AND fp=?",
                             (answer.to_json(), time.time() + ttl_s, scope, key, fp))

    def release(self, scope: str, key: str, fp: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM keys WHERE scope=? AND key=? AND fp=? AND answer IS NULL", (scope, key, fp))

    def prune(self) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM keys WHERE expires<?", (time.time(),)).rowcount


class RedisBackend:
    """One Redis key per (caller, key): a hash with the fingerprint, the answer and the lease; ``HSETNX``-style
    claims by a Lua script, so replicas racing on one key agree on who runs it."""

    _CLAIM = """
local now = tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then
  local fp = redis.call('HGET', KEYS[1], 'fp')
  local answer = redis.call('HGET', KEYS[1], 'answer')
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease') or '0')
  if answer or lease > now or fp ~= ARGV[1] then
    return {fp, answer or false}
  end
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'lease', tostring(now + tonumber(ARGV[2])))
redis.call('HDEL', KEYS[1], 'answer')
redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[4]) * 1000))
return {'new', false}
"""

    def __init__(self, url: str, prefix: str = "sdxl-bento:idem:") -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._claim = self._redis.register_script(self._CLAIM)
        self.prefix = prefix

    def _key(self, scope: str, key: str) -> str:
        return self.prefix + hashlib.sha256(f"{scope}\n{key}".encode()).hexdigest()

    def claim(self, scope: str, key: str, fp: str, lease_s: float, ttl_s: float) -> tuple[str, str, Stored | None]:
        first, answer = self._claim(keys=[self._key(scope, key)], args=[fp, lease_s, time.time(), ttl_s])
        first = first.decode() if isinstance(first, bytes) else first
        if first == "new":
            return "new", fp, None
        if answer:
            return "done", first, Stored.from_json(answer)
        return "running", first, None

    def store(self, scope: str, key: str, fp: str, answer: Stored, ttl_s: float) -> None:
        name = self._key(scope, key)
        with self._redis.pipeline() as pipe:
            pipe.hset(name, mapping={"fp": fp, "answer": answer.to_json(), "lease": "0"})
            pipe.pexpire(name, int(ttl_s * 1000))
            pipe.execute()

    def release(self, scope: str, key: str, fp: str) -> None:
        name = self._key(scope, key)
        stored = self._redis.hmget(name, ["fp", "answer"])
        if stored[0] is not None and stored[0].decode() == fp and stored[1] is None:
            self._redis.delete(name)

    def prune(self) -> int:
        return 0  # Redis expires keys itself


def make_idempotency(redis_url: str | None, state_dir: Path, *, ttl_s: float, lease_s: float) -> Idempotency:
    backend: Any = RedisBackend(redis_url) if redis_url else SqliteBackend(state_dir / "idempotency.db")
    return Idempotency(backend, ttl_s=ttl_s, lease_s=lease_s)
