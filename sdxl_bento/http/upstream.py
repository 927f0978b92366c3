"""Fixes for two faults of BentoML 1.4.39's HTTP stack that a long-running service cannot live with.

Both replace a middleware class in BentoML's module before the app is built (``service.py`` calls
``apply`` at import, before BentoML builds the ASGI app in the worker): no setting changes either behaviour.
They are tied to the locked BentoML version; ``tests/unit/test_upstream.py`` checks them against it.

- ``TimeoutMiddleware`` schedules a timer of ``traffic.timeout`` seconds for every request and never
  cancels it: each request's future and context (its OpenTelemetry span, BentoML's request context) stay
  referenced until the timer fires, six minutes later here. Under a few hundred requests a second (task
  status polls) a worker's memory grew by gigabytes. The fix cancels the timer when the request ends.
- Its request metrics (``bentoml_service_request_*``) are labelled with the path as sent, in a middleware
  that runs before any of ours: every image id downloaded and every random path a client tries adds series to
  the Prometheus files, without bound. The fix shows that middleware the route's template instead, while the
  app behind it receives the request as sent.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any, Callable


def apply(template: Callable[[str], str]) -> None:
    cancel_request_timers()
    bound_request_metric_labels(template)


def cancel_request_timers() -> None:
    from bentoml._internal.server.http import traffic

    base = traffic.TimeoutMiddleware
    if getattr(base, "cancels_timer", False):
        return

    class CancellingTimeout(base):  # type: ignore[misc, valid-type]
        cancels_timer = True

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] not in ("http", "websocket"):
                return await self.app(scope, receive, send)
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

            async def _send(message: Any) -> None:
                if not waiter.done():
                    waiter.set_result(None)
                await send(message)

            fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
            try:
                await waiter
            except asyncio.TimeoutError:
                if fut.cancel():
                    from starlette.responses import JSONResponse

                    await JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                       status_code=504)(scope, receive, send)
            else:
                await fut
            finally:
                timer.cancel()

    traffic.TimeoutMiddleware = CancellingTimeout


def bound_request_metric_labels(template: Callable[[str], str]) -> None:
    """Label BentoML's own request metrics by ``template(path)``, the route, not by the path sent."""
    from bentoml._internal.server.http import instruments

    base = instruments.RunnerTrafficMetricsMiddleware
    if getattr(base, "bounded_labels", False):
        return

    class BoundedLabels(base):  # type: ignore[misc, valid-type]
        bounded_labels = True

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if not scope["type"].startswith("http") or scope["path"] == "/metrics":
                return await super().__call__(scope, receive, send)
            if not self._is_setup:
                self._setup()
            inner = self.app

            async def as_sent(_labelled: Any, receive_: Any, send_: Any) -> None:
                await inner(scope, receive_, send_)

            view = copy.copy(self)  # this request's view: same metrics, the app behind it gets the real scope
            view.app = as_sent
            await base.__call__(view, {**scope, "path": template(scope["path"])}, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = BoundedLabels
