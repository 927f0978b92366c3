"""Graceful shutdown that answers: from SIGTERM until the process exits, every request gets a reply.

Why it lives in the worker, and why uvicorn is told to exit only at the end: ``bentoml serve`` (BentoML
1.4.39) is a parent process (circus) that holds the listening socket and runs the workers that accept on
it. On SIGTERM the parent signals its workers and waits for them (``graceful_timeout`` of a day) before
it closes the socket. Uvicorn, on SIGTERM, stops accepting at once; the kernel then keeps completing
connections on the parent's socket that no process accepts, so clients hang until the parent exits and
are then reset. So ``Drain`` takes SIGTERM in front of uvicorn and keeps the worker serving: new
generation requests and task submissions are answered ``503`` with ``Retry-After`` (the gateway),
``/readyz`` answers ``503`` (so load balancers stop sending), status, results and images keep answering.
Running work has ``grace_s`` to finish; what is left then fails with reason ``shutdown`` (journaled).
When no work is left, the last worker shuts the listening socket down, so the kernel refuses new
connections instead of queueing them for nobody, and only then is uvicorn told to exit.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import threading
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)


class Drain:
    def __init__(self, grace_s: float, *, poll_s: float = 0.05, settle_s: float = 0.5) -> None:
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.settle_s = settle_s
        """After the last job ends: time for its waiting request to write its answer before uvicorn stops."""
        self.scheduler: Any = None
        self._draining = threading.Event()
        self.done = threading.Event()
        """Set when the drain is over and the process has been told to exit."""

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def install(self, sig: int = signal.SIGTERM) -> None:
        """Take ``sig`` in front of the handler in place (uvicorn's), which runs once the drain is over.
        Only possible from the main thread. A second signal during the drain exits at once."""
        previous = signal.getsignal(sig)

        def exit_now(signum: int = sig, frame: Any = None) -> None:
            if callable(previous):
                previous(signum, frame)

        def handler(signum: int, frame: Any) -> None:
            if self.draining:
                logger.warning("second %s during the drain: exiting now", signal.Signals(signum).name)
                exit_now(signum, frame)
                return
            self.begin(exit=lambda: exit_now(signum, frame))

        signal.signal(sig, handler)

    def begin(self, exit: Callable[[], None] | None = None) -> None:
        if self._draining.is_set():
            return
        self._draining.set()
        logger.warning("shutting down: no new requests; running work has %.0f s to finish", self.grace_s)
        if self.scheduler is not None:
            self.scheduler.close()
        threading.Thread(target=self._drain, args=(exit,), name="sdxl-drain", daemon=True).start()

    def _idle(self) -> bool:
        return self.scheduler is None or self.scheduler.depth() == (0, 0)

    def _wait_idle(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not self._idle():
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_s)
        return True

    def _drain(self, exit: Callable[[], None] | None) -> None:
        if not self._wait_idle(self.grace_s):
            self.expire()
            if not self._wait_idle(30):
                logger.error("work still running 30 s after the grace period; exiting anyway")
        time.sleep(self.settle_s)
        if _last_worker():
            _refuse_new_connections()
        logger.info("drained: exiting")
        self.done.set()
        if exit is not None:
            exit()

    def expire(self) -> None:
        """The grace period is over: what waits fails now, what runs stops at its next step (``shutdown``)."""
        if self.scheduler is not None:
            logger.warning("grace period over: failing the work that is left (reason shutdown)")
            self.scheduler.stop(reason="shutdown", cancel_running=True)


def _last_worker() -> bool:
    """No other worker of this server (a sibling process running BentoML's worker) is still alive."""
    try:
        import psutil

        me = psutil.Process()
        parent = me.parent()
        if parent is None:
            return True
        for sibling in parent.children():
            if sibling.pid == me.pid:
                continue
            try:
                if sibling.status() != psutil.STATUS_ZOMBIE and any("_bentoml_impl.worker" in part
                                                                    for part in sibling.cmdline()):
                    return False
            except psutil.Error:
                continue
    except Exception:  # psutil missing or /proc unreadable: keep the socket, as BentoML would
        return False
    return True


def _refuse_new_connections() -> None:
    """``shutdown()`` this process's listening TCP sockets: the socket is shared with BentoML's parent, and
    a shut-down socket makes the kernel refuse new connections at once instead of queueing them."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and \
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.shutdown(socket.SHUT_RDWR)
                logger.info("listening socket %s shut down: new connections are refused", sock.getsockname())
        except OSError:
            pass
        finally:
            sock.close()
