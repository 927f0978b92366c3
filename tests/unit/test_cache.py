"""The result cache (embedded LRU and a real redis-server) and the in-flight request coalescer."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from sdxl_bento.core.cache import CachedImage, Coalescer, EmbeddedCache, RedisCache, cache_key, make_cache
from sdxl_bento.core.images import ImageStore

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")


def _image(store: ImageStore, data: bytes, seed: int = 1) -> CachedImage:
    image_id = store.save(data, "png")
    return CachedImage(id=image_id, seed=seed, media_type="image/png", width=8, height=8,
                       parameters=f"a cat\nSeed: {seed}", data=data)


# -- cache_key ---------------------------------------------------------------------------------
def test_cache_key_is_canonical_and_covers_everything():
    params = {"prompt": "a cat", "steps": 30, "guidance_scale": 7.5, "seeds": [1, 2], "nested": {"a": 1, "b": 2}}
    reordered = {"nested": {"b": 2, "a": 1}, "seeds": [1, 2], "guidance_scale": 7.5, "steps": 30, "prompt": "a cat"}
    key = cache_key(params, "sdxl-base:v1", "png")
    assert key == cache_key(reordered, "sdxl-base:v1", "png")
    assert len(key) == 64 and int(key, 16) >= 0
    variants = [
        cache_key({**params, "prompt": "a dog"}, "sdxl-base:v1", "png"),
        cache_key({**params, "steps": 31}, "sdxl-base:v1", "png"),
        cache_key({**params, "guidance_scale": 7.0}, "sdxl-base:v1", "png"),
        cache_key({**params, "seeds": [2, 1]}, "sdxl-base:v1", "png"),
        cache_key({**params, "extra": None}, "sdxl-base:v1", "png"),
        cache_key(params, "sdxl-base:v2", "png"),
        cache_key(params, "sdxl-base:v1", "webp"),
    ]
    assert len({key, *variants}) == len(variants) + 1


# -- EmbeddedCache -----------------------------------------------------------------------------
def test_embedded_round_trip_and_stats(tmp_path):
    store = ImageStore(tmp_path / "images")
    cache = EmbeddedCache(store)
    images = [_image(store, b"x" * 100, seed=1), _image(store, b"y" * 50, seed=2)]
    assert cache.get("k") is None
    cache.put("k", images)
    assert cache.get("k") == images
    assert cache.get("k") == images
    assert cache.get("other") is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.bytes, stats.entries, stats.backend) == (2, 2, 150, 1, "memory")
    cache.put("k", images[:1])  # replacing an entry replaces its bytes
    assert cache.stats().bytes == 100 and cache.stats().entries == 1


def test_embedded_evicts_least_recently_used_by_bytes(tmp_path):
    store = ImageStore(tmp_path / "images")
    cache = EmbeddedCache(store, max_bytes=250)
    a, b, c = (_image(store, bytes([i]) * 100) for i in range(3))
    cache.put("a", [a])
    cache.put("b", [b])
    assert cache.get("a") == [a]  # a is now more recently used than b
    cache.put("c", [c])  # 300 bytes > 250: b goes
    assert cache.get("b") is None
    assert cache.get("a") == [a] and cache.get("c") == [c]
    assert cache.stats().bytes == 200 and cache.stats().entries == 2
    cache.put("huge", [_image(store, b"z" * 251)])  # larger than the whole cache: not kept, evicts nothing
    assert cache.get("huge") is None and cache.stats().entries == 2


def test_embedded_entry_with_a_deleted_file_is_a_miss(tmp_path):
    store = ImageStore(tmp_path / "images")
    cache = EmbeddedCache(store)
    kept, deleted = _image(store, b"k" * 10), _image(store, b"d" * 10)
    cache.put("k", [kept, deleted])
    store.find(deleted.id)[0].unlink()
    assert cache.get("k") is None
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.misses) == (0, 0, 1)


def test_make_cache_picks_the_backend(tmp_path):
    store = ImageStore(tmp_path / "images")
    assert isinstance(make_cache(None, store, ttl_s=60, max_bytes=10), EmbeddedCache)
    cache = make_cache("redis://127.0.0.1:1/0", store, ttl_s=60, max_bytes=10)  # no connection until used
    assert isinstance(cache, RedisCache) and cache.ttl_s == 60
    cache.close()


# -- RedisCache against a real redis-server ----------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    import redis

    port = _free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
    client.close()
    return proc, url


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=5)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH")
    proc, url = _start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    _stop(proc)


@pytest.fixture
def redis_cache(redis_url):
    cache = RedisCache(redis_url, ttl_s=600, prefix=f"test-{uuid.uuid4().hex}:")
    yield cache
    cache.close()


@needs_redis
def test_redis_round_trip_and_stats(redis_cache, tmp_path):
    store = ImageStore(tmp_path / "images")
    images = [_image(store, b"\x89PNG one", seed=1), _image(store, b"\x89PNG two!", seed=2)]
    assert redis_cache.get("k") is None
    redis_cache.put("k", images)
    assert redis_cache.get("k") == images
    stats = redis_cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes, stats.backend) == (1, 1, 1, 17, "redis")


@needs_redis
def test_redis_stores_identical_bytes_once_with_a_ttl(redis_cache, tmp_path):
    store = ImageStore(tmp_path / "images")
    data = b"\x89PNG same bytes"
    first, second = _image(store, data, seed=5), _image(store, data, seed=5)
    redis_cache.put("k1", [first])
    redis_cache.put("k2", [second])
    client = redis_cache.client
    blobs = list(client.scan_iter(match=redis_cache.prefix + "blob:*"))
    entries = list(client.scan_iter(match=redis_cache.prefix + "entry:*"))
    assert len(blobs) == 1 and len(entries) == 2
    assert client.get(blobs[0]) == data
    for key in blobs + entries:
        assert 0 < client.ttl(key) <= 600
    assert redis_cache.get("k1") == [first] and redis_cache.get("k2") == [second]
    assert redis_cache.stats().bytes == len(data)


@needs_redis
def test_a_missing_blob_is_a_miss(redis_cache, tmp_path):
    store = ImageStore(tmp_path / "images")
    redis_cache.put("k", [_image(store, b"a"), _image(store, b"b")])
    blobs = list(redis_cache.client.scan_iter(match=redis_cache.prefix + "blob:*"))
    assert len(blobs) == 2
    redis_cache.client.delete(blobs[0])  # one of two expired: the entry is not answered in part
    assert redis_cache.get("k") is None


@needs_redis
def test_another_replica_sees_the_entry(redis_cache, redis_url, tmp_path):
    store = ImageStore(tmp_path / "images")
    images = [_image(store, b"\x89PNG shared")]
    redis_cache.put("k", images)
    replica = RedisCache(redis_url, ttl_s=600, prefix=redis_cache.prefix)
    try:
        assert replica.get("k") == images
        assert replica.stats().hits == 1 and redis_cache.stats().hits == 0
    finally:
        replica.close()


@needs_redis
def test_a_dead_redis_is_a_miss_never_an_error(tmp_path, caplog):
    proc, url = _start_redis(tmp_path / "redis")
    store = ImageStore(tmp_path / "images")
    cache = RedisCache(url, ttl_s=600)
    images = [_image(store, b"\x89PNG before")]
    try:
        cache.put("k", images)
        assert cache.get("k") == images
        _stop(proc)
        with caplog.at_level(logging.WARNING, logger="sdxl_bento.core.cache"):
            started = time.monotonic()
            assert cache.get("k") is None
            cache.put("k2", images)  # silent
            assert cache.get("k2") is None
            stats = cache.stats()
            assert time.monotonic() - started < 3
        assert (stats.hits, stats.misses, stats.backend) == (1, 2, "redis")
        assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    finally:
        cache.close()
        _stop(proc)


# -- Coalescer ---------------------------------------------------------------------------------
def test_identical_requests_share_one_run():
    async def main():
        coalescer, calls = Coalescer(), {"a": 0, "b": 0}

        def producer(key):
            async def produce():
                calls[key] += 1
                await asyncio.sleep(0.05)
                return object()
            return produce

        runs = [coalescer.run("a", producer("a")) for _ in range(10)] + [coalescer.run("b", producer("b"))]
        results = await asyncio.gather(*runs)
        assert coalescer.in_flight() == 0
        return calls, results

    calls, results = asyncio.run(main())
    assert calls == {"a": 1, "b": 1}
    same = results[:10]
    assert len({id(result) for result, _ in same}) == 1
    assert sorted(shared for _, shared in same) == [False] + [True] * 9
    assert results[10][1] is False and results[10][0] is not same[0][0]


def test_an_exception_reaches_every_joiner():
    async def main():
        coalescer, calls = Coalescer(), []

        async def produce():
            calls.append(1)
            await asyncio.sleep(0.02)
            raise ValueError("boom")

        outcomes = await asyncio.gather(*(coalescer.run("k", produce) for _ in range(5)), return_exceptions=True)
        assert coalescer.in_flight() == 0
        # the key is free again: a later call runs afresh
        async def ok():
            return "fine"
        return calls, outcomes, await coalescer.run("k", ok)

    calls, outcomes, later = asyncio.run(main())
    assert len(calls) == 1
    assert all(isinstance(o, ValueError) for o in outcomes) and len({id(o) for o in outcomes}) == 1
    assert later == ("fine", False)


def test_cancelling_the_first_caller_does_not_cancel_the_others():
    async def main():
        coalescer, release, calls = Coalescer(), asyncio.Event(), []

        async def produce():
            calls.append(1)
            await release.wait()
            return "image"

        first = asyncio.create_task(coalescer.run("k", produce))
        await asyncio.sleep(0)
        others = [asyncio.create_task(coalescer.run("k", produce)) for _ in range(3)]
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0.01)
        assert first.cancelled() and coalescer.in_flight() == 1
        release.set()
        return calls, await asyncio.gather(*others)

    calls, results = asyncio.run(main())
    assert len(calls) == 1 and results == [("image", True)] * 3


def test_work_is_cancelled_once_every_caller_has_gone():
    async def main():
        coalescer, state = Coalescer(), {}

        async def produce():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                state["cancelled"] = True
                raise

        callers = [asyncio.create_task(coalescer.run("k", produce)) for _ in range(2)]
        await asyncio.sleep(0.01)
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        await asyncio.sleep(0.01)
        return state, coalescer.in_flight()

    state, in_flight = asyncio.run(main())
    assert state == {"cancelled": True} and in_flight == 0
