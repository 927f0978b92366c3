"""Graceful shutdown: on SIGTERM, stop admitting, let running work finish within a grace period,
then fail what could not finish with reason ``shutdown``.

BentoML's worker runs uvicorn, which on SIGTERM stops accepting connections and waits for the
requests in flight, with no bound of its own. ``Drain`` chains its handler in front of uvicorn's:
the gateway answers new requests 503 with Retry-After, and after the grace period the scheduler
fails everything still waiting or running, so every request and task ends with a reason and the
process exits. Task outcomes land in the journal, which outlives the process.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)


class Drain:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.scheduler: Any = None
        self._draining = threading.Event()
        self._timer: threading.Timer | None = None

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def install(self, sig: int = signal.SIGTERM) -> None:
        """Chain in front of the handler in place (uvicorn's); only possible from the main thread."""
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any) -> None:
            self.begin()
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)

    def begin(self) -> None:
        if self._draining.is_set():
            return
        self._draining.set()
        logger.warning("shutting down: no new requests; running work has %.0f s to finish", self.grace_s)
        if self.scheduler is not None:
            self.scheduler.close()
        self._timer = threading.Timer(self.grace_s, self.expire)
        self._timer.daemon = True
        self._timer.start()

    def expire(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop(reason="shutdown", cancel_running=True)
