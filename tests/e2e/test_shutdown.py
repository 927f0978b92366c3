"""Deploys and restarts lose nothing, against the real service: a drain that answers every request, task
results that outlive the process (SIGTERM or SIGKILL), and a rolling restart behind a proxy with no
client-visible failure."""

from __future__ import annotations

import http.server
import itertools
import os
import signal
import threading
import time

import httpx
import pytest

from .conftest import Server, private_home, service_env

pytestmark = pytest.mark.e2e
LONG = {"width": 1024, "height": 1024, "steps": 100}
SMALL = {"width": 256, "height": 256, "steps": 2}


def submit(srv: Server, body: dict) -> str:
    r = httpx.post(f"{srv.url}/jobs/submit", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["task_id"]


def status(srv: Server, task_id: str) -> dict:
    return httpx.get(f"{srv.url}/jobs/status", params={"task_id": task_id}, timeout=30).json()


def wait_until(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def completed_task(srv: Server) -> tuple[str, dict]:
    task_id = submit(srv, {"prompt": "finished before the stop", "seed": 11, **SMALL})
    wait_until(lambda: status(srv, task_id)["status"] == "completed")
    result = httpx.get(f"{srv.url}/jobs/get", params={"task_id": task_id}, timeout=30)
    assert result.status_code == 200
    return task_id, result.json()


def running_and_queued(srv: Server) -> tuple[str, str]:
    running = submit(srv, {"prompt": "running", **LONG})
    wait_until(lambda: status(srv, running).get("state") == "running")
    queued = submit(srv, {"prompt": "queued", **LONG})
    return running, queued


def test_sigterm_drains_answering_every_request_then_results_outlive_the_process(bentoml_home, tmp_path):
    env = service_env(private_home(bentoml_home, tmp_path), tmp_path / "images", concurrency=1, timeout=300,
                      shutdown_grace_s=3)
    first = Server(env, tmp_path / "first.log")
    outcomes: list[tuple[str, float, object]] = []
    stop = threading.Event()
    try:
        first.wait_ready()
        done, answer = completed_task(first)
        running, queued = running_and_queued(first)

        def client(kind: str) -> None:
            """Fresh connections, as many clients behind a load balancer would send."""
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    if kind == "generate":
                        r = httpx.post(f"{first.url}/generate", json={"prompt": "during the drain", **SMALL},
                                       timeout=60)
                    elif kind == "readyz":
                        r = httpx.get(f"{first.url}/readyz", timeout=10)
                    else:
                        r = httpx.get(f"{first.url}/jobs/status", params={"task_id": done}, timeout=10)
                    outcomes.append((kind, sent, r))
                except httpx.HTTPError as exc:
                    outcomes.append((kind, sent, exc))
                time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(kind,)) for kind in
                   ("generate", "generate", "generate", "readyz", "status")]
        for t in threads:
            t.start()
        time.sleep(1)
        signalled = time.monotonic()
        os.killpg(first.proc.pid, signal.SIGTERM)
        first.proc.wait(90)
        exited = time.monotonic()
        stop.set()
        for t in threads:
            t.join(70)
    finally:
        stop.set()
        first.stop()
    assert exited - signalled < 60  # the grace period (3 s) bounds the drain, not the 100-step jobs
    during = [(kind, sent, r) for kind, sent, r in outcomes if signalled < sent < exited]
    assert len(during) > 10
    for kind, sent, r in during:
        if isinstance(r, httpx.ConnectError):  # refused at once: only at the very end, once all work is over
            assert sent > exited - 2, (kind, round(sent - signalled, 2))
            continue
        assert isinstance(r, httpx.Response), (kind, round(sent - signalled, 2), repr(r))  # never reset or hung
        if kind == "generate":
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert r.json()["error"]["type"] == "shutdown"
        elif kind == "readyz":
            assert r.status_code == 503
        else:
            assert r.status_code == 200 and r.json()["status"] == "completed"
    answered = [(kind, sent, r) for kind, sent, r in during if isinstance(r, httpx.Response)]
    assert {"generate", "readyz", "status"} <= {kind for kind, _, _ in answered}
    first_unready = min(sent for kind, sent, r in answered if kind == "readyz")
    assert first_unready - signalled < 1
    late = [r for kind, sent, r in outcomes if sent >= exited]
    assert all(isinstance(r, httpx.ConnectError) for r in late)  # after exit: refused at once
    assert "shutting down: no new requests" in first.log.read_text()

    second = Server(env, tmp_path / "second.log")
    try:
        second.wait_ready()
        assert status(second, done)["status"] == "completed"
        again = httpx.get(f"{second.url}/jobs/get", params={"task_id": done}, timeout=30)
        assert again.status_code == 200 and again.json() == answer  # the same answer, after the restart
        image = httpx.get(f"{second.url}{answer['images'][0]['url']}", timeout=30)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        ran = status(second, running)  # finished within the grace period, or failed when it ended
        assert ran["status"] == "completed" or (ran["status"] == "failed" and ran["reason"] == "shutdown"), ran
        st = status(second, queued)
        assert st["status"] == "failed" and st["reason"] == "shutdown", st
        assert httpx.get(f"{second.url}/jobs/get", params={"task_id": queued}).status_code == 410
    finally:
        second.stop()


def test_after_sigkill_of_the_whole_tree_every_task_answers_its_true_end(bentoml_home, tmp_path):
    env = service_env(private_home(bentoml_home, tmp_path), tmp_path / "images", concurrency=1, timeout=300)
    first = Server(env, tmp_path / "first.log")
    try:
        first.wait_ready()
        done, answer = completed_task(first)
        running, queued = running_and_queued(first)
    finally:
        first.crash()
    second = Server(env, tmp_path / "second.log")
    try:
        second.wait_ready()
        assert status(second, done)["status"] == "completed"
        assert httpx.get(f"{second.url}/jobs/get", params={"task_id": done}).json() == answer
        for task_id in (running, queued):
            st = status(second, task_id)
            assert st["status"] == "failed" and st["reason"] == "restart", st
            r = httpx.get(f"{second.url}/jobs/get", params={"task_id": task_id})
            assert r.status_code == 410 and r.json()["error"]["type"] == "restart"
            assert httpx.put(f"{second.url}/jobs/cancel", params={"task_id": task_id}).status_code == 409
        unknown = httpx.get(f"{second.url}/jobs/status", params={"task_id": "0" * 32})
        assert unknown.status_code == 404  # only ids never issued are unknown
    finally:
        second.stop()


class RetryingProxy:
    """A load balancer on loopback: round robin over the replicas; a 503 or a refused connection is tried
    on the next one (as Kubernetes' endpoints plus a retrying client or ingress would)."""

    def __init__(self, backends: list[str]) -> None:
        self.backends = list(backends)
        self._turn = itertools.count()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status, content = proxy.forward(self.path, body)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(self, path: str, body: bytes) -> tuple[int, bytes]:
        last: tuple[int, bytes] = (502, b'{"error": "no replica answered"}')
        for _ in range(40):
            backends = list(self.backends)
            backend = backends[next(self._turn) % len(backends)]
            try:
                r = httpx.post(backend + path, content=body, headers={"content-type": "application/json"},
                               timeout=60)
            except httpx.HTTPError as exc:
                last = (502, repr(exc).encode())
                time.sleep(0.05)
                continue
            if r.status_code != 503:
                return r.status_code, r.content
            last = (503, r.content)
            time.sleep(0.05)
        return last

    def close(self) -> None:
        self.server.shutdown()


def test_a_rolling_restart_behind_a_proxy_has_no_client_visible_failure(bentoml_home, tmp_path):
    def replica(name: str) -> Server:
        root = tmp_path / name
        return Server(service_env(private_home(bentoml_home, root), root / "images", concurrency=1, timeout=120,
                                  shutdown_grace_s=10), tmp_path / f"{name}.log")

    a, b = replica("a"), replica("b")
    new_a = None
    proxy = None
    results: list[int | str] = []
    stop = threading.Event()
    try:
        a.wait_ready()
        b.wait_ready()
        proxy = RetryingProxy([a.url, b.url])

        def client(i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = httpx.post(f"{proxy.url}/generate", json={"prompt": f"client {i} #{n}", **SMALL},
                                   timeout=120)
                    results.append(r.status_code)
                except httpx.HTTPError as exc:
                    results.append(repr(exc))

        clients = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in clients:
            t.start()
        time.sleep(2)
        # the rollout: a new pod comes up and joins, the old one is signalled, drains and leaves
        new_a = replica("new-a")
        new_a.wait_ready()
        proxy.backends = [a.url, b.url, new_a.url]
        os.killpg(a.proc.pid, signal.SIGTERM)
        a.proc.wait(60)
        proxy.backends = [b.url, new_a.url]  # the endpoints controller drops the old pod
        time.sleep(2)
        stop.set()
        for t in clients:
            t.join(120)
    finally:
        stop.set()
        for srv in (a, b, new_a):
            if srv is not None:
                srv.stop()
        if proxy is not None:
            proxy.close()
    assert len(results) > 10
    assert all(code == 200 for code in results), [r for r in results if r != 200][:5]
