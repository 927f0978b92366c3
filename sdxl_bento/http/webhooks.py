"""Webhooks: a job's end (and, when asked, its progress) pushed to a URL its owner chose, signed, retried, on record.

Why each part is as it is:

- **Signed per Standard Webhooks** (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``: HMAC-SHA256 over
  ``id.timestamp.body``, by the ``standardwebhooks`` package), with the secret of the key that made the job, so any
  Standard Webhooks library verifies a delivery. The secret is looked up when an attempt is signed: it is never
  stored with a delivery, and a rotated secret signs the next attempt. Without keys, the server's own secret.
- **Nobody points the server at its own network.** A target must resolve only to public addresses, unless
  ``SDXL_BENTO_WEBHOOK_ALLOW`` lets a range in; the name is resolved again at every attempt (a name that
  resolves to a public address at submission and to ``127.0.0.1`` later is refused then), and the attempt
  connects to the very address that was checked (the URL's host stays in ``Host`` and in TLS's SNI). No redirect
  is followed and no proxy from the environment is used.
- **Nothing accepted is lost.** Deliveries are rows of a SQLite file in the state folder before any attempt, so
  pending ones survive a restart; an attempt is claimed with a lease, so two workers of one server do not send the
  same one at once. A 5xx, 408, 429, a timeout or a refused connection is retried with exponential backoff and
  full jitter until ``SDXL_BENTO_WEBHOOK_MAX_AGE_S`` (24 h) after the event; another answer ends it. Every attempt is
  recorded and its owner reads them (``GET /jobs/webhooks?task_id=``). A delivery's ``webhook-id`` is the same
  at every attempt, so a receiver can drop a repeat.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

from ..errors import InvalidRequest
from .statedb import open_shared

logger = logging.getLogger(__name__)

TERMINAL = ("job.completed", "job.failed", "job.cancelled")
DEFAULT_EVENTS = TERMINAL
PROGRESS = "job.progress"
STATUS_EVENTS = {"completed": "job.completed", "failed": "job.failed", "canceled": "job.cancelled"}
"""A task's status in the journal -> the event that announces it."""
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(505, 600))
MAX_DELAY_S = 3600.0
PROGRESS_MAX_AGE_S = 60.0
"""A progress event is worth nothing later: it is tried for a minute, not for a day."""
USER_AGENT = "sdxl-bento-webhooks/1"

_KEYWORDS = {
    "loopback": ("127.0.0.0/8", "::1/128"),
    "private": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"),
    "link-local": ("169.254.0.0/16", "fe80::/10"),
}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookRefused(InvalidRequest):
    """A webhook target the server will not call (400 at submission; a delivery's permanent failure later)."""


# -- where a webhook may go ----------------------------------------------------------------------------------
def parse_allow(value: str) -> tuple[Network, ...]:
    """``SDXL_BENTO_WEBHOOK_ALLOW``: CIDRs and the keywords ``loopback``, ``private``, ``link-local``."""
    networks: list[Network] = []
    for item in (part.strip().lower() for part in value.split(",")):
        if not item:
            continue
        for cidr in _KEYWORDS.get(item, (item,)):
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                raise ValueError(f"SDXL_BENTO_WEBHOOK_ALLOW: {item!r} is neither a CIDR nor one of "
                                 f"{', '.join(_KEYWORDS)}") from None
    return tuple(networks)


def _plain(address: Address) -> Address:
    """IPv4 behind IPv6 (``::ffff:127.0.0.1``, 6to4, Teredo) checked as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address):
        for inner in (address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None):
            if inner is not None:
                return inner
    return address


def address_allowed(address: Address, allow: Iterable[Network]) -> bool:
    plain = _plain(address)
    if any(plain in net or address in net for net in allow):
        return True
    return plain.is_global and not plain.is_multicast


@dataclass(frozen=True)
class Resolved:
    url: str
    host: str
    port: int
    address: Address
    """The checked address the attempt connects to."""


class Targets:
    """Checks webhook URLs against the allowed ranges, resolving names first (``resolve`` is injectable)."""

    def __init__(self, allow: str | Iterable[Network] = "", *,
                 resolve: Callable[[str, int], list[str]] | None = None) -> None:
        self.allow = parse_allow(allow) if isinstance(allow, str) else tuple(allow)
        self._resolve = resolve or _getaddrinfo

    def check(self, url: str) -> Resolved:
        """The URL's address, when every address its name resolves to is allowed; ``WebhookRefused`` else."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookRefused("webhook must be an http:// or https:// URL with a host", field="webhook")
        if parts.username or parts.password:
            raise WebhookRefused("webhook must not carry a user name or password", field="webhook")
        host = parts.hostname
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise WebhookRefused("webhook has an invalid port", field="webhook") from None
        try:
            literal: Address | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                addresses = [ipaddress.ip_address(a.split("%")[0]) for a in self._resolve(host, port)]
            except (OSError, UnicodeError, ValueError) as exc:
                raise WebhookRefused(f"webhook: the host {host!r} does not resolve ({exc})", field="webhook") from None
            if not addresses:
                raise WebhookRefused(f"webhook: the host {host!r} does not resolve", field="webhook")
        refused = [a for a in addresses if not address_allowed(a, self.allow)]
        if refused:
            raise WebhookRefused(
                f"webhook: {host} resolves to {refused[0]}, a private, loopback, link-local or reserved address; "
                "the operator can allow such targets with SDXL_BENTO_WEBHOOK_ALLOW", field="webhook")
        return Resolved(url=url, host=host, port=port, address=addresses[0])


def _getaddrinfo(host: str, port: int) -> list[str]:
    return list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))


# -- the record: subscriptions, deliveries, attempts -----------------------------------------------------------
@dataclass(frozen=True)
class Subscription:
    job_id: str
    owner: str | None
    url: str
    events: tuple[str, ...]


@dataclass(frozen=True)
class Delivery:
    id: str
    """The ``webhook-id``: the same at every attempt."""
    job_id: str
    owner: str | None
    url: str
    event: str
    body: str
    """The payload, exactly the bytes signed and sent."""
    created: float
    expires: float
    attempts: int
    state: str
    """``pending``, ``delivered`` or ``failed``."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS subscriptions (job_id TEXT PRIMARY KEY, owner TEXT, url TEXT NOT NULL,
    events TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (id TEXT PRIMARY KEY, job_id TEXT NOT NULL, owner TEXT, url TEXT NOT NULL,
    event TEXT NOT NULL, body TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL, next_at REAL NOT NULL,
    lease REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, last_error TEXT,
    ended REAL);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at);
CREATE INDEX IF NOT EXISTS deliveries_job ON deliveries (job_id);
CREATE TABLE IF NOT EXISTS attempts (delivery_id TEXT NOT NULL, n INTEGER NOT NULL, at REAL NOT NULL,
    duration_s REAL NOT NULL, status_code INTEGER, error TEXT, outcome TEXT NOT NULL,
    PRIMARY KEY (delivery_id, n));
"""


class WebhookStore:
    """The SQLite file (``<state dir>/webhooks.db``) shared by the workers of one server."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = open_shared(path, "synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def subscribe(self, sub: Subscription, now: float | None = None) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO subscriptions VALUES (?, ?, ?, ?, ?)",
                             (sub.job_id, sub.owner, sub.url, json.dumps(list(sub.events)), _now(now)))

    def subscription(self, job_id: str) -> Subscription | None:
        with self._lock:
            row = self._db.execute("SELECT job_id, owner, url, events FROM subscriptions WHERE job_id=?",
                                   (job_id,)).fetchone()
        return None if row is None else Subscription(row[0], row[1], row[2], tuple(json.loads(row[3])))

    def enqueue(self, job_id: str, owner: str | None, url: str, event: str, body: str, *, max_age_s: float,
                now: float | None = None) -> str:
        delivery_id = "msg_" + uuid.uuid4().hex
        now = _now(now)
        with self._lock:
            self._db.execute(
                "INSERT INTO deliveries (id, job_id, owner, url, event, body, created, expires, next_at, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
                (delivery_id, job_id, owner, url, event, body, now, now + max_age_s, now))
        return delivery_id

    def claim(self, lease_s: float, limit: int = 8, now: float | None = None) -> list[Delivery]:
        """Due deliveries not leased by another worker, leased to this one for ``lease_s``."""
        now = _now(now)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT id, job_id, owner, url, event, body, created, expires, attempts, state FROM deliveries "
                    "WHERE state='pending' AND next_at<=? AND lease<=? ORDER BY next_at LIMIT ?",
                    (now, now, limit)).fetchall()
                self._db.executemany("UPDATE deliveries SET lease=? WHERE id=?", [(now + lease_s, r[0]) for r in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [Delivery(*row) for row in rows]

    def next_due(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(MAX(next_at, lease)) FROM deliveries WHERE state='pending'").fetchone()
        return row[0] if row else None

    def record(self, delivery: Delivery, *, at: float, duration_s: float, status_code: int | None,
               error: str | None, outcome: str, next_at: float | None = None) -> None:
        """One attempt, and what follows: ``delivered``, ``failed`` (given up) or ``retry`` at ``next_at``."""
        n = delivery.attempts + 1
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (delivery.id, n, at, round(duration_s, 4), status_code, error, outcome))
                if outcome == "retry":
                    self._db.execute("UPDATE deliveries SET attempts=?, next_at=?, lease=0, last_error=? WHERE id=?",
                                     (n, next_at, error, delivery.id))
                else:
                    self._db.execute("UPDATE deliveries SET attempts=?, state=?, lease=0, last_error=?, ended=? "
                                     "WHERE id=?", (n, outcome, error, at, delivery.id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def history(self, job_id: str) -> list[dict[str, Any]]:
        """Every delivery of a job, with its attempts, oldest first (no body: it is the job's own answer)."""
        with self._lock:
            deliveries = self._db.execute(
                "SELECT id, event, url, state, attempts, created, next_at, last_error, ended FROM deliveries "
                "WHERE job_id=? ORDER BY created", (job_id,)).fetchall()
            attempts = self._db.execute(
                "SELECT a.delivery_id, a.n, a.at, a.duration_s, a.status_code, a.error, a.outcome FROM attempts a "
                "JOIN deliveries d ON d.id=a.delivery_id WHERE d.job_id=? ORDER BY a.delivery_id, a.n",
                (job_id,)).fetchall()
        by_delivery: dict[str, list[dict[str, Any]]] = {}
        for d_id, n, at, duration, code, error, outcome in attempts:
            by_delivery.setdefault(d_id, []).append({"attempt": n, "at": _iso(at), "duration_s": duration,
                                                     "status_code": code, "error": error, "outcome": outcome})
        return [{"webhook_id": d_id, "event": event, "url": url, "state": state, "attempts": n,
                 "created_at": _iso(created), "next_attempt_at": _iso(next_at) if state == "pending" else None,
                 "last_error": error, "ended_at": _iso(ended) if ended else None,
                 "tries": by_delivery.get(d_id, [])}
                for d_id, event, url, state, n, created, next_at, error, ended in deliveries]

    def owner_of(self, job_id: str) -> tuple[bool, str | None]:
        """(known, owner) of a job this store has a subscription or deliveries for."""
        with self._lock:
            row = self._db.execute("SELECT owner FROM subscriptions WHERE job_id=? UNION ALL "
                                   "SELECT owner FROM deliveries WHERE job_id=? LIMIT 1", (job_id, job_id)).fetchone()
        return (row is not None, row[0] if row else None)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall())

    def prune(self, older_than_s: float, now: float | None = None) -> int:
        """Forget ended deliveries (and their attempts) and subscriptions older than ``older_than_s``."""
        cutoff = _now(now) - older_than_s
        with self._lock:
            self._db.execute("DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries "
                             "WHERE state!='pending' AND created<?)", (cutoff,))
            gone = self._db.execute("DELETE FROM deliveries WHERE state!='pending' AND created<?", (cutoff,)).rowcount
            self._db.execute("DELETE FROM subscriptions WHERE created<? AND job_id NOT IN "
                             "(SELECT job_id FROM deliveries WHERE state='pending')", (cutoff,))
        return gone

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- sending -------------------------------------------------------------------------------------------------
def backoff(attempt: int, base_s: float, *, rng: Callable[[], float] = random.random) -> float:
    """Seconds before retry number ``attempt`` (1, 2, ...): ``base * 2^(attempt-1)``, capped at an hour, with
    jitter (a uniform half to all of it) so that receivers coming back are not hit by every sender at once."""
    delay = min(MAX_DELAY_S, base_s * 2 ** (attempt - 1))
    return delay * (0.5 + 0.5 * rng())


def payload(event: str, job_id: str, data: dict[str, Any], now: float | None = None) -> str:
    """The body: Standard Webhooks' recommended ``{type, timestamp, data}``, compact JSON."""
    stamp = datetime.fromtimestamp(_now(now), timezone.utc).isoformat().replace("+00:00", "Z")
    return json.dumps({"type": event, "timestamp": stamp, "data": {"task_id": job_id, **data}},
                      separators=(",", ":"), default=str)


def sign(secret: str, delivery_id: str, timestamp: float, body: str) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt."""
    from standardwebhooks.webhooks import Webhook

    moment = datetime.fromtimestamp(int(timestamp), timezone.utc)
    return {"webhook-id": delivery_id, "webhook-timestamp": str(int(timestamp)),
            "webhook-signature": Webhook(secret).sign(delivery_id, moment, body)}


class Webhooks:
    """Subscriptions, events and the delivery loop of one worker (``start``; ``stop`` at shutdown)."""

    def __init__(self, store: WebhookStore, targets: Targets, *, secret_for: Callable[[str | None], str | None],
                 timeout_s: float = 10.0, retry_base_s: float = 5.0, max_age_s: float = 24 * 3600,
                 progress_interval_s: float = 5.0, senders: int = 4, observe: Callable[[str], None] | None = None,
                 transport: Any = None) -> None:
        self.store = store
        self.targets = targets
        self.secret_for = secret_for
        """Owner (a key's name, None without keys) -> its ``whsec_`` secret, read when an attempt is signed."""
        self.timeout_s = timeout_s
        self.retry_base_s = retry_base_s
        self.max_age_s = max_age_s
        self.progress_interval_s = progress_interval_s
        self.observe = observe or (lambda outcome: None)
        self._transport = transport
        self._pool = ThreadPoolExecutor(max_workers=senders, thread_name_prefix="sdxl-webhook")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress_at: dict[str, float] = {}
        self._progress_lock = threading.Lock()

    # -- events ---------------------------------------------------------------------------------------------
    def subscribe(self, job_id: str, owner: str | None, url: str, events: Iterable[str] | None) -> Subscription:
        sub = Subscription(job_id, owner, url, tuple(events) if events else DEFAULT_EVENTS)
        self.store.subscribe(sub)
        return sub

    def ended(self, job_id: str, status: str, data: dict[str, Any]) -> str | None:
        """A job ended (its journal status): the matching event goes to its subscriber, if it asked for it."""
        event = STATUS_EVENTS.get(status)
        sub = self.store.subscription(job_id)
        with self._progress_lock:
            self._progress_at.pop(job_id, None)
        if event is None or sub is None or event not in sub.events:
            return None
        return self._enqueue(sub, event, {"status": status, **data}, self.max_age_s)

    def progress(self, job_id: str, info: dict[str, Any]) -> str | None:
        """``job.progress``, at most once per ``progress_interval_s`` per job, to subscribers that asked."""
        now = time.monotonic()
        with self._progress_lock:
            if now - self._progress_at.get(job_id, -1e9) < self.progress_interval_s:
                return None
            self._progress_at[job_id] = now
        sub = self.store.subscription(job_id)
        if sub is None or PROGRESS not in sub.events:
            return None
        return self._enqueue(sub, PROGRESS, {"status": "in_progress", **info}, PROGRESS_MAX_AGE_S)

    def _enqueue(self, sub: Subscription, event: str, data: dict[str, Any], max_age_s: float) -> str:
        delivery_id = self.store.enqueue(sub.job_id, sub.owner, sub.url, event, payload(event, sub.job_id, data),
                                         max_age_s=max_age_s)
        self._wake.set()
        return delivery_id

    # -- the loop ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sdxl-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.run_due()
            except Exception:  # the loop must outlive any one failure (a locked file, a full disk)
                logger.exception("webhook delivery loop")
                sent = 0
            if sent:
                continue
            due = self.store.next_due()
            wait = 1.0 if due is None else min(1.0, max(0.02, due - time.time()))
            self._wake.wait(wait)  # woken at once by a new event of this worker; others' are seen within a second
            self._wake.clear()

    def run_due(self) -> int:
        """Send what is due now (in parallel); how many attempts were made."""
        due = self.store.claim(lease_s=self.timeout_s + 30)
        list(self._pool.map(self.attempt, due))
        return len(due)

    def attempt(self, delivery: Delivery) -> str:
        """One signed attempt; records it and returns its outcome (``delivered``, ``retry`` or ``failed``)."""
        import httpx

        started, at = time.monotonic(), time.time()
        code: int | None = None
        try:
            if at > delivery.expires:
                raise _GiveUp("expired before it could be sent")
            secret = self.secret_for(delivery.owner)
            if not secret:
                raise _GiveUp(f"no webhook secret for key {delivery.owner!r} (sdxl-bento keys webhook-secret NAME)")
            try:
                target = self.targets.check(delivery.url)
            except WebhookRefused as exc:
                raise _GiveUp(exc.message) from None
            headers = {"content-type": "application/json", "user-agent": USER_AGENT,
                       **sign(secret, delivery.id, at, delivery.body)}
            url, host_header, extensions = _pinned(target)
            headers["host"] = host_header
            with httpx.Client(timeout=self.timeout_s, follow_redirects=False, trust_env=False,
                              transport=self._transport) as client:
                answer = client.post(url, content=delivery.body.encode(), headers=headers, extensions=extensions)
            code = answer.status_code
            if 200 <= code < 300:
                outcome, error = "delivered", None
            elif code in RETRY_STATUSES:
                outcome, error = "retry", f"the receiver answered {code}"
            else:
                outcome, error = "failed", f"the receiver answered {code}" + (
                    " (redirects are not followed)" if 300 <= code < 400 else "")
        except _GiveUp as exc:
            outcome, error = "failed", str(exc)
        except httpx.TimeoutException as exc:
            outcome, error = "retry", f"timed out after {self.timeout_s:g} s ({type(exc).__name__})"
        except httpx.TransportError as exc:  # refused, reset, unreachable, TLS
            outcome, error = "retry", f"{type(exc).__name__}: {exc}"
        next_at = None
        if outcome == "retry":
            next_at = at + backoff(delivery.attempts + 1, self.retry_base_s)
            if next_at > delivery.expires:
                outcome, error = "failed", f"{error}; given up after {delivery.attempts + 1} attempts"
        self.store.record(delivery, at=at, duration_s=time.monotonic() - started, status_code=code, error=error,
                          outcome=outcome, next_at=next_at)
        self.observe(outcome)
        if outcome != "delivered":
            logger.info("webhook %s (%s of job %s): attempt %d %s: %s", delivery.id, delivery.event, delivery.job_id,
                        delivery.attempts + 1, outcome, error)
        return outcome


class _GiveUp(Exception):
    pass


def _pinned(target: Resolved) -> tuple[str, str, dict[str, Any]]:
    """The URL with the checked address in place of the name, the ``Host`` header, and TLS's SNI name."""
    parts = urlsplit(target.url)
    address = f"[{target.address}]" if target.address.version == 6 else str(target.address)
    default = 443 if parts.scheme == "https" else 80
    netloc = address if target.port == default else f"{address}:{target.port}"
    host_header = parts.netloc.rsplit("@", 1)[-1]
    extensions = {"sni_hostname": target.host} if parts.scheme == "https" else {}
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), host_header, extensions


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


def _now(now: float | None) -> float:
    return time.time() if now is None else now
