"""The fixes of BentoML 1.4.39's HTTP stack, against the locked BentoML's own classes."""

from __future__ import annotations

import asyncio

from sdxl_bento.http import upstream


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _serve(middleware, requests: int) -> int:
    """Timers still pending after ``requests`` requests have been answered."""
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        return None

    for _ in range(requests):
        await middleware({"type": "http", "path": "/jobs/status"}, receive, send)
    loop = asyncio.get_running_loop()
    return sum(1 for handle in loop._scheduled if not handle.cancelled())


def test_request_timers_are_cancelled_when_the_request_ends():
    from bentoml._internal.server.http import traffic

    upstream.cancel_request_timers()
    patched = traffic.TimeoutMiddleware
    original = patched.__mro__[1]
    assert patched.cancels_timer and original.__name__ == "TimeoutMiddleware"
    # BentoML's own keeps one pending six-minute timer (and the request's context) per request answered
    assert asyncio.run(_serve(original(_ok, timeout=360), 50)) == 50
    assert asyncio.run(_serve(patched(_ok, timeout=360), 50)) == 0
    upstream.cancel_request_timers()  # applying twice changes nothing
    assert traffic.TimeoutMiddleware is patched


def test_a_request_over_the_timeout_still_gets_504():
    from bentoml._internal.server.http import traffic

    upstream.cancel_request_timers()

    async def slow(scope, receive, send):
        await asyncio.sleep(5)

    sent = []

    async def run():
        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await traffic.TimeoutMiddleware(slow, timeout=0.05)({"type": "http", "path": "/x"}, receive, send)

    asyncio.run(run())
    assert sent[0]["status"] == 504
