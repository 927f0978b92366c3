"""Drain: SIGTERM closes admission, lets work finish within the grace period, fails what is left, and only
then tells the server (uvicorn) to exit."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from sdxl_bento.http import shutdown
from sdxl_bento.http.shutdown import Drain


class FakeScheduler:
    def __init__(self, busy: bool) -> None:
        self.busy = busy
        self.closed = False
        self.stopped: tuple | None = None

    def close(self) -> None:
        self.closed = True

    def depth(self) -> tuple[int, int]:
        return (1, 1) if self.busy else (0, 0)

    def stop(self, reason: str = "shutdown", cancel_running: bool = False) -> None:
        self.stopped = (reason, cancel_running)
        self.busy = False


def drain(grace_s: float, scheduler: FakeScheduler) -> tuple[Drain, list[float]]:
    d = Drain(grace_s, poll_s=0.01, settle_s=0.01)
    d.scheduler = scheduler
    return d, []


def test_work_that_ends_in_time_is_not_failed_and_exit_waits_for_it(monkeypatch):
    monkeypatch.setattr(shutdown, "_last_worker", lambda: False)
    scheduler = FakeScheduler(busy=True)
    d, exits = drain(5, scheduler)
    d.begin(exit=lambda: exits.append(time.monotonic()))
    assert d.draining and scheduler.closed
    time.sleep(0.2)
    assert exits == []  # still serving: work is running
    started = time.monotonic()
    scheduler.busy = False
    assert d.done.wait(2) and exits and exits[0] - started < 1
    assert scheduler.stopped is None


def test_after_the_grace_period_what_is_left_fails_with_reason_shutdown(monkeypatch):
    monkeypatch.setattr(shutdown, "_last_worker", lambda: False)
    scheduler = FakeScheduler(busy=True)
    d, exits = drain(0.2, scheduler)
    d.begin(exit=lambda: exits.append(1))
    assert d.done.wait(3) and exits == [1]
    assert scheduler.stopped == ("shutdown", True)


def test_the_signal_handler_chains_to_the_server_only_at_the_end(monkeypatch):
    monkeypatch.setattr(shutdown, "_last_worker", lambda: False)
    called = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: called.append(signum))
    try:
        scheduler = FakeScheduler(busy=True)
        d, _ = drain(5, scheduler)
        d.install(signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert d.draining and called == []  # uvicorn would stop accepting here: not yet
        scheduler.busy = False
        assert d.done.wait(2)
        assert called == [signal.SIGUSR1]
        d2, _ = drain(5, FakeScheduler(busy=True))  # a second signal during a drain exits at once
        d2.install(signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert called.count(signal.SIGUSR1) >= 2
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_shut_down_listening_socket_refuses_instead_of_queueing():
    """The socket is shared with another process (as with BentoML's parent): closing ours is not enough,
    shutting it down is."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    parent_copy = os.dup(listener.fileno())  # what the parent process keeps
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # queued, accepted by nobody
        shutdown._refuse_new_connections()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1)
    finally:
        listener.close()
        os.close(parent_copy)
