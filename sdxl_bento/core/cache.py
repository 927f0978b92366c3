"""Result cache and request coalescing: an identical request never costs the GPU twice.

Generation is deterministic given its parameters, seeds and model, so a finished result can be
answered again from a cache keyed by a hash of all three (plus the output format). Two backends:

* ``EmbeddedCache`` (the default): an in-process LRU bounded in bytes, whose entries point at images
  in the on-disk ``ImageStore``; an entry whose file has gone is a miss.
* ``RedisCache``: shared by every replica, with a TTL; image bytes are stored once per content hash.

A cache is an optimisation, never a dependency: any cache failure is a miss (or a skipped write),
logged, and never fails a request. ``Coalescer`` covers the window before a result is cached:
identical requests already in flight share one generation.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Protocol, TypeVar

from ..errors import Cancelled, DeadlineExceeded, InvalidRequest, NotFound
from .images import ImageStore

log = logging.getLogger(__name__)

T = TypeVar("T")
KEY_VERSION = 1


def cache_key(parameters: dict[str, Any], model_tag: str, output_format: str) -> str:
    """sha256 hex of the canonical JSON of everything that determines the encoded images."""
    doc = {"parameters": parameters, "model": model_tag, "format": output_format, "v": KEY_VERSION}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedImage:
    id: str  # image id in the image store (a UUID string)
    seed: int
    media_type: str
    width: int
    height: int
    parameters: str  # the infotext embedded in the file
    data: bytes  # the encoded image
    finish_reason: str = "success"  # "content_filtered": withheld (no id, no data) or blurred by the safety check


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    bytes: int
    entries: int
    backend: str  # "memory" or "redis"


class ResultCache(Protocol):
    def get(self, key: str) -> list[CachedImage] | None: ...

    def put(self, key: str, images: list[CachedImage]) -> None: ...

    def stats(self) -> CacheStats: ...

    def close(self) -> None: ...


class EmbeddedCache:
    """In-process LRU of key -> images, bounded by the sum of the cached images' bytes."""

    def __init__(self, images: ImageStore, max_bytes: int = 512 * 2**20) -> None:
        self.images = images
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[list[CachedImage], int]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> list[CachedImage] | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and not all(self._on_disk(image.id) for image in entry[0]):
            with self._lock:
                if self._entries.get(key) is entry:
                    self._drop(key)
            entry = None
        with self._lock:
            if entry is None:
                self._misses += 1
                return None
            if key in self._entries:
                self._entries.move_to_end(key)
            self._hits += 1
            return list(entry[0])

    def put(self, key: str, images: list[CachedImage]) -> None:
        size = sum(len(image.data) for image in images)
        with self._lock:
            if key in self._entries:
                self._drop(key)
            if size > self.max_bytes:
                return  # could never fit; do not flush everything else for it
            self._entries[key] = (list(images), size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._bytes, len(self._entries), "memory")

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, key: str) -> None:
        _, size = self._entries.pop(key)
        self._bytes -= size

    def _on_disk(self, image_id: str) -> bool:
        try:
            self.images.find(image_id)
        except (NotFound, InvalidRequest, OSError):
            return False
        return True


class RedisCache:
    """Entries shared by all replicas through Redis; image bytes stored once per sha256, all with a TTL."""

    _RETRY_AFTER_S = 1.0  # while Redis is down, try it at most this often; meanwhile every get is a miss

    def __init__(self, url: str, *, ttl_s: int = 24 * 3600, prefix: str = "sdxl-bento:cache:") -> None:
        import redis  # only needed when a Redis URL is configured
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis_error: type[Exception] = redis.RedisError
        # Fail fast: a slow or absent cache must cost a request milliseconds, not the default retries.
        self.client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=1.0,
                                           retry=Retry(NoBackoff(), 1))
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._hits = 0
        self._misses = 0
        self._down_until: float | None = None  # set while in an outage
        self._lock = threading.Lock()

    def _entry_key(self, key: str) -> str:
        return f"{self.prefix}entry:{key}"

    def _blob_key(self, digest: str) -> str:
        return f"{self.prefix}blob:{digest}"

    def get(self, key: str) -> list[CachedImage] | None:
        images = self._call(lambda: self._get(key), None)
        with self._lock:
            if images is None:
                self._misses += 1
            else:
                self._hits += 1
        return images

    def _get(self, key: str) -> list[CachedImage] | None:
        raw = self.client.get(self._entry_key(key))
        if raw is None:
            return None
        try:
            metas = json.loads(raw)["images"]
            digests = [meta["sha256"] for meta in metas]
        except (ValueError, KeyError, TypeError):
            log.warning("result cache: unreadable Redis entry %s, ignored", key)
            return None
        blobs = self.client.mget([self._blob_key(d) for d in digests]) if digests else []
        out = []
        for meta, digest, blob in zip(metas, digests, blobs):
            if blob is None or hashlib.sha256(blob).hexdigest() != digest:
                return None  # expired or evicted blob: regenerate rather than answer part of a result
            out.append(CachedImage(id=meta["id"], seed=meta["seed"], media_type=meta["media_type"],
                                   width=meta["width"], height=meta["height"], parameters=meta["parameters"],
                                   data=blob, finish_reason=meta.get("finish_reason", "success")))
        return out

    def put(self, key: str, images: list[CachedImage]) -> None:
        self._call(lambda: self._put(key, images), None)

    def _put(self, key: str, images: list[CachedImage]) -> None:
        metas, blobs = [], {}
        for image in images:
            meta = asdict(image)
            data = meta.pop("data")
            digest = hashlib.sha256(data).hexdigest()
            meta["sha256"] = digest
            metas.append(meta)
            blobs[digest] = data
        pipe = self.client.pipeline(transaction=False)
        for digest, data in blobs.items():  # blobs first: an entry never points at a blob not yet written
            pipe.set(self._blob_key(digest), data, ex=self.ttl_s)
        pipe.set(self._entry_key(key), json.dumps({"images": metas}, separators=(",", ":")), ex=self.ttl_s)
        pipe.execute()

    def stats(self) -> CacheStats:
        counted = self._call(self._count, (0, 0))
        with self._lock:
            return CacheStats(self._hits, self._misses, counted[1], counted[0], "redis")

    def _count(self) -> tuple[int, int]:
        """(entries, blob bytes), by SCAN: exact at the moment, O(keys); meant for occasional stats."""
        pattern = _glob_escape(self.prefix)
        entries = sum(1 for _ in self.client.scan_iter(match=pattern + "entry:*", count=1000))
        total, batch = 0, []
        for blob_key in self.client.scan_iter(match=pattern + "blob:*", count=1000):
            batch.append(blob_key)
            if len(batch) >= 1000:
                total += self._strlen(batch)
                batch = []
        return entries, total + (self._strlen(batch) if batch else 0)

    def _strlen(self, keys: list[bytes]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.strlen(k)
        return sum(pipe.execute())

    def close(self) -> None:
        self.client.close()

    def _call(self, fn: Callable[[], T], default: T) -> T:
        """Run one Redis operation; on a Redis failure answer ``default`` and warn once per outage."""
        with self._lock:
            if self._down_until is not None and time.monotonic() < self._down_until:
                return default
        try:
            result = fn()
        except self._redis_error as exc:
            with self._lock:
                first = self._down_until is None
                self._down_until = time.monotonic() + self._RETRY_AFTER_S
            if first:
                log.warning("result cache: Redis unavailable (%s); serving without the cache until it is back", exc)
            return default
        with self._lock:
            recovered, self._down_until = self._down_until is not None, None
        if recovered:
            log.warning("result cache: Redis is reachable again")
        return result


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def make_cache(redis_url: str | None, images: ImageStore, *, ttl_s: int, max_bytes: int) -> ResultCache:
    """Redis when a URL is given (replicas share it), else the embedded byte-bounded LRU."""
    if redis_url:
        return RedisCache(redis_url, ttl_s=ttl_s)
    return EmbeddedCache(images, max_bytes=max_bytes)


class Coalescer:
    """Identical requests in flight share one generation.

    The work runs in its own task: a caller that goes away (cancelled) does not cancel it for the
    others; only when every caller has gone is the work itself cancelled, so the GPU is not spent
    on a result nobody waits for. The work runs with the first caller's job: when it ends because
    of that caller alone (cancelled, or past its deadline), the others start again with their own.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, tuple[asyncio.Task[Any], list[int]]] = {}

    async def run(self, key: str, produce: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """(result, shared): shared is True for callers that joined a run already in flight."""
        slot = self._tasks.get(key)
        shared = slot is not None
        if slot is None:
            async def call() -> T:
                return await produce()

            task: asyncio.Task[Any] = asyncio.ensure_future(call())
            slot = (task, [0])
            self._tasks[key] = slot
            task.add_done_callback(lambda t, k=key, s=slot: self._done(k, s, t))
        task, waiters = slot
        waiters[0] += 1
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done() and waiters[0] == 1:  # the last caller left: nobody wants the result
                if self._tasks.get(key) is slot:
                    del self._tasks[key]  # a new caller must start afresh, not join a cancelled run
                task.cancel()
            raise
        except (Cancelled, DeadlineExceeded):
            if not shared:
                raise
            retry = True  # the first caller's cancellation or deadline, not this caller's
        else:
            retry = False
        finally:
            waiters[0] -= 1
        if retry:
            return await self.run(key, produce)
        return result, shared

    def _done(self, key: str, slot: tuple[asyncio.Task[Any], list[int]], task: asyncio.Task[Any]) -> None:
        if self._tasks.get(key) is slot:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so an abandoned failure logs no "never retrieved" warning

    def in_flight(self) -> int:
        return len(self._tasks)
