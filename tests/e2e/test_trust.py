"""The trust boundary, tried as an attacker with a valid free key would, against the real served process.

One `bentoml serve` with a real Redis and a keys file of four keys: two `free` ones (alice, bob), a
`premium` one and an operator. Every hostile request of the table gets the answer it must get; a
property-based test sends random variants of valid bodies to every generation route and checks, from the
audit line, that what ran never exceeded the caller's tier.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import private_home, redis_process, service_env, serving

pytestmark = pytest.mark.e2e
SMALL = {"width": 256, "height": 256, "steps": 2}
FREE = {"max_steps": 10, "max_pixels": 512 * 512, "max_images": 2, "burst_requests": 1000,
        "requests_per_minute": 60000, "burst_images": 1000, "images_per_minute": 60000, "max_concurrent_jobs": 8}
TIERS = {"free": FREE, "premium": {"burst_requests": 1000, "requests_per_minute": 60000},
         # a tier named like the keyless service's: it must still be a keyed tier with owners and limits
         "open": {**FREE, "priority": 0, "default_deadline_s": 60, "refiner_allowed": False,
                  "safety_optional": False}}


def add_key(path: Path, name: str, tier: str) -> str:
    out = subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "keys", "add", name, "--tier", tier,
                          "--file", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def world(bentoml_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    keys_file = root / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"tiers": TIERS, "keys": []}))
    keys = {name: add_key(keys_file, name, tier) for name, tier in
            [("alice", "free"), ("bob", "free"), ("boss", "premium"), ("ops", "standard"), ("opener", "open")]}
    data = yaml.safe_load(keys_file.read_text())
    for entry in data["keys"]:
        entry["operator"] = entry["name"] == "ops"
    keys_file.write_text(yaml.safe_dump(data))
    home = private_home(bentoml_home, root)
    with redis_process() as (redis_url, _):
        env = service_env(home, root / "images", keys_file=keys_file, redis_url=redis_url, concurrency=2,
                          max_concurrency=16, timeout=120, audit_log=root / "audit.jsonl", audit_prompts="hash",
                          max_body_bytes=4 * 2**20)
        with serving(env, root / "server.log") as srv:
            with httpx.Client(base_url=srv.url, timeout=120) as http:
                yield {"http": http, "keys": keys, "root": root, "home": home, "keys_file": keys_file, "srv": srv}


def key(world, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {world['keys'][name]}"}


def wait_task(http, task_id: str, headers: dict[str, str]) -> dict:
    for _ in range(600):
        status = http.get("/jobs/status", params={"task_id": task_id}, headers=headers).json()
        if status["status"] != "in_progress":
            return status
        time.sleep(0.1)
    raise TimeoutError(task_id)


def png(width: int, height: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def alice_task(world):
    http = world["http"]
    task_id = http.post("/jobs/submit", json={"prompt": "alice's secret prompt", "seed": 3, **SMALL},
                        headers=key(world, "alice")).json()["task_id"]
    assert wait_task(http, task_id, key(world, "alice"))["status"] == "completed"
    return task_id


@pytest.fixture(scope="module")
def alice_image(world):
    r = world["http"].post("/generate", json={"prompt": "alice's image", "seed": 5, **SMALL},
                           headers=key(world, "alice"))
    assert r.status_code == 200, r.text
    return r.json()["images"][0]


# -- tier limits on every route, numbers in every spelling ------------------------------------------
OVER_THE_FREE_TIER = [
    ("/generate", {"prompt": "x", "steps": "100", "width": "256", "height": "256"}, "max_steps"),
    ("/generate", {"prompt": "x", "steps": 100.0, **{k: v for k, v in SMALL.items() if k != "steps"}}, "max_steps"),
    ("/generate", {"prompt": "x", "steps": 11, "width": 256, "height": 256}, "max_steps"),
    ("/generate", {"prompt": "x", "steps": 2, "width": "768", "height": 512.0}, "max_pixels"),
    ("/generate", {"prompt": "x", "num_images": "3", **SMALL}, "max_images"),
    ("/generate", {"prompt": "x", "safety_check": False, **SMALL}, "safety_optional"),
    ("/generate", {"prompt": "x", "safety_check": "false", **SMALL}, "safety_optional"),
    ("/generate", {"prompt": "x", "refine": "ensemble", **SMALL}, "refiner_allowed"),
    ("/txt2img", {"prompt": "x", "steps": "100", "width": 256, "height": 256}, "max_steps"),
    ("/jobs/submit", {"prompt": "x", "steps": "100", "width": 256, "height": 256}, "max_steps"),
    ("/jobs", {"prompt": "x", "steps": "1e0", "width": 1024, "height": 1024}, None),  # "1e0" is no int: 400
    ("/generate_batch", {"requests": [{"prompt": "a", **SMALL}, {"prompt": "b", "steps": "50", "width": 256,
                                                                  "height": 256}]}, "max_steps"),
    ("/generate_batch", {"requests": [{"prompt": "a", "safety_check": False, **SMALL}]}, "safety_optional"),
    ("/v1/images/generations", {"prompt": "x", "n": "3", "size": "256x256", "steps": 2}, "max_images"),
    ("/v1/images/generations", {"prompt": "x", "size": "768x768", "steps": 2}, "max_pixels"),
    ("/v1/images/generations", {"prompt": "x", "size": "256x256", "steps": "100"}, "max_steps"),
    ("/v1/images/generations", {"prompt": "x", "size": "256x256", "quality": "hd"}, "max_steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": "2", "n_iter": 2.0, "steps": 2, "width": 256,
                           "height": 256}, "max_images"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": "50", "width": 256, "height": 256}, "max_steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "refiner_checkpoint": "any", "steps": 2, "width": 256, "height": 256},
     "refiner_allowed"),
    ("/img2img", {"prompt": "x", "image": "IMAGE", "width": 768, "height": 768, "steps": 4}, "max_pixels"),
    ("/img2img_jobs/submit", {"prompt": "x", "image": "IMAGE", "steps": "40"}, "max_steps"),
    ("/refine", {"prompt": "x", "image_id": str(uuid.uuid4())}, "refiner_allowed"),
    ("/refine_jobs/submit", {"prompt": "x", "image_id": str(uuid.uuid4())}, "refiner_allowed"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["IMAGE"], "steps": "50", "width": 256, "height": 256},
     "max_steps"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["IMAGE"], "steps": 4, "width": "768", "height": 768},
     "max_pixels"),
    # a replayed manifest runs its request: it is policed as if it had been sent
    ("/replay", {"manifest": {"manifest_version": 1, "kind": "txt2img",
                              "request": {"prompt": "x", "steps": "100", "width": 256, "height": 256}}}, "max_steps"),
    ("/replay", {"manifest": {"manifest_version": 1, "kind": "txt2img",
                              "request": {"prompt": "x", "num_images": 1, "safety_check": False, **SMALL}}},
     "safety_optional"),
]


@pytest.mark.parametrize("path,body,limit,prefer", [
    *((path, body, limit, None) for path, body, limit in OVER_THE_FREE_TIER),
    # Prefer: respond-async (on /generate, /img2img, /inpaint, /refine) makes it a task: policed the same
    *((path, body, limit, "respond-async") for path, body, limit in OVER_THE_FREE_TIER
      if path in ("/generate", "/img2img", "/refine"))])
def test_over_the_tier_is_refused_on_every_route_however_the_number_is_written(world, path, body, limit, prefer):
    body = json.loads(json.dumps(body).replace('"IMAGE"', json.dumps(png(256, 256))))
    headers = {**key(world, "alice"), **({"Prefer": prefer} if prefer else {})}
    r = world["http"].post(path, json=body, headers=headers)
    if limit is None:
        assert r.status_code == 400, r.text
        return
    assert r.status_code == 403, (path, body, r.status_code, r.text)
    words = {"max_steps": "steps", "max_pixels": "pixels", "max_images": "num_images",
             "safety_optional": "safety check", "refiner_allowed": "refiner"}
    assert "free tier" in r.text and words[limit] in r.text, r.text
    assert "task_id" not in r.text  # a task route refuses before BentoML hands out a task id


def ran(world, request_id: str) -> dict:
    """The parameters that ran, from the audit line of the request with this X-Request-Id."""
    for _ in range(50):
        lines = [json.loads(line) for line in (world["root"] / "audit.jsonl").read_text().splitlines()]
        line = next((entry for entry in lines if entry.get("request_id") == request_id), None)
        if line is not None:
            return line["parameters"]
        time.sleep(0.1)
    raise AssertionError(f"no audit line for {request_id}")


def within_the_free_tier(params: dict) -> bool:
    return (params["steps"] <= FREE["max_steps"] and params["num_images"] <= FREE["max_images"]
            and params["width"] * params["height"] <= FREE["max_pixels"] and params["safety_check"] is True
            and params.get("refine", "none") == "none")


@pytest.mark.parametrize("value", [True, 10**30, [5], {"n": 5}, "5.5", None, "", "3 "])
def test_type_confusion_on_numeric_fields_never_runs_more_than_the_tier(world, value):
    for path, body in [("/generate", {"prompt": "x", "width": 256, "height": 256, "steps": value}),
                       ("/generate", {"prompt": "x", "steps": 2, "width": value, "height": 256}),
                       ("/generate", {"prompt": "x", **SMALL, "num_images": value}),
                       ("/v1/images/generations", {"prompt": "x", "size": "256x256", "n": value, "steps": 2}),
                       ("/sdapi/v1/txt2img", {"prompt": "x", "width": 256, "height": 256, "steps": 2,
                                              "batch_size": value})]:
        request_id = uuid.uuid4().hex
        r = world["http"].post(path, json=body, headers={**key(world, "alice"), "X-Request-Id": request_id})
        assert r.status_code in (200, 400, 403), (path, body, r.text)  # never a 5xx
        if r.status_code == 200:
            assert within_the_free_tier(ran(world, request_id)), (path, body)


def test_image_to_image_without_a_size_takes_the_tiers_limit_not_the_services(world):
    r = world["http"].post("/img2img", json={"prompt": "x", "image": png(1024, 1024), "steps": 4, "strength": 0.5},
                           headers=key(world, "alice"))
    assert r.status_code == 200, r.text
    (image,) = r.json()["images"]
    assert image["width"] * image["height"] <= FREE["max_pixels"]
    big = world["http"].post("/img2img", json={"prompt": "x", "image": png(1024, 1024), "steps": 4,
                                                "strength": 0.5}, headers=key(world, "boss"))
    assert big.status_code == 200 and big.json()["images"][0]["width"] == 1024


def test_batch_items_run_as_their_caller(world):
    http = world["http"]
    forged = http.post("/generate_batch", json={"requests": [
        {"prompt": "x", **SMALL, "caller": {"name": "boss", "deadline_s": 600}}]}, headers=key(world, "alice"))
    assert forged.status_code == 400 and "caller" in forged.text
    ok = http.post("/generate_batch", json={"requests": [{"prompt": "a", "seed": 1, **SMALL},
                                                         {"prompt": "b", "seed": 2, **SMALL}]},
                   headers=key(world, "alice"))
    assert ok.status_code == 200 and all(item["ok"] for item in ok.json())
    image = ok.json()[0]["result"]["images"][0]
    # the items' images belong to alice: bob cannot read them, alice can
    assert http.get(f"/images/{image['id']}", headers=key(world, "bob")).status_code == 404
    assert http.get(f"/images/{image['id']}", headers=key(world, "alice")).status_code == 200


# -- repeated parameters and headers ----------------------------------------------------------------
def test_repeated_task_ids_and_headers_are_refused(world, alice_task):
    http, bob = world["http"], key(world, "bob")
    mine = http.post("/jobs/submit", json={"prompt": "bob", **SMALL}, headers=bob).json()["task_id"]
    wait_task(http, mine, bob)
    query = f"task_id={mine}&task_id={alice_task}"
    for method, path in [("GET", "/jobs/get"), ("GET", "/jobs/status"), ("PUT", "/jobs/cancel"),
                         ("POST", "/jobs/retry")]:
        r = http.request(method, f"{path}?{query}", headers=bob)
        assert r.status_code == 400 and "more than once" in r.text, (path, r.status_code, r.text)
        assert "alice" not in r.text
    body = json.dumps({"prompt": "x", **SMALL})
    repeated = [[("Content-Type", "application/json"), ("Content-Type", "text/plain"), *bob.items()],
                [("Content-Type", "application/json"), ("Authorization", bob["Authorization"]),
                 ("Authorization", key(world, "boss")["Authorization"])],
                [("Content-Type", "application/json"), ("X-API-Key", world["keys"]["bob"]),
                 ("X-API-Key", world["keys"]["boss"])],
                [("Content-Type", "application/json"), *bob.items(), ("X-Request-Deadline", "30"),
                 ("X-Request-Deadline", "3000")]]
    for headers in repeated:
        r = http.post("/generate", content=body, headers=httpx.Headers(headers))
        assert r.status_code == 400 and "more than once" in r.text, (headers[-1][0], r.text)
    assert http.post("/generate", content=b"{}", headers={**bob, "Content-Type": "text/plain"}).status_code == 415


# -- tasks and images stay with their owner ----------------------------------------------------------
def test_another_keys_task_is_unknown_on_every_task_route(world, alice_task):
    http, bob = world["http"], key(world, "bob")
    for method, path in [("GET", "/jobs/get"), ("GET", "/jobs/status"), ("PUT", "/jobs/cancel"),
                         ("POST", "/jobs/retry")]:
        r = http.request(method, path, params={"task_id": alice_task}, headers=bob)
        assert r.status_code == 404 and "secret" not in r.text, (path, r.text)
    mine = http.get("/jobs/get", params={"task_id": alice_task}, headers=key(world, "alice"))
    assert mine.status_code == 200 and mine.json()["images"]
    ops = http.get("/jobs/get", params={"task_id": alice_task}, headers=key(world, "ops"))
    assert ops.status_code == 200  # an operator key sees every task


def test_an_edit_form_is_policed_as_the_request_it_runs(world):
    """OpenAI's images.edit is multipart: the gateway polices the form's fields as numbers, however written."""
    from base64 import b64decode

    image = ("image.png", b64decode(png(256, 256)), "image/png")
    for fields, word in [({"prompt": "x", "n": "3", "size": "256x256", "steps": "2"}, "num_images"),
                         ({"prompt": "x", "n": "1", "size": "768x768", "steps": "2"}, "pixels"),
                         ({"prompt": "x", "n": "1", "size": "256x256", "steps": "100"}, "steps")]:
        r = world["http"].post("/v1/images/edits", data=fields, files={"image": image}, headers=key(world, "alice"))
        assert r.status_code == 403 and "free tier" in r.text and word in r.text, (fields, r.status_code, r.text)


def test_events_webhooks_manifests_and_replays_stay_with_their_owner(world, alice_task, alice_image):
    http, alice, bob = world["http"], key(world, "alice"), key(world, "bob")
    for action in ("events", "webhooks"):
        r = http.get(f"/jobs/{action}", params={"task_id": alice_task}, headers=bob)
        assert r.status_code == 404 and "secret" not in r.text, (action, r.text)
        r = http.get(f"/jobs/{action}?task_id={uuid.uuid4()}&task_id={alice_task}", headers=bob)
        assert r.status_code == 400 and "more than once" in r.text, (action, r.text)
    with http.stream("GET", "/jobs/events", params={"task_id": alice_task}, headers=alice) as own:
        assert own.status_code == 200 and "completed" in "".join(own.iter_text())
    image_id = alice_image["id"]
    assert http.get(f"/images/{image_id}/manifest", headers=bob).status_code == 404
    assert http.get(f"/images/{image_id}/manifest").status_code == 404  # no key
    signed_manifest = alice_image["url"].replace(f"/images/{image_id}", f"/images/{image_id}/manifest")
    assert httpx.get(world["srv"].url + signed_manifest).status_code == 404  # a signed link opens the image only
    manifest = http.get(f"/images/{image_id}/manifest", headers=alice)
    assert manifest.status_code == 200 and manifest.json()["request"]["seed"] == 5
    assert http.post("/replay", json={"image_id": image_id}, headers=bob).status_code == 404
    # alice's manifest, sent by bob, replays nothing of alice's: it is bob's request, under bob's tier and cache
    theirs = http.post("/replay", json={"manifest": manifest.json()}, headers=bob)
    assert theirs.status_code == 200, theirs.text
    assert http.get(f"/images/{theirs.json()['image']['id']}", headers=alice).status_code == 404


def test_idempotency_keys_are_scoped_to_the_caller(world):
    http = world["http"]
    body, idem = {"prompt": "the same retry", "seed": 91, **SMALL}, {"Idempotency-Key": f'"{uuid.uuid4()}"'}
    first = http.post("/generate", json=body, headers={**key(world, "alice"), **idem})
    again = http.post("/generate", json=body, headers={**key(world, "alice"), **idem})
    assert first.status_code == again.status_code == 200 and again.headers.get("idempotent-replayed") == "true"
    assert again.json()["images"][0]["id"] == first.json()["images"][0]["id"]
    other = http.post("/generate", json=body, headers={**key(world, "bob"), **idem})  # same key, another caller
    assert other.status_code == 200 and "idempotent-replayed" not in other.headers
    assert other.json()["images"][0]["id"] != first.json()["images"][0]["id"]
    changed = http.post("/generate", json={**body, "seed": 92}, headers={**key(world, "bob"), **idem})
    assert changed.status_code == 422  # bob's own key, reused for another request


def test_a_tier_named_open_is_still_a_keyed_tier(world):
    http, opener = world["http"], key(world, "opener")
    assert http.post("/generate", json={"prompt": "x", "steps": 11, "width": 256, "height": 256},
                     headers=opener).status_code == 403
    task_id = http.post("/jobs/submit", json={"prompt": "opener's", **SMALL}, headers=opener).json()["task_id"]
    wait_task(http, task_id, opener)
    assert http.get("/jobs/get", params={"task_id": task_id}, headers=key(world, "bob")).status_code == 404


def test_images_open_for_their_owner_or_a_signed_link_only(world, alice_image):
    http = world["http"]
    image_id, url = alice_image["id"], alice_image["url"]
    assert "sig=" in url and "exp=" in url
    assert http.get(f"/images/{image_id}").status_code == 404  # no key, no signature
    assert http.get(f"/images/{image_id}", headers=key(world, "bob")).status_code == 404
    own = http.get(f"/images/{image_id}", headers=key(world, "alice"))
    assert own.status_code == 200 and own.headers["cache-control"].startswith("private")
    signed = httpx.get(world["srv"].url + url)  # as a browser or OpenAI's url format would fetch it
    assert signed.status_code == 200 and signed.content == own.content
    assert httpx.get(world["srv"].url + url.replace("sig=", "sig=0")).status_code == 404
    assert http.get(f"/images/{image_id}", headers=key(world, "ops")).status_code == 200
    # reuse: another key cannot refine or start an image-to-image from alice's image
    for path, body in [("/img2img", {"prompt": "x", "image_id": image_id, "steps": 4}),
                       ("/refine", {"prompt": "x", "image_id": image_id, "steps": 2})]:
        r = http.post(path, json=body, headers=key(world, "boss"))
        assert r.status_code == 404, (path, r.text)
    assert http.post("/img2img", json={"prompt": "x", "image_id": image_id, "steps": 4},
                     headers=key(world, "alice")).status_code == 200


def test_the_cache_shares_nothing_between_keys(world):
    http = world["http"]
    body = {"prompt": "the same request", "seed": 77, **SMALL}
    first = http.post("/generate", json=body, headers=key(world, "alice")).json()
    again = http.post("/generate", json=body, headers=key(world, "alice")).json()
    other = http.post("/generate", json=body, headers=key(world, "bob")).json()
    assert again["cache"] == "hit" and other["cache"] == "miss"  # bob learns nothing of alice's prompts
    assert other["images"][0]["id"] != first["images"][0]["id"]


# -- secrets never at rest; audit by allow-list; bounded labels ------------------------------------------
def test_raw_keys_reach_no_file_and_the_audit_keeps_no_upload(world, alice_task):
    http = world["http"]
    upload = png(600, 600)
    r = http.post("/img2img", json={"prompt": "x", "image": upload, "steps": "99"}, headers=key(world, "alice"))
    assert r.status_code == 403
    http.post("/generate_batch", json={"requests": [{"prompt": "nested secret", **SMALL}]},
              headers=key(world, "alice"))
    http.get(f"/sdapi/v1/no-such-route-{uuid.uuid4().hex}", headers={"Authorization": "Bearer wrong"})
    time.sleep(0.5)
    roots = [world["home"], world["root"]]
    raw_keys = [k.encode() for k in world["keys"].values()]
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and path.stat().st_size < 256 * 2**20:
                data = path.read_bytes()
                assert not any(k in data for k in raw_keys), f"a raw key in {path}"
    audit = (world["root"] / "audit.jsonl").read_text()
    assert upload[:64] not in audit and "nested secret" not in audit and "alice's secret prompt" not in audit
    metrics = http.get("/metrics").text
    assert "no-such-route" not in metrics and 'endpoint="/sdapi/v1/{path}"' in metrics


def test_a_new_key_works_without_a_restart(world):
    new = add_key(world["keys_file"], f"late-{uuid.uuid4().hex[:6]}", "free")
    for _ in range(50):
        r = world["http"].post("/generate", json={"prompt": "x", **SMALL}, headers={"Authorization": f"Bearer {new}"})
        if r.status_code != 401:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text


# -- a property: whatever a free key sends, what runs stays within its tier --------------------------
def _number(low: int, high: int):
    return st.integers(low, high).flatmap(lambda n: st.sampled_from([n, str(n), float(n)]))


BODIES = {
    "/generate": st.fixed_dictionaries({"prompt": st.just("p"), "steps": _number(1, 14),
                                        "width": _number(32, 80).map(lambda n: n * 8 if not isinstance(n, str)
                                                                      else str(int(n) * 8)),
                                        "height": st.just(256), "num_images": _number(1, 3)}),
    "/v1/images/generations": st.fixed_dictionaries({"prompt": st.just("p"), "steps": _number(1, 14),
                                                      "n": _number(1, 3), "size": st.sampled_from(
                                                          ["256x256", "512x512", "768x512", "256x768"])}),
    "/sdapi/v1/txt2img": st.fixed_dictionaries({"prompt": st.just("p"), "steps": _number(1, 14),
                                                 "batch_size": _number(1, 2), "n_iter": _number(1, 2),
                                                 "width": st.sampled_from([256, 512, "768"]),
                                                 "height": st.just(256)}),
}


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_what_runs_never_exceeds_the_callers_tier(world, data):
    path = data.draw(st.sampled_from(sorted(BODIES)))
    body = data.draw(BODIES[path])
    request_id = uuid.uuid4().hex
    r = world["http"].post(path, json=body, headers={**key(world, "alice"), "X-Request-Id": request_id})
    assert r.status_code in (200, 400, 403), (path, body, r.text)
    if r.status_code == 200:
        assert within_the_free_tier(ran(world, request_id)), (path, body)
