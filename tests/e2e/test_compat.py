"""The tools people already use, against the real service (``bentoml serve`` on the tiny synthetic SDXL): the
third-party AUTOMATIC1111 client ``webuiapi`` and the official ``openai`` package, plus raw HTTP for every
``/sdapi/v1`` route's shape. One server with API keys, a styles file, a LoRA and a second checkpoint.

"Changes the image" means the pixels differ from the same request without the field (same seed); what a field
does is checked structurally (sizes, seams)."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from sdxl_bento.core.images import read_parameters

from .conftest import REPO, Server, private_home, service_env

pytestmark = pytest.mark.e2e
SMALL = {"width": 256, "height": 256, "steps": 3}


@pytest.fixture(scope="module")
def compat(bentoml_home, tmp_path_factory):
    from tests.unit.test_lora import make_lora

    root = tmp_path_factory.mktemp("compat")
    run = [sys.executable, "-m", "sdxl_bento.cli.main"]
    subprocess.run([*run, "models", "synth", "--preset", "tiny", "--tag", "compat-alt", "--seed", "7"], check=True,
                   capture_output=True, cwd=REPO)
    subprocess.run([*run, "models", "import-lora", str(make_lora(root / "lora", seed=2, scale=2.0)), "--tag",
                    "brand"], check=True, capture_output=True, cwd=REPO)
    keys = root / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": []}))
    made = {}
    for name in ("alice", "bob"):
        out = subprocess.run([*run, "keys", "add", name, "--tier", "premium", "--file", str(keys)],
                             capture_output=True, text=True, check=True)
        made[name] = out.stdout.strip().splitlines()[-1]
    styles = root / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nnoir,"{prompt}, film noir, dramatic light",colour\n'
                      'sunny,"bright, sunny",\n')
    srv = Server(service_env(private_home(bentoml_home, root), root / "images", keys_file=keys, styles_file=styles,
                             checkpoints="compat-alt", concurrency=2, max_concurrency=8, timeout=120),
                 root / "server.log")
    try:
        srv.wait_ready()
        yield srv, made
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def http(compat):
    srv, made = compat
    with httpx.Client(base_url=srv.url, timeout=120, headers={"Authorization": f"Bearer {made['alice']}"}) as client:
        yield client


@pytest.fixture(scope="module")
def webui(compat):
    webuiapi = pytest.importorskip("webuiapi")
    srv, made = compat
    api = webuiapi.WebUIApi(baseurl=f"{srv.url}/sdapi/v1", sampler="Euler", steps=3)
    api.session.headers["Authorization"] = f"Bearer {made['alice']}"
    return api


def pixels(image) -> np.ndarray:
    if isinstance(image, (bytes, str)):
        image = Image.open(io.BytesIO(base64.b64decode(image) if isinstance(image, str) else image))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def differ(a, b) -> float:
    a, b = pixels(a), pixels(b)
    return float("inf") if a.shape != b.shape else float(np.abs(a - b).mean())


def txt2img(http, **fields):
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "a lighthouse", "seed": 5, **SMALL, **fields})
    assert r.status_code == 200, r.text
    out = r.json()
    return out["images"][0], json.loads(out["info"])


# -- webuiapi, the third-party client ---------------------------------------------------------------
def test_webuiapi_txt2img_hires_tiling_variation_styles(webui):
    import webuiapi

    plain = webui.txt2img(prompt="a lighthouse", seed=5, width=256, height=256)
    assert plain.image.size == (256, 256) and plain.info["all_seeds"] == [5]
    hires = webui.txt2img(prompt="a lighthouse", seed=5, width=256, height=256, enable_hr=True, hr_scale=2,
                          hr_upscaler=webuiapi.HiResUpscaler.Latent, denoising_strength=0.5)
    assert hires.image.size == (512, 512)
    assert "Hires upscale: 2" in hires.info["infotexts"][0] and "Denoising strength: 0.5" in hires.info["infotexts"][0]
    lanczos = webui.txt2img(prompt="a lighthouse", seed=5, width=256, height=256, enable_hr=True, hr_resize_x=384,
                            hr_resize_y=320, hr_upscaler=webuiapi.HiResUpscaler.Lanczos, hr_second_pass_steps=4)
    assert lanczos.image.size == (384, 320)
    tiled = webui.txt2img(prompt="a lighthouse", seed=5, width=256, height=256, tiling=True)
    assert differ(tiled.image, plain.image) > 0.5 and "Tiling: True" in tiled.info["infotexts"][0]
    varied = webui.txt2img(prompt="a lighthouse", seed=5, width=256, height=256, subseed=9, subseed_strength=0.4)
    assert differ(varied.image, plain.image) > 0.5 and varied.info["all_subseeds"] == [9]
    styled = webui.txt2img(prompt="a lighthouse", seed=5, width=256, height=256, styles=["noir"])
    assert styled.info["prompt"] == "a lighthouse" and styled.info["styles"] == ["noir"]  # as A1111: the prompt
    assert styled.info["all_prompts"] == ["a lighthouse, film noir, dramatic light"]  # sent; what ran, styled
    assert styled.info["all_negative_prompts"] == ["colour"]
    assert differ(styled.image, plain.image) > 0 and "Styles: noir" in styled.info["infotexts"][0]


def test_webuiapi_img2img_and_inpainting(webui):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 320, 3), dtype=np.uint8))
    result = webui.img2img(images=[source], prompt="an oil painting", seed=3, width=256, height=256,
                           denoising_strength=0.6)
    assert result.image.size == (256, 256) and "Mode: img2img" in result.info["infotexts"][0]
    mask = Image.new("L", (320, 256), 0)
    mask.paste(255, (100, 80, 200, 180))
    inpainted = webui.img2img(images=[source], mask_image=mask, prompt="a red door", seed=3, width=320, height=256,
                              denoising_strength=0.9, inpaint_full_res=True, inpaint_full_res_padding=16,
                              mask_blur=0)
    assert inpainted.image.size == (320, 256)
    before, after = pixels(source), pixels(inpainted.image)
    outside = np.asarray(mask) == 0
    assert np.abs(before - after)[outside].max() == 0  # only the masked area changed
    assert np.abs(before - after)[~outside].mean() > 5
    with pytest.raises(RuntimeError, match="inpainting_fill"):
        webui.img2img(images=[source], mask_image=mask, prompt="x", inpainting_fill=2, width=256, height=256)


def test_webuiapi_options_read_and_switch_per_key(webui, compat):
    import webuiapi

    srv, made = compat
    assert webui.util_get_current_model().startswith("sdxl-base:")
    assert any(name.startswith("compat-alt:") for name in webui.util_get_model_names())
    before = webui.txt2img(prompt="a lighthouse", seed=5, width=256, height=256)
    webui.util_set_model("compat-alt")
    assert webui.util_get_current_model().startswith("compat-alt:")
    after = webui.txt2img(prompt="a lighthouse", seed=5, width=256, height=256)
    assert after.info["sd_model_name"].startswith("compat-alt:") and differ(after.image, before.image) > 1
    bob = webuiapi.WebUIApi(baseurl=f"{srv.url}/sdapi/v1", sampler="Euler", steps=3)
    bob.session.headers["Authorization"] = f"Bearer {made['bob']}"
    assert bob.util_get_current_model().startswith("sdxl-base:")  # alice's switch is alice's
    assert bob.txt2img(prompt="x", seed=1, width=256, height=256).info["sd_model_name"].startswith("sdxl-base:")
    webui.set_options({"sd_model_checkpoint": "sdxl-base"})
    assert webui.util_get_current_model().startswith("sdxl-base:")
    assert webui.get_options()["CLIP_stop_at_last_layers"] == 1


def test_webuiapi_lists(webui):
    assert {"PLMS", "LMS", "Heun", "DPM2", "DPM++ 2M SDE", "DPM++ SDE", "DPM++ 2M Karras"} <= set(
        webui.util_get_sampler_names())
    assert webui.util_get_scheduler_names() == sorted(["automatic", "uniform", "karras", "exponential"])
    assert [s["name"] for s in webui.get_prompt_styles()] == ["noir", "sunny"]
    assert [lora["name"] for lora in webui.get_loras()] == ["brand"]
    assert webui.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert webui.get_hypernetworks() == [] and webui.get_face_restorers() == [] and webui.get_sd_vae() == []
    assert [u["name"] for u in webui.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert webui.get_memory()["cuda"] == {"error": "unavailable"} and webui.get_memory()["ram"]["used"] > 0
    assert webui.get_cmd_flags()["api"] is True and webui.get_scripts() == {"txt2img": [], "img2img": []}
    assert webui.refresh_checkpoints() is None


def test_webuiapi_progress_and_interrupt(webui, compat):
    srv, made = compat
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(webui.txt2img, prompt="a slow one", width=512, height=512, steps=100)
        deadline = time.monotonic() + 60
        while webui.get_progress()["state"]["sampling_step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert webui.get_progress()["state"]["job"] == "txt2img"
        assert webui.interrupt() == {}
        with pytest.raises(RuntimeError, match="409"):
            slow.result(60)


# -- raw HTTP: each honoured field changes the image, each refused one is a 4xx -------------------------
@pytest.mark.parametrize("fields", [
    {"sampler_name": "PLMS"}, {"sampler_name": "LMS"}, {"sampler_name": "Heun"}, {"sampler_name": "DPM2"},
    {"sampler_name": "DPM++ 2M SDE"}, {"sampler_name": "DPM++ SDE"}, {"sampler_name": "LMS Karras"},
    {"sampler_name": "Euler", "scheduler": "Karras"}, {"sampler_name": "Euler", "scheduler": "Exponential"},
    {"sampler_name": "DDIM", "eta": 0.7}, {"clip_skip": 2}, {"override_settings": {"CLIP_stop_at_last_layers": 2}},
    {"tiling": True}, {"subseed": 3, "subseed_strength": 0.5}, {"styles": ["sunny"]},
    {"prompt": "a lighthouse <lora:brand:1>"}, {"override_settings": {"sd_model_checkpoint": "compat-alt"}},
    {"enable_hr": True, "hr_prompt": "a stormy lighthouse"},
])
def test_each_honoured_field_changes_the_image(http, fields):
    base_fields = {"sampler_name": "DDIM"} if "eta" in fields else {}
    if "enable_hr" in fields:
        base_fields = {"enable_hr": True}
    base, _ = txt2img(http, **base_fields)
    changed, info = txt2img(http, **fields)
    assert differ(changed, base) > 0, fields


def test_hires_denoising_steps_and_upscalers_do_what_they_say(http):
    a, info = txt2img(http, enable_hr=True, hr_scale=1.5, denoising_strength=0.3, hr_second_pass_steps=10)
    assert pixels(a).shape == (384, 384, 3) and info["denoising_strength"] == 0.3
    b, _ = txt2img(http, enable_hr=True, hr_scale=1.5, denoising_strength=0.8, hr_second_pass_steps=10)
    c, _ = txt2img(http, enable_hr=True, hr_scale=1.5, denoising_strength=0.8, hr_second_pass_steps=6)
    d, _ = txt2img(http, enable_hr=True, hr_scale=1.5, denoising_strength=0.8, hr_second_pass_steps=10,
                   hr_upscaler="Nearest")
    assert differ(a, b) > 0 and differ(b, c) > 0 and differ(b, d) > 0
    wide, _ = txt2img(http, enable_hr=True, hr_resize_x=512)
    assert pixels(wide).shape == (512, 512, 3)


def test_tiled_images_meet_at_their_edges(http):
    def seam(image):
        p = pixels(image)
        return (np.abs(p[:, 0] - p[:, -1]).mean() + np.abs(p[0] - p[-1]).mean()) / (
            np.abs(np.diff(p, axis=1)).mean() + np.abs(np.diff(p, axis=0)).mean())

    plain, _ = txt2img(http)
    tiled, _ = txt2img(http, tiling=True)
    assert seam(tiled) < seam(plain)


def test_lora_in_the_prompt_is_applied_and_stripped(http):
    with_lora, info = txt2img(http, prompt="a lighthouse <lora:brand:1>")
    assert info["prompt"] == "a lighthouse" and info["all_prompts"] == ["a lighthouse"]
    assert 'Lora: "brand:1"' in info["infotexts"][0]
    assert "<lora" not in read_parameters(base64.b64decode(with_lora)).splitlines()[0]


@pytest.mark.parametrize("fields, field", [
    ({"restore_faces": True}, "restore_faces"), ({"script_name": "X/Y/Z plot"}, "script_name"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, "alwayson_scripts"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"), ({"s_churn": 1}, "s_churn"),
    ({"seed_resize_from_w": 512, "seed_resize_from_h": 512}, "seed_resize_from_h"), ({"infotext": "x"}, "infotext"),
    ({"sampler_name": "DPM fast"}, "sampler_name"), ({"override_settings": {"bogus": 1}}, "override_settings.bogus"),
    ({"enable_hr": True, "denoising_strength": 0.2}, "enable_hr"),  # 3 steps x 0.2: no step to run
    ({"override_settings": {"sd_model_checkpoint": "nope"}}, "sd_model_checkpoint"),
    ({"prompt": "<lora:missing:1> x"}, "loras"), ({"styles": ["missing"]}, "styles"),
])
def test_each_refused_field_is_a_4xx_naming_it(http, fields, field):
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "a lighthouse", **SMALL, **fields})
    assert 400 <= r.status_code < 500, r.text
    body = r.json()
    assert set(body) == {"error", "detail", "body", "errors"} and field in body["detail"], body


@pytest.mark.parametrize("fields, field", [
    ({"resize_mode": 3}, "resize_mode"), ({"mask": "MASK", "inpainting_fill": 3}, "inpainting_fill"),
    ({"init_images": ["IMG", "IMG"]}, "init_images"), ({"subseed_strength": 0.3}, "subseed_strength"),
    ({"latent_mask": "MASK"}, "latent_mask"),
])
def test_img2img_refusals(http, fields, field):
    image = base64.b64encode(_png(Image.new("RGB", (256, 256), "red"))).decode()
    body = {"prompt": "x", "init_images": [image], **SMALL, **fields}
    body = json.loads(json.dumps(body).replace('"IMG"', json.dumps(image)).replace('"MASK"', json.dumps(image)))
    r = http.post("/sdapi/v1/img2img", json=body)
    assert 400 <= r.status_code < 500 and field in r.json()["detail"], r.text


def test_every_a1111_route_answers_json_in_its_shape(http, compat):
    srv, made = compat
    for path in ("options", "progress", "sd-models", "samplers", "schedulers", "prompt-styles", "loras", "cmd-flags",
                 "embeddings", "hypernetworks", "upscalers", "latent-upscale-modes", "face-restorers", "sd-vae",
                 "memory", "scripts"):
        r = http.get(f"/sdapi/v1/{path}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), path
        r.json()
    for path in ("refresh-checkpoints", "interrupt"):
        assert http.post(f"/sdapi/v1/{path}").status_code == 200
    for method, path, status in (("GET", "/sdapi/v1/nope", 404), ("GET", "/sdapi/v1/txt2img", 405),
                                 ("POST", "/sdapi/v1/progress", 405)):
        r = http.request(method, path)
        assert r.status_code == status and set(r.json()) == {"error", "detail", "body", "errors"}, (path, r.text)
    anonymous = httpx.get(f"{srv.url}/sdapi/v1/options")
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "HTTPException"
    bad = http.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and set(bad.json()) == {"error", "detail", "body", "errors"}


# -- OpenAI ------------------------------------------------------------------------------------------
def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def openai_client(compat):
    openai = pytest.importorskip("openai")
    srv, made = compat
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=made["alice"], max_retries=0, timeout=120)


def test_openai_models_list_and_edit(openai_client):
    ids = [model.id for model in openai_client.models.list().data]
    assert any(i.startswith("sdxl-base:") for i in ids) and any(i.startswith("compat-alt:") for i in ids)
    source = Image.fromarray(np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    edited = openai_client.images.edit(image=("in.png", _png(source), "image/png"), prompt="a watercolour",
                                       size="256x256", response_format="b64_json", extra_body={"steps": 4, "seed": 2})
    assert pixels(edited.data[0].b64_json).shape == (256, 256, 3)
    assert "Mode: img2img" in read_parameters(base64.b64decode(edited.data[0].b64_json))
    mask = Image.new("RGBA", (256, 256), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (64, 64, 192, 192))  # transparent = edit
    masked = openai_client.images.edit(image=("in.png", _png(source), "image/png"),
                                       mask=("mask.png", _png(mask), "image/png"), prompt="a door", n=2,
                                       response_format="b64_json", output_format="webp",
                                       extra_body={"steps": 4, "seed": 2})
    assert len(masked.data) == 2 and masked.output_format == "webp"
    out = pixels(masked.data[0].b64_json)
    outside = np.ones((256, 256), bool)
    outside[64:192, 64:192] = False
    assert out.shape == (256, 256, 3)
    assert np.abs(out - pixels(source))[~outside].mean() > np.abs(out - pixels(source))[outside].mean()
    assert "Mode: inpaint" in read_parameters(base64.b64decode(masked.data[0].b64_json))
    url = openai_client.images.edit(image=("in.png", _png(source), "image/png"), prompt="x", size="256x256",
                                    extra_body={"steps": 2}).data[0].url
    assert url.startswith("http") and "/images/" in url


def test_openai_newer_parameters_honoured_or_refused(openai_client):
    import openai

    ok = openai_client.images.generate(prompt="x", size="256x256", quality="low", background="opaque",
                                       moderation="auto", output_format="jpeg", output_compression=60,
                                       response_format="b64_json", extra_body={"steps": 2})
    assert Image.open(io.BytesIO(base64.b64decode(ok.data[0].b64_json))).format == "JPEG"
    for kwargs, param in (({"background": "transparent"}, "background"), ({"moderation": "low"}, "moderation"),
                          ({"style": "vivid"}, "style"), ({"output_format": "gif"}, "output_format"),
                          ({"quality": "max"}, "quality")):
        with pytest.raises(openai.BadRequestError) as info:
            openai_client.images.generate(prompt="x", size="256x256", **kwargs)
        assert info.value.param == param, kwargs
    source = ("in.png", _png(Image.new("RGB", (256, 256), "blue")), "image/png")
    for kwargs, param in (({"input_fidelity": "high"}, "input_fidelity"),
                          ({"mask": ("m.png", _png(Image.new("RGB", (256, 256))), "image/png")}, "mask"),
                          ({"mask": ("m.png", _png(Image.new("RGBA", (128, 128))), "image/png")}, "mask"),
                          ({"background": "transparent"}, "background")):
        with pytest.raises(openai.BadRequestError) as info:
            openai_client.images.edit(image=source, prompt="x", **kwargs)
        assert info.value.param == param, kwargs
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.images.edit(image=[source, source], prompt="x")
    assert info.value.param == "image"


def test_a_hires_pass_counts_against_the_tier(http):
    """premium: 100 steps. 60 + the hires pass's 60 x 0.75 = 105, refused before anything runs, whichever API
    asks and whatever type the numbers come in."""
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 256, "height": 256, "steps": 60,
                                             "enable_hr": True, "denoising_strength": 0.75})
    assert r.status_code == 403 and "hires pass" in r.json()["detail"], r.text
    r = http.post("/generate", json={"prompt": "x", "width": 256, "height": 256, "steps": "60",
                                     "hires": {"steps": 60.0, "denoising_strength": "0.75"}})
    assert r.status_code == 403 and r.json()["error"]["limit"] == "max_steps", r.text
    r = http.post("/generate", json={"prompt": "x", "width": 256, "height": 256, "steps": 2, "seed": 3,
                                     "hires": {"scale": 1.5, "steps": 4, "denoising_strength": 0.5},
                                     "tiling": True, "subseed": 4, "subseed_strength": 0.2, "styles": ["sunny"]})
    assert r.status_code == 200, r.text
    (image,) = r.json()["images"]
    assert (image["width"], image["height"]) == (384, 384)
    text = read_parameters(http.get(image["url"]).content)
    assert text.startswith("x, bright, sunny\n")
    for part in ("Hires upscale: 1.5", "Hires steps: 4", "Tiling: True", "Variation seed: 4", "Styles: sunny"):
        assert part in text, text
