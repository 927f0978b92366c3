"""The job lifecycle against the real served process (issue 17): signed webhooks to loopback receivers that verify
with the ``standardwebhooks`` package, retries, a delivery pending across a restart; the task event stream read
with ``httpx-sse`` (a reconnect with Last-Event-ID mid-run, a cancel); Idempotency-Key retries racing the first
request (one GPU run, on /metrics); 202 and 406; a replay with identical pixels.

One server with a keys file (two keys), loopback webhooks allowed explicitly, quick retries, a preview every step.
The restart test stops and starts it again on the same state folder, so it runs last.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml
from httpx_sse import connect_sse
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from .conftest import Server, private_home, service_env

pytestmark = pytest.mark.e2e
SMALL = {"width": 256, "height": 256, "steps": 3}


class Receiver:
    """A webhook receiver on the loopback that verifies every delivery with the key's secret (400 when the
    signature does not match), answering from a script of statuses (the last one repeats)."""

    def __init__(self, secret: str, statuses=(204,), port: int = 0):
        self.secret, self.statuses = secret, list(statuses)
        self.verified: list[dict] = []
        self.refused: list[str] = []
        self.arrived = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                try:
                    event = Webhook(receiver.secret).verify(body, dict(self.headers))
                except WebhookVerificationError as exc:
                    receiver.refused.append(str(exc))
                    self.send_response(400)
                else:
                    status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                    if 200 <= status < 300:
                        receiver.verified.append({"event": event, "headers": {k.lower(): v for k, v in
                                                                              self.headers.items()}, "body": body})
                        receiver.arrived.set()
                    self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}/hooks/sdxl"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int = 1, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.verified) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.verified) >= count, f"{len(self.verified)} deliveries, refused: {self.refused}"
        return self.verified

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def world(bentoml_home, tmp_path_factory):
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("lifecycle")
    keys_file = root / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": []}))
    keys, secrets = {}, {}
    for name, tier in (("alice", "premium"), ("bob", "standard")):
        out = subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "keys", "add", name, "--tier", tier,
                              "--file", str(keys_file)], capture_output=True, text=True, check=True).stdout
        keys[name] = out.strip().splitlines()[-1]
        secrets[name] = re.search(r"(whsec_\S+)", out).group(1)
    env = service_env(private_home(bentoml_home, root), root / "images", keys_file=keys_file, concurrency=2,
                      max_concurrency=16, timeout=120, webhook_allow="loopback", webhook_retry_base_s=0.3,
                      preview_every=1, events_heartbeat_s=0.5)
    state = {"srv": Server(env, root / "server.log")}
    state["srv"].wait_ready()

    def restart():
        state["srv"].stop()
        state["srv"] = _server_on(env, root / "server-2.log", state["port"])  # the same state folder and port
        state["srv"].wait_ready()
        return state["srv"]

    state.update(port=state["srv"].port, url=state["srv"].url, keys=keys, secrets=secrets, restart=restart,
                 root=root)
    try:
        yield state
    finally:
        state["srv"].stop()
        log = (root / "server.log").read_text(errors="replace") + (
            (root / "server-2.log").read_text(errors="replace") if (root / "server-2.log").exists() else "")
        for secret in (*keys.values(), *secrets.values()):
            assert secret not in log, "a key or a webhook secret reached the log"


def _server_on(env, log, port):
    import subprocess
    import sys

    from .conftest import REPO

    srv = Server.__new__(Server)
    srv.port, srv.url, srv.log = port, f"http://127.0.0.1:{port}", log
    srv._log_file = open(log, "wb")
    srv.proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service:SDXL", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=srv._log_file, stderr=subprocess.STDOUT, start_new_session=True)
    return srv


def client(world, name="alice") -> httpx.Client:
    return httpx.Client(base_url=world["url"], timeout=120, headers={"Authorization": f"Bearer {world['keys'][name]}"})


def wait_task(http: httpx.Client, task_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = http.get("/jobs/status", params={"task_id": task_id}).json()
        if status["status"] != "in_progress":
            return status
        time.sleep(0.1)
    raise TimeoutError(task_id)


def heartbeat(event) -> bool:
    """A heartbeat (a comment line): httpx-sse hands it over as an empty ``message`` (browsers dispatch nothing)."""
    return event.event == "message" and event.data == ""


def events(http: httpx.Client, task_id: str, last: str | None = None, stop=None) -> list:
    """The task's events from its stream (after ``last``), until the terminal one or until ``stop(event)``
    (which also sees the heartbeats)."""
    got = []
    headers = {"Last-Event-ID": last} if last else {}
    with connect_sse(http, "GET", "/jobs/events", params={"task_id": task_id}, headers=headers) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for event in source.iter_sse():
            if not heartbeat(event):
                got.append(event)
            if stop is not None and stop(event):
                break
    return got


def metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {")


# -- webhooks ---------------------------------------------------------------------------------------------------
def test_a_signed_webhook_verifies_and_a_tampered_body_is_refused(world):
    receiver = Receiver(world["secrets"]["alice"])
    try:
        with client(world) as alice, client(world, "bob") as bob:
            answer = alice.post("/jobs/submit", json={"prompt": "a signed lighthouse", "seed": 3, **SMALL,
                                                      "webhook": receiver.url})
            assert answer.status_code == 200, answer.text
            task_id = answer.json()["task_id"]
            assert wait_task(alice, task_id)["status"] == "completed"
            (delivery,) = receiver.wait(1)
            event = delivery["event"]
            assert event["type"] == "job.completed" and event["data"]["task_id"] == task_id
            assert event["data"]["status"] == "completed"
            assert event["data"]["result"] == alice.get("/jobs/get", params={"task_id": task_id}).json()
            headers = delivery["headers"]
            assert headers["webhook-id"].startswith("msg_") and headers["webhook-signature"].startswith("v1,")

            # the same delivery, one byte changed: the receiver refuses it
            tampered = delivery["body"].replace(b'"completed"', b'"failed"', 1)
            with pytest.raises(WebhookVerificationError):
                Webhook(world["secrets"]["alice"]).verify(tampered, headers)
            sent = httpx.post(receiver.url, content=tampered, headers={k: headers[k] for k in (
                "webhook-id", "webhook-timestamp", "webhook-signature", "content-type")})
            assert sent.status_code == 400 and receiver.refused
            with pytest.raises(WebhookVerificationError):  # and another key's secret does not verify it
                Webhook(world["secrets"]["bob"]).verify(delivery["body"], headers)

            record = alice.get("/jobs/webhooks", params={"task_id": task_id}).json()["deliveries"]
            assert [(d["event"], d["state"], d["webhook_id"]) for d in record] == [
                ("job.completed", "delivered", headers["webhook-id"])]
            assert record[0]["tries"][0]["status_code"] == 204
            for path in ("/jobs/webhooks", "/jobs/events"):  # another key: as for an unknown id
                assert bob.get(path, params={"task_id": task_id}).status_code == 404

            # targets on the service's own network are refused before a task exists
            for url in ("http://10.0.0.7/hook", "http://169.254.169.254/latest", "http://[fd00::1]/x"):
                refused = alice.post("/jobs/submit", json={"prompt": "x", **SMALL, "webhook": url})
                assert refused.status_code == 400 and "webhook" in refused.json()["error"]["message"], refused.text
    finally:
        receiver.close()


def test_a_receiver_that_fails_twice_then_succeeds(world):
    receiver = Receiver(world["secrets"]["alice"], statuses=(500, 502, 204))
    try:
        with client(world) as alice:
            # a synchronous route takes a webhook too: the job id is in X-Job-Id
            answer = alice.post("/generate", json={"prompt": "retried", "seed": 4, **SMALL, "webhook": receiver.url,
                                                   "webhook_events": ["job.completed", "job.failed"]})
            assert answer.status_code == 200, answer.text
            job_id = answer.headers["x-job-id"]
            (delivery,) = receiver.wait(1)
            assert delivery["event"]["type"] == "job.completed" and delivery["event"]["data"]["task_id"] == job_id
            assert delivery["event"]["data"]["result"]["images"] == answer.json()["images"]
            (record,) = alice.get("/jobs/webhooks", params={"task_id": job_id}).json()["deliveries"]
            assert record["state"] == "delivered" and record["attempts"] == 3
            assert [t["status_code"] for t in record["tries"]] == [500, 502, 204]
            assert [t["outcome"] for t in record["tries"]] == ["retry", "retry", "delivered"]
            assert metric(alice, "sdxl_webhook_attempts_total") >= 3
    finally:
        receiver.close()


# -- live progress ---------------------------------------------------------------------------------------------
def test_events_resume_with_last_event_id_mid_run(world):
    with client(world) as alice:
        task_id = alice.post("/jobs/submit", json={"prompt": "a long walk", "seed": 5, "width": 256, "height": 256,
                                                   "steps": 40}).json()["task_id"]
        first = events(alice, task_id, stop=lambda e: e.event == "running" and json.loads(e.data)["step"] >= 2)
        assert first[-1].event == "running" and first[0].event in ("queued", "running")
        rest = events(alice, task_id, last=first[-1].id)  # as a browser's EventSource reconnects
        ids = [int(e.id) for e in first + rest]
        assert ids == list(range(1, len(ids) + 1)), [(e.id, e.event) for e in first + rest]  # every event once
        assert rest[-1].event == "completed"
        done = json.loads(rest[-1].data)
        assert done["result"] == alice.get("/jobs/get", params={"task_id": task_id}).json()
        previews = [json.loads(e.data) for e in first + rest if e.event == "preview"]
        assert previews and previews[0]["media_type"] == "image/jpeg" and len(previews[0]["images"]) == 1
        import base64
        import io

        from PIL import Image

        assert Image.open(io.BytesIO(base64.b64decode(previews[0]["images"][0]))).format == "JPEG"
        steps = [json.loads(e.data)["step"] for e in first + rest if e.event == "running"]
        assert steps == sorted(steps) and steps[-1] == 40
        again = events(alice, task_id, last=rest[-1].id)  # after the end: nothing more, the stream closes
        assert again == []
        assert events(alice, task_id, last=first[-1].id)[-1].event == "completed"  # any replica could resume it
        bad = alice.get("/jobs/events", params={"task_id": task_id}, headers={"Last-Event-ID": "x"})
        assert bad.status_code == 400


def test_a_cancel_ends_the_stream_with_cancelled(world):
    with client(world) as alice:
        task_id = alice.post("/jobs/submit", json={"prompt": "a slow one", "width": 512, "height": 512,
                                                   "steps": 100}).json()["task_id"]
        seen = {"running": False, "heartbeats": 0, "cancelled": False}

        def cancel_once_running(event):
            """Cancel once the task runs and a heartbeat has come (they keep proxies from closing the stream)."""
            seen["heartbeats"] += heartbeat(event)
            seen["running"] = seen["running"] or (event.event == "running" and json.loads(event.data)["step"] >= 1)
            if seen["running"] and seen["heartbeats"] and not seen["cancelled"]:
                seen["cancelled"] = True
                assert alice.put("/jobs/cancel", params={"task_id": task_id}).status_code == 200
            return False

        got = events(alice, task_id, stop=cancel_once_running)
        assert seen["cancelled"] and seen["heartbeats"] >= 1
        assert got[-1].event == "cancelled" and json.loads(got[-1].data)["status"] == "canceled"
        assert wait_task(alice, task_id)["status"] == "canceled"


# -- idempotency -------------------------------------------------------------------------------------------------
def test_idempotent_retries_racing_the_first_request_run_once(world):
    with client(world) as alice, client(world, "bob") as bob:
        before = metric(alice, "sdxl_images_generated_total")
        replays = metric(alice, "sdxl_idempotent_replays_total")
        body = {"prompt": "only once", "width": 256, "height": 256, "steps": 30}  # no seed: not cacheable
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: alice.post("/generate", json=body, headers={
                "Idempotency-Key": '"race-1"'}), range(4)))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert len({a.json()["images"][0]["id"] for a in answers}) == 1
        assert sorted(a.headers.get("idempotent-replayed", "") for a in answers) == ["", "true", "true", "true"]
        assert metric(alice, "sdxl_images_generated_total") - before == 1  # one GPU run
        assert metric(alice, "sdxl_idempotent_replays_total") - replays == 3

        mismatch = alice.post("/generate", json={**body, "steps": 2}, headers={"Idempotency-Key": '"race-1"'})
        assert mismatch.status_code == 422 and mismatch.json()["error"]["type"] == "idempotency_key_reused"
        own = bob.post("/generate", json={**body, "steps": 2}, headers={"Idempotency-Key": '"race-1"'})
        assert own.status_code == 200 and "idempotent-replayed" not in own.headers  # keys are the caller's

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            submits = list(pool.map(lambda _: alice.post("/jobs/submit", json={**body, "steps": 3}, headers={
                "Idempotency-Key": "task-1"}), range(3)))
        assert len({s.json()["task_id"] for s in submits}) == 1  # the same task
        assert wait_task(alice, submits[0].json()["task_id"])["status"] == "completed"
        twice = alice.post("/jobs/submit", json={**body, "steps": 3}, headers={"Idempotency-Key": "task-1"})
        assert twice.json()["task_id"] == submits[0].json()["task_id"]
        repeated = alice.post("/generate", json=body, headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")])
        assert repeated.status_code == 400


# -- content negotiation ---------------------------------------------------------------------------------------
def test_respond_async_is_202_with_location_and_accept_is_negotiated(world):
    with client(world) as alice:
        answer = alice.post("/generate", json={"prompt": "later", "seed": 8, **SMALL}, headers={
            "Prefer": "respond-async"})
        assert answer.status_code == 202 and answer.headers["preference-applied"] == "respond-async"
        location = answer.headers["location"]
        assert location.startswith("/jobs/status?task_id=") and answer.json()["task_id"] in location
        assert wait_task(alice, answer.json()["task_id"])["status"] == "completed"
        result = alice.get(answer.json()["result_url"]).json()
        image_id = result["images"][0]["id"]

        refined = alice.post("/refine", json={"image_id": image_id, "prompt": "sharper", "steps": 4},
                             headers={"Prefer": "respond-async, wait=5"})
        assert refined.status_code == 202 and refined.headers["location"].startswith("/refine_jobs/status?task_id=")
        for _ in range(600):
            status = alice.get(refined.headers["location"]).json()
            if status["status"] != "in_progress":
                break
            time.sleep(0.1)
        assert status["status"] == "completed"

        image = alice.post("/generate", json={"prompt": "bytes", "seed": 9, **SMALL}, headers={"Accept": "image/jpeg"})
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert image.content[:2] == b"\xff\xd8" and image.headers["seed"] == "9"
        as_json = alice.post("/txt2img", json={"prompt": "json", "seed": 9, **SMALL},
                             headers={"Accept": "application/json"})
        assert as_json.status_code == 200 and as_json.json()["images"][0]["seed"] == 9

        for path, accept, body in (("/generate", "text/html", {"prompt": "x", **SMALL}),
                                   ("/generate", "image/png", {"prompt": "x", "num_images": 2, **SMALL}),
                                   ("/txt2img", "image/webp", {"prompt": "x", "output_format": "png", **SMALL}),
                                   ("/img2img", "image/png", {"prompt": "x", "image_id": image_id, "steps": 4})):
            refused = alice.post(path, json=body, headers={"Accept": accept})
            assert refused.status_code == 406 and refused.json()["error"]["type"] == "not_acceptable", refused.text
        both = alice.post("/generate", json={"prompt": "x", **SMALL}, headers=[("Accept", "image/png"),
                                                                              ("Accept", "application/json")])
        assert both.status_code == 400


# -- reproducibility -------------------------------------------------------------------------------------------------
def test_the_manifest_is_the_owners_and_a_replay_is_identical(world):
    with client(world) as alice, client(world, "bob") as bob:
        made = alice.post("/txt2img", json={"prompt": "the same twice", "seed": 10, **SMALL, "scheduler": "euler_a"})
        assert made.status_code == 200, made.text
        image_id = made.headers["x-image-id"]
        manifest = alice.get(f"/images/{image_id}/manifest")
        assert manifest.status_code == 200
        found = manifest.json()
        assert found["image"]["id"] == image_id and found["seed"] == 10 and found["kind"] == "txt2img"
        assert found["scheduler"]["class"] == "EulerAncestralDiscreteScheduler"
        assert len(found["models"]["base"]["sha256"]) == 64 and found["device"]["name"] == "cpu"
        assert found["versions"]["torch"] and found["acceleration"]["cuda_graphs"] == "off"
        assert bob.get(f"/images/{image_id}/manifest").status_code == 404
        signed = made.headers["x-image-url"]  # a signed link opens the image, not its manifest
        assert httpx.get(world["url"] + signed).status_code == 200
        assert httpx.get(world["url"] + signed.replace(image_id, f"{image_id}/manifest")).status_code == 404

        replay = alice.post("/replay", json={"image_id": image_id})
        assert replay.status_code == 200, replay.text
        report = replay.json()
        assert report["identical"] is True and report["max_abs_diff"] == 0 and report["differences"] == []
        assert report["image"]["id"] != image_id and report["image"]["seed"] == 10
        again = alice.post("/replay", json={"manifest": found})
        assert again.status_code == 200 and again.json()["identical"] is True
        assert bob.post("/replay", json={"image_id": image_id}).status_code == 404
        changed = {**found, "request": {**found["request"], "steps": 2}, "image": {**found["image"], "id": None}}
        differs = alice.post("/replay", json={"manifest": changed}).json()  # no image to compare: its pixel hash
        assert differs["identical"] is False and differs["compared"] == "pixel sha256"
        assert [d["field"] for d in differs["differences"]] == ["batch_key.steps", "batch_key.total_steps"]


# -- a key's default webhook: every generation route, the OpenAI and AUTOMATIC1111 ones too ------------------------
def test_a_keys_default_webhook_is_told_of_every_generation_route(world):
    import subprocess
    import sys

    keys_file = world["root"] / "keys.yaml"
    out = subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "keys", "add", "carol", "--tier", "premium",
                          "--file", str(keys_file)], capture_output=True, text=True, check=True).stdout
    key, secret = out.strip().splitlines()[-1], re.search(r"(whsec_\S+)", out).group(1)
    receiver = Receiver(secret)
    try:
        data = yaml.safe_load(keys_file.read_text())
        next(entry for entry in data["keys"] if entry["name"] == "carol")["webhook"] = receiver.url
        keys_file.write_text(yaml.safe_dump(data))  # the service reloads the keys file: no restart
        with httpx.Client(base_url=world["url"], timeout=120, headers={"Authorization": f"Bearer {key}"}) as carol:
            for _ in range(100):  # until the reloaded file (with the webhook) answers
                native = carol.post("/generate", json={"prompt": "by default", "seed": 21, **SMALL})
                if native.status_code == 200 and "x-job-id" in native.headers:
                    break
                time.sleep(0.1)
            assert "x-job-id" in native.headers, native.status_code
            a1111 = carol.post("/sdapi/v1/txt2img", json={"prompt": "a1111", "seed": 22, "steps": 3, "width": 256,
                                                          "height": 256})
            openai = carol.post("/v1/images/generations", json={"prompt": "openai", "size": "256x256", "steps": 3,
                                                                "response_format": "url"})
            for answer in (a1111, openai):
                assert answer.status_code == 200 and "x-job-id" in answer.headers, answer.text
            jobs = [answer.headers["x-job-id"] for answer in (native, a1111, openai)]
            told = {d["event"]["data"]["task_id"]: d["event"] for d in receiver.wait(len(jobs))}
            assert set(jobs) <= set(told) and all(told[j]["type"] == "job.completed" for j in jobs)
            assert told[jobs[1]]["data"]["result"]["parameters"]["prompt"] == "a1111"  # the answer in A1111's shape
            assert told[jobs[2]]["data"]["result"]["data"][0]["url"] == openai.json()["data"][0]["url"]
            (record,) = carol.get("/jobs/webhooks", params={"task_id": jobs[1]}).json()["deliveries"]
            assert record["state"] == "delivered"
    finally:
        receiver.close()


# -- last: a restart with a delivery pending ----------------------------------------------------------------------
def test_a_pending_delivery_survives_a_restart(world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there yet: connection refused
    url = f"http://127.0.0.1:{port}/hooks/sdxl"
    with client(world) as alice:
        task_id = alice.post("/jobs/submit", json={"prompt": "tell me later", "seed": 11, **SMALL,
                                                   "webhook": url}).json()["task_id"]
        assert wait_task(alice, task_id)["status"] == "completed"
        for _ in range(100):
            (record,) = alice.get("/jobs/webhooks", params={"task_id": task_id}).json()["deliveries"]
            if record["attempts"] >= 1:
                break
            time.sleep(0.1)
        assert record["state"] == "pending" and "Connect" in record["last_error"]
    world["restart"]()
    receiver = Receiver(world["secrets"]["alice"], port=port)
    try:
        (delivery,) = receiver.wait(1, timeout=90)
        assert delivery["event"]["data"]["task_id"] == task_id and delivery["headers"]["webhook-id"] == \
            record["webhook_id"]
        with client(world) as alice:
            (after,) = alice.get("/jobs/webhooks", params={"task_id": task_id}).json()["deliveries"]
            assert after["state"] == "delivered" and after["attempts"] >= 2
            assert after["tries"][-1]["status_code"] == 204
    finally:
        receiver.close()
