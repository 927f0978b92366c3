"""Several checkpoints, LoRA adapters, image to image and inpainting through the real service."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.unit.test_lora import make_lora

from .conftest import Server, private_home, service_env, serving

pytestmark = pytest.mark.e2e
SMALL = {"width": 256, "height": 256, "steps": 4}


def cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def model_server(bentoml_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    cli("models", "synth", "--preset", "tiny", "--tag", "tiny-alt", "--seed", "7")
    cli("models", "import-lora", str(make_lora(root / "lora", seed=3)), "--tag", "e2e-style")
    env = service_env(private_home(bentoml_home, root), root / "images", checkpoints="tiny-alt", concurrency=4,
                      cache="false")
    with serving(env, root / "server.log") as srv:
        yield srv


def png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def fetch(srv: Server, body: dict, route: str = "/generate") -> tuple[dict, np.ndarray]:
    r = httpx.post(f"{srv.url}{route}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    data = httpx.get(f"{srv.url}{answer['images'][0]['url']}").content
    return answer, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_models_lists_checkpoints_and_loras(model_server):
    listing = httpx.get(f"{model_server.url}/models/").json()
    tags = {c["tag"].split(":")[0]: c for c in listing["checkpoints"]}
    assert {"sdxl-base", "tiny-alt"} <= set(tags) and tags["sdxl-base"]["loaded"] and tags["sdxl-base"]["synthetic"]
    assert any(lora["tag"].startswith("e2e-style:") for lora in listing["loras"])


def test_a_request_chooses_its_checkpoint(model_server):
    base, a = fetch(model_server, {"prompt": "a cat", "seed": 3, **SMALL})
    alt, b = fetch(model_server, {"prompt": "a cat", "seed": 3, "model": "tiny-alt", **SMALL})
    assert alt["model"].startswith("tiny-alt:") and base["model"].startswith("sdxl-base:")
    assert np.abs(a - b).mean() > 1
    loaded = {c["tag"].split(":")[0]: c["loaded"] for c in httpx.get(f"{model_server.url}/models/").json()["checkpoints"]}
    assert loaded["tiny-alt"]
    r = httpx.post(f"{model_server.url}/generate", json={"prompt": "x", "model": "nope", **SMALL})
    assert r.status_code == 400 and "unknown checkpoint" in r.json()["error"]["message"]


def test_loras_change_the_image_and_never_leak(model_server):
    _, plain = fetch(model_server, {"prompt": "a cat", "seed": 5, **SMALL})
    _, styled = fetch(model_server, {"prompt": "a cat", "seed": 5, "loras": [{"name": "e2e-style", "weight": 1}],
                                     **SMALL})
    _, zero = fetch(model_server, {"prompt": "a cat", "seed": 5, "loras": [{"name": "e2e-style", "weight": 0}],
                                   **SMALL})
    _, after = fetch(model_server, {"prompt": "a cat", "seed": 5, **SMALL})
    assert np.abs(plain - styled).mean() > 1
    assert np.abs(plain - zero).max() <= 1 and np.abs(plain - after).max() <= 1
    r = httpx.post(f"{model_server.url}/generate", json={"prompt": "x", "loras": [{"name": "missing"}], **SMALL})
    assert r.status_code == 400 and "no LoRA named 'missing'" in r.json()["error"]["message"]
    r = httpx.post(f"{model_server.url}/generate", json={"prompt": "x", "loras": [{"name": f"l{i}"} for i in range(5)],
                                                         **SMALL})
    assert r.status_code == 400 and "the limit is 4" in r.text


def test_img2img_from_base64_and_from_a_stored_image(model_server):
    source = Image.fromarray(np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))).convert("RGB")
    light, a = fetch(model_server, {"prompt": "a gradient", "image": png(source), "strength": 0.3, "seed": 1,
                                    "steps": 10}, "/img2img")
    heavy, b = fetch(model_server, {"prompt": "a gradient", "image": png(source), "strength": 0.9, "seed": 1,
                                    "steps": 10}, "/img2img")
    original = np.asarray(source, dtype=np.int16)
    assert a.shape == (256, 256, 3) and np.abs(a - original).mean() < np.abs(b - original).mean()
    stored_id = light["images"][0]["id"]
    again, _ = fetch(model_server, {"prompt": "again", "image_id": stored_id, "steps": 4, "strength": 0.5}, "/img2img")
    assert again["images"][0]["id"] != stored_id


def test_inpaint_and_bad_images_get_4xx(model_server):
    source = Image.new("RGB", (256, 256), (40, 90, 200))
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 192))
    answer, out = fetch(model_server, {"prompt": "a red square", "image": png(source), "mask": png(mask), "steps": 8},
                        "/inpaint")
    assert out.shape == (256, 256, 3)
    for body, message in [({"prompt": "x", "image": "bm90IGFuIGltYWdl"}, "not an image"),
                          ({"prompt": "x"}, "exactly one of image"),
                          ({"prompt": "x", "image": png(Image.new("RGB", (64, 64)))}, "at least 256")]:
        r = httpx.post(f"{model_server.url}/img2img", json={**body, "steps": 4}, timeout=60)
        assert 400 <= r.status_code < 500 and message in r.text, (body, r.text)


def test_img2img_through_the_task_api(model_server):
    source = Image.new("RGB", (256, 256), (120, 60, 30))
    task_id = httpx.post(f"{model_server.url}/img2img_jobs/submit", json={"prompt": "x", "image": png(source),
                                                                          "steps": 4}).json()["task_id"]
    for _ in range(300):
        status = httpx.get(f"{model_server.url}/img2img_jobs/status", params={"task_id": task_id}).json()["status"]
        if status != "in_progress":
            break
        time.sleep(0.1)
    assert status == "completed"
    result = httpx.get(f"{model_server.url}/img2img_jobs/get", params={"task_id": task_id}).json()
    assert result["images"][0]["width"] == 256
