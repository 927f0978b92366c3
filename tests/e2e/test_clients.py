"""Foreign clients against the real service: the official ``openai`` package on /v1/images/generations,
AUTOMATIC1111's /sdapi/v1 routes, and the ``sdxl-bento generate`` command as a subprocess.

The OpenAI client is ``pip install openai==3.54.0`` (skipped without it).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from PIL import Image

from sdxl_bento.core.images import read_parameters

from .conftest import REPO, Server, private_home, service_env

pytestmark = pytest.mark.e2e
SMALL = {"width": 256, "height": 256, "steps": 4}


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai", reason="the openai package is not installed (pip install openai==3.54.0)")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def wait_until(predicate, timeout=60.0, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")


# -- OpenAI ---------------------------------------------------------------------------------------
def test_openai_b64_json(openai_client):
    result = openai_client.images.generate(model="sdxl", prompt="a red lighthouse", n=2, size="256x256",
                                           response_format="b64_json", quality="low")
    assert result.created > 1_600_000_000 and len(result.data) == 2
    for item in result.data:
        assert item.url is None and item.revised_prompt == "a red lighthouse"
        image = png(base64.b64decode(item.b64_json))
        assert image.size == (256, 256)
    params = [read_parameters(base64.b64decode(item.b64_json)) for item in result.data]
    assert all("Steps: 20" in p for p in params)  # quality low -> 20 steps


def test_openai_url_is_downloadable_and_extensions_apply(openai_client):
    result = openai_client.images.generate(prompt="a blue boat", size="256x256", response_format="url",
                                           extra_body={"seed": 77, "steps": 4, "negative_prompt": "fog"})
    (item,) = result.data
    assert item.b64_json is None and re.match(r"^http://127\.0\.0\.1:\d+/images/[0-9a-f-]{36}$", item.url)
    download = httpx.get(item.url, timeout=30)
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    text = read_parameters(download.content)
    assert png(download.content).size == (256, 256)
    assert "Seed: 77" in text and "Steps: 4" in text and "Negative prompt: fog" in text


def test_openai_errors_are_openai_errors(openai_client, http):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        openai_client.images.generate(prompt="x", size="100x100")
    assert info.value.status_code == 400 and info.value.param == "size" and info.value.type == "invalid_request_error"
    assert "size 100x100 is not supported" in info.value.message and "1024x1024" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.images.generate(prompt="x", n=9)
    assert info.value.param == "n"
    r = http.post("/v1/images/generations", json={"size": "256x256"})
    assert r.status_code == 400 and r.json() == {"error": {
        "message": "Missing required parameter: 'prompt'.", "type": "invalid_request_error", "param": "prompt",
        "code": "missing_required_parameter"}}
    r = http.post("/v1/images/generations", json={"prompt": "x" * 501, "size": "256x256"})
    assert r.status_code == 400 and "the limit is 500" in r.json()["error"]["message"]


def test_openai_route_is_in_the_openapi_docs(http):
    paths = http.get("/docs.json").json()["paths"]
    assert "/v1/images/generations" in paths and "/sdapi/v1/txt2img" in paths


# -- AUTOMATIC1111 --------------------------------------------------------------------------------
def test_a1111_txt2img(http):
    body = {"prompt": "a castle", "negative_prompt": "rain", "seed": 11, "batch_size": 2, "sampler_name": "Euler a",
            "cfg_scale": 6, "restore_faces": False, "enable_hr": False, "override_settings": {}, **SMALL}
    r = http.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"images", "parameters", "info"} and isinstance(out["info"], str)
    info = json.loads(out["info"])
    assert info["seed"] == 11 and info["all_seeds"] == [11, 12]
    assert (info["sampler_name"], info["steps"], info["cfg_scale"], info["width"], info["height"]) == (
        "Euler a", 4, 6.0, 256, 256)
    assert info["sd_model_name"].startswith("sdxl-base:") and len(info["infotexts"]) == 2
    for data, text in zip(out["images"], info["infotexts"]):
        raw = base64.b64decode(data)
        assert png(raw).size == (256, 256) and read_parameters(raw) == text
    assert "Seed: 11" in info["infotexts"][0] and "Sampler: Euler a" in info["infotexts"][0]
    assert out["parameters"]["restore_faces"] is False and out["parameters"]["seed"] == 11
    assert out["parameters"]["sampler_name"] == "Euler a"


def test_a1111_random_seed_is_the_real_one(http):
    info = json.loads(http.post("/sdapi/v1/txt2img", json={"prompt": "a tree", "seed": -1, **SMALL}).json()["info"])
    assert 0 <= info["seed"] < 2**32 and f"Seed: {info['seed']}" in info["infotexts"][0]


def test_a1111_errors(http):
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "DPM fast", **SMALL})
    assert r.status_code == 400 and r.json()["error"] == "HTTPException"
    assert "valid samplers: Euler, Euler Karras, Euler Exponential, Euler a" in r.json()["detail"]
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": 4, "n_iter": 3, **SMALL})
    assert r.status_code == 400 and "the limit is 8" in r.json()["detail"]
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 250})
    assert r.status_code == 400 and r.json()["detail"].startswith("width: ")


def test_a1111_models_and_samplers(http):
    models = http.get("/sdapi/v1/sd-models").json()
    assert models and all(set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"} for m in models)
    assert any(m["title"].startswith("sdxl-base:") for m in models)
    assert not any(m["title"].startswith("sdxl-refiner:") for m in models)
    names = [s["name"] for s in http.get("/sdapi/v1/samplers").json()]
    assert names[:4] == ["Euler", "Euler Karras", "Euler Exponential", "Euler a"]
    assert {"PLMS", "LMS", "Heun", "DPM2", "DPM++ 2M SDE", "DPM++ SDE", "DPM++ 2M Karras", "DDIM", "UniPC"} <= set(names)


def test_a1111_progress_and_interrupt(server, http):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, f"{server.url}/sdapi/v1/txt2img", timeout=120,
                           json={"prompt": "a slow one", "width": 512, "height": 512, "steps": 100})
        progress = wait_until(lambda: (p := http.get("/sdapi/v1/progress").json())["state"]["sampling_step"] >= 1
                              and p)
        state = progress["state"]
        assert state["job"] == "txt2img" and state["sampling_steps"] == 100 and state["job_count"] >= 1
        assert 0 < progress["progress"] < 1 and progress["eta_relative"] >= 0 and progress["current_image"] is None
        assert http.post("/sdapi/v1/interrupt").json() == {}
        answer = slow.result(60)
    assert answer.status_code == 409 and answer.json()["error"] == "HTTPException"
    assert "cancelled" in answer.json()["detail"]
    wait_until(lambda: http.get("/sdapi/v1/progress").json()["state"]["job"] == "")
    assert http.post("/generate", json={"prompt": "after interrupt", **SMALL}).status_code == 200


# -- with API keys: tier limits on the mapped request, interrupt only stops the caller's own ------------
@pytest.fixture(scope="module")
def keyed(bentoml_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("clients-keys")
    path = root / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": []}))
    made = {}
    for name, tier in [("free", "free"), ("other", "premium"), ("boss", "premium")]:
        out = subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "keys", "add", name, "--tier", tier,
                              "--file", str(path)], capture_output=True, text=True, check=True)
        made[name] = out.stdout.strip().splitlines()[-1]
    srv = Server(service_env(private_home(bentoml_home, root), root / "images", keys_file=path, concurrency=2,
                             max_concurrency=8, timeout=60), root / "server.log")
    try:
        srv.wait_ready()
        yield srv, made
    finally:
        srv.stop()


def test_keys_and_tiers_apply_to_foreign_routes(keyed):
    """The gateway checks the mapped request against the tier, and answers in each API's error shape."""
    srv, made = keyed
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
    assert info.value.code == "invalid_api_key" and info.value.type == "invalid_request_error"
    free = openai.OpenAI(base_url=srv.url + "/v1", api_key=made["free"], max_retries=0, timeout=120)
    with pytest.raises(openai.PermissionDeniedError) as info:
        free.images.generate(prompt="x", n=4, size="256x256", extra_body={"steps": 4})  # free: at most 2 images
    assert "num_images 4 is above the free tier's limit of 2" in info.value.message and info.value.code == "forbidden"
    with pytest.raises(openai.PermissionDeniedError):
        free.images.generate(prompt="x", size="1536x1536", extra_body={"steps": 4})  # free: at most 1024x1024
    assert len(free.images.generate(prompt="x", n=2, size="256x256", extra_body={"steps": 4}).data) == 2
    with httpx.Client(base_url=srv.url, timeout=120) as http:
        r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL, "steps": 41},
                      headers={"Authorization": f"Bearer {made['free']}"})
        assert r.status_code == 403 and r.json()["error"] == "HTTPException"
        assert "steps 41 is above the free tier's limit of 40" in r.json()["detail"]
        r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL, "batch_size": 3},
                      headers={"Authorization": f"Bearer {made['free']}"})
        assert r.status_code == 403 and "num_images 3" in r.json()["detail"]
        for method, path in (("GET", "/sdapi/v1/progress"), ("GET", "/sdapi/v1/sd-models"),
                             ("POST", "/sdapi/v1/interrupt"), ("POST", "/sdapi/v1/txt2img")):
            r = http.request(method, path, json={"prompt": "x"} if method == "POST" else None)
            assert r.status_code == 401 and "API key" in r.json()["detail"], (path, r.text)


def test_interrupt_with_keys_stops_only_the_callers_generation(keyed):
    srv, made = keyed
    boss = {"Authorization": f"Bearer {made['boss']}"}
    other = {"Authorization": f"Bearer {made['other']}"}
    with httpx.Client(base_url=srv.url, timeout=120) as http, concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(http.post, "/sdapi/v1/txt2img", headers=boss,
                           json={"prompt": "the boss's", "width": 512, "height": 512, "steps": 60})
        wait_until(lambda: http.get("/sdapi/v1/progress", headers=other).json()["state"]["sampling_step"] >= 1)
        assert http.post("/sdapi/v1/interrupt", headers=other).json() == {}  # not other's: runs on
        time.sleep(0.5)
        assert http.get("/sdapi/v1/progress", headers=other).json()["state"]["interrupted"] is False
        assert http.post("/sdapi/v1/interrupt", headers=boss).json() == {}
        assert slow.result(60).status_code == 409


# -- safety: withheld images and the prompt policy, in each API's terms ----------------------------------
@pytest.fixture(scope="module")
def guarded(bentoml_home, tmp_path_factory):
    """A service whose NSFW checker (a tiny synthetic classifier, threshold 0) withholds every image."""
    from sdxl_bento.store.synth import build_synthetic_classifier

    root = tmp_path_factory.mktemp("clients-safety")
    build_synthetic_classifier(root / "checker")
    subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "models", "import", str(root / "checker"), "--role",
                    "safety", "--kind", "classifier", "--tag", "clients-safety"], check=True, capture_output=True)
    policy = root / "policy.yaml"
    policy.write_text(yaml.safe_dump({"words": [{"id": "no-weapons", "word": "bazooka"}]}))
    srv = Server(service_env(private_home(bentoml_home, root), root / "images", safety_model="clients-safety:latest",
                             safety="on", safety_threshold=0, policy_file=policy), root / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_safety_answers_in_each_api_shape(guarded, tmp_path):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key="x", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a landscape", n=2, size="256x256", extra_body={"steps": 4})
    assert info.value.code == "content_policy_violation" and "all 2 images were withheld" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a bazooka", size="256x256", extra_body={"steps": 4})
    assert info.value.code == "content_policy_violation"
    r = httpx.post(f"{guarded.url}/sdapi/v1/txt2img", json={"prompt": "a landscape", **SMALL}, timeout=120)
    assert r.status_code == 400 and "withheld by the safety check" in r.json()["detail"]
    out = cli("a landscape", "-o", str(tmp_path / "x.png"), "--server", guarded.url, "--size", "256x256",
              "--steps", "4")
    assert out.returncode == 1 and "every image was withheld by the safety check" in out.stderr
    assert not (tmp_path / "x.png").exists()


# -- the CLI --------------------------------------------------------------------------------------
def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "generate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_generate_writes_the_files(server, tmp_path):
    out = cli("a cat on a roof", "-o", str(tmp_path / "cat.png"), "--server", server.url, "--size", "256x256",
              "--steps", "4", "--seed", "5", "-n", "2", "--negative", "dog", "--scheduler", "ddim")
    assert out.returncode == 0, out.stderr
    for i, seed in ((1, 5), (2, 6)):
        path = tmp_path / f"cat-{i}.png"
        assert f"wrote {path} (seed {seed})" in out.stdout
        data = path.read_bytes()
        assert png(data).size == (256, 256) and f"Seed: {seed}" in read_parameters(data)
        assert "Sampler: DDIM" in read_parameters(data)


def test_cli_generate_json(server, tmp_path):
    out = cli("a dog", "-o", str(tmp_path / "dog.webp"), "--server", server.url, "--size", "256x256", "--steps", "4",
              "--seed", "8", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["seeds"] == [8] and result["files"] == [str(tmp_path / "dog.webp")] and result["task_id"]
    assert Image.open(tmp_path / "dog.webp").format == "WEBP"


def test_cli_generate_server_errors_are_sentences(server, tmp_path):
    out = cli("x", "-o", str(tmp_path / "x.png"), "--server", server.url, "--size", "256x256", "--steps", "0")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("sdxl-bento: the server refused the request (400): ")
    assert "greater than or equal to 1" in out.stderr
    out = cli("x", "-o", str(tmp_path / "x.png"), "--server", server.url, "--size", "250x256", "--steps", "4")
    assert out.returncode == 1 and "multiple of 8" in out.stderr and "Traceback" not in out.stderr
    out = cli("x", "--server", "http://127.0.0.1:9", "-o", str(tmp_path / "x.png"))
    assert out.returncode == 1 and "cannot reach the service" in out.stderr


def test_cli_ctrl_c_cancels_the_task(server, http, tmp_path):
    # The CLI starts with SIGINT at its default, as in a terminal: a test run launched in the background
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen([sys.executable, "-m", "sdxl_bento.cli.main", "generate", "a slow one", "-o",
                             str(tmp_path / "slow.png"), "--server", server.url, "--size", "512x512", "--steps", "100"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_until(lambda: http.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    task_id = re.search(r"task (\S+) cancelled", err).group(1)
    status = http.get("/jobs/status", params={"task_id": task_id}).json()
    assert status["status"] == "canceled"
    assert not (tmp_path / "slow.png").exists()
