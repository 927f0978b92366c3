"""Every API of the real served process, with the BentoML client and plain HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import time
import uuid

import bentoml
import httpx
import pytest
from PIL import Image

from sdxl_bento.cli.client import Client
from sdxl_bento.core.images import read_parameters

pytestmark = pytest.mark.e2e
SMALL = {"width": 256, "height": 256, "steps": 4}


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url, timeout=120) as c:
        yield c


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_health_metrics_and_openapi(http):
    for path in ("/healthz", "/livez", "/readyz", "/metrics", "/docs.json"):
        assert http.get(path).status_code == 200, path
    metrics_text = http.get("/metrics").text
    assert 'sdxl_acceleration{compile="off",cuda_graphs="off",vae_decode="pipeline"} 1.0' in metrics_text
    import importlib.metadata

    versions = {lib: importlib.metadata.version(lib) for lib in ("torch", "diffusers", "transformers", "bentoml")}
    build_info = next(line for line in metrics_text.splitlines() if line.startswith("sdxl_build_info{"))
    assert build_info.endswith(" 1.0") and 'cuda="cpu"' in build_info and 'version="0.1.0"' in build_info
    for lib, version in versions.items():
        assert f'{lib}="{version}"' in build_info
    paths = http.get("/docs.json").json()["paths"]
    for route in ("/txt2img", "/generate", "/generate_batch", "/refine", "/jobs/submit", "/jobs/status"):
        assert route in paths


def test_txt2img_returns_the_image_with_seed_and_parameters(http):
    r = http.post("/txt2img", json={"prompt": "a lighthouse at dusk", "seed": 1234, "width": 320, **{
        k: v for k, v in SMALL.items() if k != "width"}})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["seed"] == "1234"
    assert r.headers["finish-reason"] == "success"
    assert decode(r.content).size == (320, 256)
    params = read_parameters(r.content)
    assert params.startswith("a lighthouse at dusk\n") and "Seed: 1234" in params and "Size: 320x256" in params
    again = http.post("/txt2img", json={"prompt": "a lighthouse at dusk", "seed": 1234, "width": 320,
                                        "height": 256, "steps": 4})
    assert again.content == r.content  # same seed, same bytes


def test_approximate_mode_is_opt_in_labelled_and_cached_apart(http):
    """deepcache changes the image: it is recorded in the image's parameters, and never served from (or into)
    the exact request's cache entry."""
    body = {"prompt": "a lighthouse at dusk", "seed": 77, **SMALL, "steps": 6}
    exact = http.post("/txt2img", json=body)
    fast = http.post("/txt2img", json={**body, "approximation": "deepcache"})
    assert exact.status_code == fast.status_code == 200, fast.text
    assert fast.content != exact.content
    assert "Approximation: deepcache" in read_parameters(fast.content)
    assert "Approximation" not in read_parameters(exact.content)
    assert http.post("/txt2img", json={**body, "approximation": "deepcache"}).content == fast.content
    bad = http.post("/txt2img", json={**body, "approximation": "fast"})
    assert bad.status_code == 400 and "approximation" in bad.text


@pytest.mark.parametrize("fmt, media_type", [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_other_formats(http, fmt, media_type):
    r = http.post("/txt2img", json={"prompt": "a boat", "seed": 5, "output_format": fmt, "quality": 80, **SMALL})
    assert r.status_code == 200 and r.headers["content-type"] == media_type
    assert decode(r.content).format == fmt.upper() and "Seed: 5" in read_parameters(r.content)


def test_random_seed_is_returned(http):
    r = http.post("/generate", json={"prompt": "a tree", "num_images": 2, **SMALL})
    body = r.json()
    seeds = [img["seed"] for img in body["images"]]
    assert len(seeds) == 2 and seeds[1] == (seeds[0] + 1) % 2**32
    assert body["parameters"]["seeds"] == seeds


def test_generate_json_and_download_by_id(http, client):
    body = client.generate(prompt="a red bicycle", seed=77, num_images=2, return_base64=True, **SMALL)
    assert body["synthetic"] is True and body["model"].startswith("sdxl-base:")
    assert [img["seed"] for img in body["images"]] == [77, 78]
    assert body["timings"]["total_s"] >= body["timings"]["generate_s"] > 0
    for img in body["images"]:
        uuid.UUID(img["id"])
        assert img["url"] == f"/images/{img['id']}"
        downloaded = http.get(img["url"])
        assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "image/png"
        import base64
        assert base64.b64decode(img["base64"]) == downloaded.content
        assert decode(downloaded.content).size == (256, 256)


def test_image_ids_cannot_escape_the_store(http):
    assert http.get("/images/not-a-uuid").status_code == 400
    assert http.get(f"/images/{uuid.uuid4()}").status_code == 404
    for path in ("/images/..%2F..%2Fetc%2Fpasswd", "/images/../../etc/passwd", "/images/%2e%2e/service.py"):
        r = http.get(path)
        assert r.status_code in (400, 404) and b"root:" not in r.content


@pytest.mark.parametrize("refine", ["ensemble", "img2img"])
def test_refine_modes(http, refine):
    r = http.post("/generate", json={"prompt": "a castle", "seed": 3, "refine": refine, **SMALL})
    assert r.status_code == 200, r.text
    assert r.json()["refiner"].startswith("sdxl-refiner:")


def test_refine_a_stored_image(http, client):
    first = client.generate(prompt="a house", seed=9, **SMALL)
    image_id = first["images"][0]["id"]
    refined = client.refine(prompt="a house, detailed", image_id=image_id, strength=0.5, steps=4, seed=9)
    new = refined["images"][0]
    assert new["id"] != image_id and (new["width"], new["height"]) == (256, 256)
    assert "Source image: " + image_id in read_parameters(http.get(new["url"]).content)
    r = http.post("/refine", json={"prompt": "x", "image_id": str(uuid.uuid4())})
    assert r.status_code == 404 and "no image with id" in r.json()["error"]["message"]


def test_batchable_api_runs_compatible_requests_together(http, client):
    items = client.generate_batch(requests=[{"prompt": "a cat", "seed": 1, **SMALL},
                                            {"prompt": "a dog", "seed": 2, **SMALL}])
    assert [item["ok"] for item in items] == [True, True]
    assert [item["result"]["images"][0]["seed"] for item in items] == [1, 2]
    # concurrent HTTP callers are merged by BentoML's adaptive batcher and answered one by one
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(http.post, "/generate_batch", json={"requests": [{"prompt": f"p{i}", "seed": i, **SMALL}]})
                   for i in range(4)]
        answers = [f.result() for f in futures]
    assert all(a.status_code == 200 for a in answers)
    assert [a.json()[0]["result"]["images"][0]["seed"] for a in answers] == [0, 1, 2, 3]


def test_bad_input_gets_4xx_with_a_message(http):
    cases = [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 501}, "the limit is 500"),
        ({"prompt": "x", "width": 250}, "multiple of 8"),
        ({"prompt": "x", "width": 2048, "height": 2048}, "pixels"),
        ({"prompt": "x", "steps": 1000}, "less than or equal to 100"),
        ({"prompt": "x", "seed": -5}, "greater than or equal to 0"),
        ({"prompt": "x", "scheduler": "nope"}, "euler"),
        ({"prompt": "x", "unknown_field": 1}, "Extra inputs are not permitted"),
        ({"prompt": "x", "num_images": 2, **SMALL}, "use /generate"),
    ]
    for body, message in cases:
        r = http.post("/txt2img", json=body)
        assert 400 <= r.status_code < 500, (body, r.status_code)
        assert message in r.text, (body, r.text)
    for raw in (b'{"prompt": "x",', b"not json", b"[1, 2]"):
        r = http.post("/generate", content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and "error" in r.text


def test_tasks_with_the_bentoml_client(client):
    task = client.jobs.submit(prompt="a mountain", seed=21, **SMALL)
    deadline = time.monotonic() + 60
    while task.get_status().value == "in_progress" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert task.get_status().value == "completed"
    result = task.get()
    assert result["images"][0]["seed"] == 21


def test_tasks_report_progress_and_can_be_cancelled(server, http):
    submit = http.post("/jobs/submit", json={"prompt": "a slow one", "width": 512, "height": 512, "steps": 100})
    assert submit.status_code == 200
    task_id = submit.json()["task_id"]
    status = {}
    for _ in range(100):
        status = http.get("/jobs/status", params={"task_id": task_id}).json()
        if status.get("state") == "running" and status.get("step", 0) >= 1:
            break
        time.sleep(0.1)
    assert status["status"] == "in_progress" and status["state"] == "running"
    assert status["total_steps"] == 100 and 1 <= status["step"] < 100
    r = http.put("/jobs/cancel", params={"task_id": task_id})
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    time.sleep(1)
    assert http.get("/jobs/status", params={"task_id": task_id}).json()["status"] == "canceled"
    assert http.get("/jobs/get", params={"task_id": task_id}).status_code == 409
    assert http.put("/jobs/cancel", params={"task_id": task_id}).status_code == 409
    assert http.put("/jobs/cancel", params={"task_id": "nope"}).status_code == 404
    # the GPU is free again: the next request starts at once
    r = http.post("/generate", json={"prompt": "after cancel", **SMALL})
    assert r.status_code == 200 and r.json()["timings"]["queue_s"] < 1


def test_tasks_with_the_async_client(server):
    async def run():
        async with bentoml.AsyncHTTPClient(server.url, timeout=120) as ac:
            task = await ac.jobs.submit(prompt="async", seed=4, **SMALL)
            for _ in range(300):
                if (await task.get_status()).value != "in_progress":
                    break
                await asyncio.sleep(0.2)
            return await task.get()

    assert asyncio.run(run())["images"][0]["seed"] == 4


def test_bad_task_input_is_refused_before_a_task_exists(http):
    r = http.post("/jobs/submit", json={"prompt": "x", "steps": 0})
    assert r.status_code == 400 and "task_id" not in r.json()
    assert r.json()["error"]["message"].startswith("steps: ") and "greater than or equal to 1" in r.text


def test_burst_beyond_max_concurrency_gets_200_or_503_only(server):
    """16 clients at once against max_concurrency=4: each is served or refused with Retry-After."""
    def call(i):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            return c.post("/generate", json={"prompt": f"burst {i}", "width": 256, "height": 256, "steps": 8})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, range(16)))
    codes = sorted(a.status_code for a in answers)
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 4 and codes.count(503) >= 1, codes
    for a in answers:
        if a.status_code == 503:
            assert int(a.headers["retry-after"]) >= 1
            assert a.json()["error"]["type"] == "overloaded"
        else:
            assert len(a.json()["images"]) == 1
