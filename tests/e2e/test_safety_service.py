"""Safety through the real service: the prompt policy before any GPU work, and a real NSFW checker (a
tiny synthetic classifier, imported with the project's command, whose decision this test controls)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import yaml

from sdxl_bento.gpu.engine import BatchKey, Work
from sdxl_bento.store.synth import build_synthetic_classifier

from .conftest import private_home, service_env, serving

pytestmark = pytest.mark.e2e
SMALL = {"width": 256, "height": 256, "steps": 4}


@pytest.fixture(scope="module")
def safe_server(bentoml_home, engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    # A real classifier, loaded from the model store like any checker. It scores images by their mean
    # colour (red near 1, the tiny model's grey-green noise near 0); this server's threshold of 0 flags
    # every image it checks (the unit tests show the colour decision itself), so the test controls it.
    key = BatchKey(kind="txt2img", width=256, height=256, steps=4, guidance_scale=5.0, scheduler="euler")
    (image,), = engine.generate([Work(key, "probe", "", [1])])
    build_synthetic_classifier(root / "checker", flag_color=(255, 0, 0))
    from sdxl_bento.gpu.checkers import ClassifierChecker

    (score,) = ClassifierChecker(root / "checker").scores([image])
    assert 0 <= score < 1e-3
    subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "models", "import", str(root / "checker"), "--role",
                    "safety", "--kind", "classifier", "--tag", "test-safety"], check=True, capture_output=True)
    policy = root / "policy.yaml"
    policy.write_text(yaml.safe_dump({"words": [{"id": "no-weapons", "word": "bazooka"}],
                                      "patterns": [r"\bcelebrity\s+\w+\s+nude\b"]}))
    env = service_env(private_home(bentoml_home, root), root / "images", safety_model="test-safety:latest",
                      safety="on", safety_threshold=0, policy_file=policy, audit_log=root / "audit.jsonl")
    with serving(env, root / "server.log") as srv:
        yield srv


def test_flagged_images_are_withheld_per_image(safe_server):
    r = httpx.post(f"{safe_server.url}/generate", json={"prompt": "a landscape", "num_images": 2, **SMALL}, timeout=60)
    assert r.status_code == 200
    for image in r.json()["images"]:
        assert image["finish_reason"] == "content_filtered" and image["id"] is None and image["url"] is None
    raw = httpx.post(f"{safe_server.url}/txt2img", json={"prompt": "a landscape", **SMALL}, timeout=60)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "content_filtered"
    assert "sdxl_images_content_filtered_total 3.0" in httpx.get(f"{safe_server.url}/metrics").text


def test_the_open_tier_may_turn_the_check_off(safe_server):
    r = httpx.post(f"{safe_server.url}/generate", json={"prompt": "a landscape", "safety_check": False, **SMALL},
                   timeout=60)
    image = r.json()["images"][0]
    assert image["finish_reason"] == "success" and httpx.get(f"{safe_server.url}{image['url']}").status_code == 200


@pytest.mark.parametrize("prompt, rule", [("a Bazooka on a table", "no-weapons"), ("a b@z00ka", "no-weapons"),
                                          ("a b.a.z.o.o.k.a", "no-weapons"), ("celebrity jane nude", "pattern-1")])
def test_prompt_policy_blocks_before_any_gpu_work(safe_server, prompt, rule):
    r = httpx.post(f"{safe_server.url}/generate", json={"prompt": prompt, **SMALL}, timeout=60)
    body = r.json()["error"]
    assert r.status_code == 400 and body["type"] == "content_filtered" and body["rule"] == rule
    assert body["finish_reason"] == "content_filtered" and "bazooka" not in body["message"].lower()


def test_negative_prompts_and_innocent_prompts_pass_the_policy(safe_server):
    for body in ({"prompt": "a still life", "negative_prompt": "bazooka"}, {"prompt": "a bazookas-free class photo"}):
        r = httpx.post(f"{safe_server.url}/generate", json={**body, **SMALL, "safety_check": False}, timeout=60)
        assert r.status_code == 200, r.text


def test_the_batchable_api_applies_the_same_checks_per_item(safe_server):
    r = httpx.post(f"{safe_server.url}/generate_batch", json={"requests": [
        {"prompt": "a bazooka", **SMALL}, {"prompt": "a meadow", **SMALL}]}, timeout=120)
    blocked, checked = r.json()
    assert not blocked["ok"] and blocked["error"]["type"] == "content_filtered"
    assert checked["ok"] and checked["result"]["images"][0]["finish_reason"] == "content_filtered"
