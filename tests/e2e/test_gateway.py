"""The production gateway against real services: two `bentoml serve` processes sharing one real Redis.

Keys are made with the project's own command (`sdxl-bento keys add`); tiers are tightened in the keys
file so that limits are reached with a handful of cheap requests.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from .conftest import Server, private_home, redis_process, service_env

pytestmark = pytest.mark.e2e
CHEAP = {"width": 256, "height": 256, "steps": 2}
TIERS = {
    "free": {"max_steps": 10, "burst_requests": 50, "requests_per_minute": 600, "burst_images": 50,
             "images_per_minute": 600, "max_concurrent_jobs": 4, "default_deadline_s": 60},
    "standard": {"burst_requests": 3, "requests_per_minute": 0.5, "burst_images": 10, "images_per_minute": 10},
    "premium": {"burst_requests": 200, "requests_per_minute": 6000, "burst_images": 400, "images_per_minute": 6000},
}


@pytest.fixture(scope="module")
def redis_url():
    with redis_process() as running:
        yield running


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """name -> raw key; the file holds only hashes."""
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(yaml.safe_dump({"tiers": TIERS, "keys": []}))
    made = {}
    for name, tier in [("alice", "free"), ("bob", "free"), ("carol", "free"), ("dave", "free"),
                       ("limited", "standard"), ("shared", "standard"), ("boss", "premium"), ("vip", "premium"),
                       ("solo", "premium")]:
        out = subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "keys", "add", name, "--tier", tier,
                              "--file", str(path)], capture_output=True, text=True, check=True)
        made[name] = out.stdout.strip().splitlines()[-1]
    data = yaml.safe_load(path.read_text())
    for entry in data["keys"]:
        if entry["name"] == "solo":  # one request at a time, whichever replica it reaches
            entry["overrides"] = {"max_concurrent_jobs": 1}
    path.write_text(yaml.safe_dump(data))
    text = path.read_text()
    assert all(key not in text for key in made.values())
    return path, made


@pytest.fixture(scope="module")
def servers(bentoml_home, redis_url, keys, tmp_path_factory):
    """Two service processes (as two replicas) on one Redis and one keys file."""
    started = []
    for name in ("a", "b"):
        root = tmp_path_factory.mktemp(f"gateway-{name}")
        env = service_env(private_home(bentoml_home, root), root / "images", keys_file=keys[0],
                          redis_url=redis_url[0], concurrency=1, max_concurrency=16, timeout=60,
                          audit_log=root / "audit.jsonl", internal_secret="replicas-share-this-secret-0123")
        started.append(Server(env, root / "server.log", replica=True))
    try:
        for srv in started:
            srv.wait_ready()
        yield started
    finally:
        for srv in started:
            srv.stop()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def audit_lines(srv: Server) -> list[dict]:
    path = srv.log.parent / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_keys_are_required_and_checked(servers, keys):
    a = servers[0]
    body = {"prompt": "a cat", **CHEAP}
    for headers in ({}, {"Authorization": "Bearer sk-sdxl-wrong"}, {"X-API-Key": "nope"}):
        r = httpx.post(f"{a.url}/generate", json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    assert httpx.post(f"{a.url}/jobs/submit", json=body, timeout=60).status_code == 401
    assert httpx.post(f"{a.url}/generate", json=body, headers=auth(keys[1]["alice"]), timeout=60).status_code == 200
    assert httpx.post(f"{a.url}/generate", json=body, headers={"X-API-Key": keys[1]["alice"]},
                      timeout=60).status_code == 200
    assert httpx.get(f"{a.url}/readyz").status_code == 200  # health stays open
    log = (a.log.parent / "audit.jsonl").read_text()
    assert all(key not in log for key in keys[1].values())
    assert all(key not in a.log.read_text() for key in keys[1].values())


def test_tier_limits_are_403_naming_the_limit(servers, keys):
    a = servers[0]
    r = httpx.post(f"{a.url}/generate", json={"prompt": "x", **CHEAP, "steps": 20}, headers=auth(keys[1]["alice"]),
                   timeout=60)
    assert r.status_code == 403 and "steps 20 is above the free tier's limit of 10" in r.json()["error"]["message"]
    r = httpx.post(f"{a.url}/generate", json={"prompt": "x", **CHEAP, "refine": "ensemble"},
                   headers=auth(keys[1]["alice"]), timeout=60)
    assert r.status_code == 403 and "refiner" in r.json()["error"]["message"]
    r = httpx.post(f"{a.url}/generate", json={"prompt": "x", **CHEAP, "refine": "ensemble"},
                   headers=auth(keys[1]["boss"]), timeout=60)
    assert r.status_code == 200


def test_rate_limit_is_429_with_headers(servers, keys):
    a = servers[0]
    answers = [httpx.post(f"{a.url}/generate", json={"prompt": f"r{i}", **CHEAP}, headers=auth(keys[1]["limited"]),
                          timeout=60) for i in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit"] == "3"
    assert [r.headers["x-ratelimit-remaining"] for r in answers[:3]] == ["2", "1", "0"]
    refused = answers[3]
    assert int(refused.headers["retry-after"]) >= 1 and refused.headers["x-ratelimit-remaining"] == "0"
    assert int(refused.headers["x-ratelimit-reset"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limited"


def test_two_processes_share_one_limit_through_redis(servers, keys):
    a, b = servers
    codes = [httpx.post(f"{srv.url}/generate", json={"prompt": f"s{i}", **CHEAP}, headers=auth(keys[1]["shared"]),
                        timeout=60).status_code for i, srv in enumerate([a, b, a, b])]
    assert codes == [200, 200, 200, 429]


def _metric(srv: Server, name: str) -> float:
    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
              or line.startswith(name + "{")]
    return sum(values)


def test_identical_requests_cost_the_gpu_once(servers, keys):
    a = servers[0]
    before = _metric(a, "sdxl_images_generated_total")
    body = {"prompt": "coalesce me", "seed": 99, **CHEAP}

    def call(_):
        return httpx.post(f"{a.url}/generate", json=body, headers=auth(keys[1]["boss"]), timeout=60)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(call, range(10)))
    assert all(r.status_code == 200 for r in answers)
    assert len({r.json()["images"][0]["id"] for r in answers}) == 1
    caches = sorted(r.headers["x-cache"] for r in answers)
    assert caches.count("miss") == 1 and caches.count("hit") == 9
    assert _metric(a, "sdxl_images_generated_total") - before == 1
    # a request arriving while the first runs joins it (coalesced); one arriving after it reads the cache
    assert _metric(a, "sdxl_coalesced_requests_total") + _metric(a, "sdxl_cache_hits_total") >= 9
    assert _metric(a, "sdxl_cache_misses_total") >= 1
    again = call(0)
    assert again.headers["x-cache"] == "hit" and again.json()["timings"]["generate_s"] == 0
    assert _metric(a, "sdxl_cache_hits_total") >= 1 and _metric(a, "sdxl_cache_bytes") > 0
    unseeded = httpx.post(f"{a.url}/generate", json={"prompt": "coalesce me", **CHEAP}, headers=auth(keys[1]["boss"]),
                          timeout=60)
    assert "x-cache" not in unseeded.headers  # no seed: not cacheable by default


def _submit(srv: Server, key: str, body: dict) -> str:
    r = httpx.post(f"{srv.url}/jobs/submit", json=body, headers=auth(key), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["task_id"]


def _wait_done(srv: Server, key: str, task_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{srv.url}/jobs/status", params={"task_id": task_id}, headers=auth(key), timeout=30).json()
        if status["status"] != "in_progress":
            return status
        time.sleep(0.1)
    raise TimeoutError(task_id)


def test_premium_goes_first_under_load_and_tasks_are_private(servers, keys):
    a = servers[0]
    k = keys[1]
    blocker = _submit(a, k["vip"], {"prompt": "blocker", "width": 512, "height": 512, "steps": 40})
    time.sleep(0.5)
    free_tasks = [(name, _submit(a, k[name], {"prompt": f"free {name}", "width": 512, "height": 512, "steps": 10}))
                  for name in ("alice", "bob", "carol")]
    premium = _submit(a, k["boss"], {"prompt": "premium", "width": 512, "height": 512, "steps": 10})
    status = httpx.get(f"{a.url}/jobs/status", params={"task_id": premium}, headers=auth(k["boss"])).json()
    assert status["state"] in ("queued", "running")
    # another key cannot see, fetch or cancel it
    for method, action in (("GET", "status"), ("GET", "get"), ("PUT", "cancel")):
        r = httpx.request(method, f"{a.url}/jobs/{action}", params={"task_id": premium}, headers=auth(k["dave"]))
        assert r.status_code == 404
    for name, task_id in [("premium", premium), *free_tasks, ("blocker", blocker)]:
        key = k["boss"] if name == "premium" else k["vip"] if name == "blocker" else k[name]
        assert _wait_done(a, key, task_id)["status"] == "completed"
    order = [line["task_id"] for line in audit_lines(a) if line.get("task_id")]
    ends = {tid: i for i, tid in enumerate(order)}
    assert ends[premium] < min(ends[tid] for _, tid in free_tasks)


def test_deadline_is_answered_early_and_nothing_expired_runs(servers, keys):
    a = servers[0]
    k = keys[1]
    blocker = _submit(a, k["vip"], {"prompt": "blocker 2", "width": 512, "height": 512, "steps": 40})
    time.sleep(0.5)
    started = time.monotonic()
    r = httpx.post(f"{a.url}/generate", json={"prompt": "in a hurry", **CHEAP}, timeout=60,
                   headers={**auth(k["boss"]), "X-Request-Deadline": "0.5"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "deadline"
    assert int(r.headers["retry-after"]) >= 1 and time.monotonic() - started < 5
    assert httpx.post(f"{a.url}/generate", json={"prompt": "x", **CHEAP}, headers={
        **auth(k["boss"]), "X-Request-Deadline": "soon"}).status_code == 400
    _wait_done(a, k["vip"], blocker)
    line = [x for x in audit_lines(a) if x.get("prompt") == "in a hurry"][-1]
    assert line["outcome"] == "error" and line["reason"] == "deadline" and line["image_ids"] == []


def test_every_request_gets_one_complete_audit_line(servers, keys):
    b = servers[1]
    before = len(audit_lines(b))
    k = keys[1]

    def call(i):
        key = k["boss"] if i % 4 else "wrong-key"
        return httpx.post(f"{b.url}/generate", json={"prompt": f"audit {i}", "seed": i, **CHEAP}, headers=auth(key),
                          timeout=60)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, range(12)))
    for _ in range(50):  # a line is written once its answer has gone out: the last one may trail the client
        lines = audit_lines(b)[before:]
        if len(lines) >= 12:
            break
        time.sleep(0.1)
    assert len(lines) == 12
    assert sorted(line["status"] for line in lines) == sorted(r.status_code for r in answers)
    for line in lines:
        assert {"time", "key_name", "tier", "endpoint", "prompt", "parameters", "outcome", "status", "cache",
                "queue_s", "gpu_s", "image_ids"} <= set(line)
        if line["status"] == 200:
            assert line["key_name"] == "boss" and line["tier"] == "premium" and line["outcome"] == "ok"
            assert line["parameters"]["seed"] == int(line["prompt"].split()[-1]) and len(line["image_ids"]) == 1
            assert line["model"].startswith("sdxl-base:") and line["gpu_s"] is not None
        else:
            assert line["status"] == 401 and line["outcome"] == "rejected"


def test_a_task_is_reachable_through_any_replica(servers, keys):
    """Submitted to replica a; polled, fetched and cancelled through replica b (one Redis between them)."""
    a, b = servers
    boss = keys[1]["boss"]
    task_id = _submit(a, boss, {"prompt": "across replicas", **CHEAP, "steps": 4})
    assert _wait_done(b, boss, task_id)["status"] == "completed"
    result = httpx.get(f"{b.url}/jobs/get", params={"task_id": task_id}, headers=auth(boss), timeout=30)
    assert result.status_code == 200 and result.json()["images"][0]["width"] == 256
    image_url = result.json()["images"][0]["url"]
    assert httpx.get(f"{a.url}{image_url}").status_code == 200
    # the owner still checks the key: another key gets 404 through either replica
    assert httpx.get(f"{b.url}/jobs/status", params={"task_id": task_id}, headers=auth(keys[1]["dave"])).status_code == 404
    # its event stream and webhook record too (b has its own state folder: it relays a's)
    with httpx.stream("GET", f"{b.url}/jobs/events", params={"task_id": task_id}, headers=auth(boss),
                      timeout=30) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    assert "event: queued" in text and "event: completed" in text and "id: 1" in text
    assert httpx.get(f"{b.url}/jobs/webhooks", params={"task_id": task_id}, headers=auth(boss),
                     timeout=30).json() == {"task_id": task_id, "deliveries": []}
    for path in ("/jobs/events", "/jobs/webhooks"):
        assert httpx.get(f"{b.url}{path}", params={"task_id": task_id}, headers=auth(keys[1]["dave"]),
                         timeout=30).status_code == 404
    slow = _submit(a, boss, {"prompt": "cancel me across", "width": 512, "height": 512, "steps": 100})
    time.sleep(1)
    r = httpx.put(f"{b.url}/jobs/cancel", params={"task_id": slow}, headers=auth(boss), timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert _wait_done(b, boss, slow)["status"] == "canceled"


def test_the_concurrent_jobs_cap_holds_across_replicas(servers, keys):
    """The cap lives in Redis: a key's second request is refused by the other replica while the first runs."""
    a, b = servers
    solo = keys[1]["solo"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(httpx.post, f"{a.url}/generate", json={"prompt": "long", "width": 512, "height": 512,
                                                                  "steps": 60}, headers=auth(solo), timeout=120)
        time.sleep(1.5)
        second = httpx.post(f"{b.url}/generate", json={"prompt": "second", **CHEAP}, headers=auth(solo), timeout=60)
        assert second.status_code == 429 and "1 requests in progress" in second.text and second.headers["retry-after"]
        assert long.result().status_code == 200
    assert httpx.post(f"{b.url}/generate", json={"prompt": "after", **CHEAP}, headers=auth(solo),
                      timeout=60).status_code == 200  # the slot came free when the first ended


def test_redis_going_away_does_not_stop_the_service(servers, keys, redis_url):
    """Last in this module: it kills the module's Redis."""
    a = servers[0]
    failures = _metric(a, "sdxl_ratelimit_redis_failures_total")
    redis_url[1].kill()
    redis_url[1].wait()
    r = httpx.post(f"{a.url}/generate", json={"prompt": "no redis", "seed": 7, **CHEAP}, headers=auth(keys[1]["boss"]),
                   timeout=60)
    assert r.status_code == 200
    assert _metric(a, "sdxl_ratelimit_redis_degraded") == 1
    assert _metric(a, "sdxl_ratelimit_redis_failures_total") > failures  # counted, not only flagged
