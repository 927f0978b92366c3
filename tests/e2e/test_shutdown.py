"""Graceful shutdown of the real service: SIGTERM, a grace period, every request and task ends with a reason."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from .conftest import Server, private_home, service_env

pytestmark = pytest.mark.e2e
LONG = {"width": 1024, "height": 1024, "steps": 100}


def test_sigterm_drains_then_fails_what_is_left_with_reason_shutdown(bentoml_home, tmp_path):
    env = service_env(private_home(bentoml_home, tmp_path), tmp_path / "images", concurrency=1, timeout=300,
                      shutdown_grace_s=2)
    first = Server(env, tmp_path / "first.log")
    try:
        first.wait_ready()
        running = httpx.post(f"{first.url}/jobs/submit", json={"prompt": "running", **LONG}).json()["task_id"]
        for _ in range(100):
            if httpx.get(f"{first.url}/jobs/status", params={"task_id": running}).json().get("state") == "running":
                break
            time.sleep(0.1)
        queued = httpx.post(f"{first.url}/jobs/submit", json={"prompt": "queued", **LONG}).json()["task_id"]
        answers = {}
        sync = threading.Thread(target=lambda: answers.update(r=httpx.post(
            f"{first.url}/generate", json={"prompt": "in flight", **LONG}, timeout=120)))
        sync.start()
        time.sleep(0.5)
        started = time.monotonic()
        os.killpg(first.proc.pid, signal.SIGTERM)
        first.proc.wait(60)
        assert time.monotonic() - started < 45  # the grace period (2 s) bounds the wait, not the 100-step jobs
        sync.join(30)
        r = answers["r"]
        assert r.status_code == 503 and r.json()["error"]["type"] == "shutdown" and "retry-after" in r.headers
    finally:
        first.stop()
    assert "shutting down: no new requests" in first.log.read_text()
    second = Server(env, tmp_path / "second.log")
    try:
        second.wait_ready()
        for task_id in (running, queued):
            status = httpx.get(f"{second.url}/jobs/status", params={"task_id": task_id}).json()
            assert status["status"] == "failed" and status["reason"] == "shutdown", status
            assert httpx.get(f"{second.url}/jobs/get", params={"task_id": task_id}).status_code == 410
    finally:
        second.stop()
