"""Every image-changing AUTOMATIC1111 field: mapped onto the native field that does it, or refused with a 400
naming it; the settings (``/options``, ``override_settings``) per key; LoRAs in the prompt; the rest of
``/sdapi/v1`` answered in A1111's JSON shape."""

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from starlette.testclient import TestClient

from sdxl_bento.adapters import a1111
from sdxl_bento.adapters import a1111_options as opts
from sdxl_bento.core.styles import StyleBook
from sdxl_bento.errors import InvalidRequest, ServiceError
from sdxl_bento.gpu.thermal import GpuReading
from sdxl_bento.samplers import SAMPLERS
from sdxl_bento.store.modelstore import StoredPipeline


def txt2img(options=None, resolve=None, **body):
    return a1111.to_generate_request(a1111.A1111Txt2ImgRequest.model_validate({"prompt": "a cat", **body}),
                                     options=options, resolve=resolve)


def img2img(**body):
    return a1111.to_image_request(a1111.A1111Img2ImgRequest.model_validate(
        {"prompt": "a cat", "init_images": [PNG], **body}))


def refused(call, field, *args, **body):
    with pytest.raises(ServiceError) as info:
        call(*args, **body)
    assert 400 <= info.value.status < 500 and info.value.details.get("field") == field, info.value.message
    return info.value.message


def png(size=(64, 64), mode="RGB", color=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PNG = png((320, 256))


# -- txt2img: honoured --------------------------------------------------------------------------------
def test_hires_fix_maps_onto_the_native_hires_pass():
    req = txt2img(width=256, height=256, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=7, denoising_strength=0.4,
                  hr_upscaler="Latent (bicubic antialiased)", hr_prompt="a big cat", hr_negative_prompt="blur")
    hires = req.hires
    assert (hires.scale, hires.steps, hires.denoising_strength, hires.upscaler.value) == (
        1.5, 7, 0.4, "latent-bicubic-antialiased")
    assert (hires.prompt, hires.negative_prompt) == ("a big cat", "blur")
    assert hires.plan(256, 256) == (384, 384, 384, 384)
    defaults = txt2img(width=256, height=256, enable_hr=True).hires
    assert (defaults.upscaler.value, defaults.denoising_strength, defaults.steps, defaults.prompt) == (
        "latent", 0.75, None, None)  # A1111's API defaults: Latent, 0.75, the same steps and prompt
    assert txt2img(enable_hr=False, hr_scale=3, hr_upscaler="ESRGAN_4x").hires is None  # off: A1111 ignores them


@pytest.mark.parametrize("name, native", [("Lanczos", "lanczos"), ("Nearest", "nearest"), ("None", "lanczos"),
                                          ("Latent", "latent"), ("Latent (nearest-exact)", "latent-nearest-exact")])
def test_hires_upscalers_that_need_no_weights(name, native):
    assert txt2img(width=256, height=256, enable_hr=True, hr_upscaler=name).hires.upscaler.value == native


def test_hires_resize_and_the_old_firstphase_fields():
    req = txt2img(width=256, height=256, enable_hr=True, hr_resize_x=512, hr_resize_y=384)
    assert (req.hires.width, req.hires.height) == (512, 384)
    assert req.hires.plan(256, 256) == (512, 512, 512, 384)  # cover, then centre-crop
    assert txt2img(width=256, height=256, enable_hr=True, hr_resize_x=400).hires.plan(256, 256) == (400, 400, 400, 400)
    old = txt2img(width=512, height=512, enable_hr=True, firstphase_width=256, firstphase_height=256)
    assert (old.width, old.height, old.hires.width, old.hires.height) == (256, 256, 512, 512)


def test_hires_sampler_of_its_own():
    req = txt2img(width=256, height=256, enable_hr=True, hr_sampler_name="DDIM")
    assert req.hires.sampler.value == "ddim"
    assert txt2img(width=256, height=256, enable_hr=True, hr_sampler_name="Use same sampler").hires.sampler is None
    same = txt2img(width=256, height=256, enable_hr=True, hr_checkpoint_name="Use same checkpoint")
    assert same.hires is not None


def test_tiling_variation_seeds_clip_skip_styles_and_eta():
    req = txt2img(tiling=True, subseed=77, subseed_strength=0.3, clip_skip=2, styles=["noir", "film"])
    assert (req.tiling, req.subseed, req.subseed_strength, req.clip_skip, req.styles) == (
        True, 77, 0.3, 2, ["noir", "film"])
    assert req.subseeds(2) == [77, 78]
    random = txt2img(subseed=-1, subseed_strength=0.5)
    assert random.subseed is None and len(random.subseeds(1)) == 1
    assert txt2img(subseed=5, subseed_strength=0).subseeds(1) is None  # strength 0: A1111 ignores the subseed
    assert txt2img(sampler_name="DDIM", eta=0.4).eta == 0.4
    assert txt2img(sampler_name="DDIM").eta is None and txt2img(sampler_name="DDIM", eta=0).eta is None
    assert txt2img(sampler_name="Euler a", eta=1.0).eta is None  # ancestral: eta 1 is what runs
    assert txt2img(sampler_name="Euler", eta=0.3).eta is None  # A1111's Euler has no eta either


def test_loras_in_the_prompt_become_the_loras_field():
    req = txt2img(prompt="a cat <lora:brand:0.8>, in the snow <lora:style-b>")
    assert req.prompt == "a cat, in the snow"
    assert [(lora.name, lora.weight) for lora in req.loras] == [("brand", 0.8), ("style-b", 1.0)]
    quiet = txt2img(prompt="a cat <lora:brand:0.8>", disable_extra_networks=True)
    assert quiet.prompt == "a cat" and quiet.loras == []
    assert txt2img(prompt="<LyCo:b:0.5> a dog").loras[0].name == "b"
    assert a1111.extract_loras("x <lora:a:0.5:0.5>")[1] == [{"name": "a", "weight": 0.5}]


def test_override_settings_and_options_that_map_onto_fields():
    resolve = {"photo": "photo:v2", "sdxl-base": "sdxl-base:v1"}.__getitem__
    req = txt2img(override_settings={"sd_model_checkpoint": "photo.safetensors [0123abcd]",
                                     "CLIP_stop_at_last_layers": 2, "samples_format": "jpg", "jpeg_quality": 70,
                                     "sd_vae": "Automatic", "eta_noise_seed_delta": 0}, resolve=resolve)
    assert (req.model, req.clip_skip, req.output_format.value, req.quality) == ("photo:v2", 2, "jpeg", 70)
    stored = {"sd_model_checkpoint": "sdxl-base:v1", "CLIP_stop_at_last_layers": 3}
    assert (txt2img(options=stored).model, txt2img(options=stored).clip_skip) == ("sdxl-base:v1", 3)
    mixed = txt2img(options=stored, override_settings={"CLIP_stop_at_last_layers": 1}, clip_skip=None)
    assert mixed.clip_skip == 1  # the request's override wins over the key's option
    assert txt2img(options=stored, clip_skip=4).clip_skip == 4


def test_fields_that_change_nothing_are_accepted():
    req = txt2img(do_not_save_samples=True, do_not_save_grid=True, save_images=True, comments={"a": 1},
                  force_task_id="t1", override_settings_restore_afterwards=False, s_tmin=0.5, s_tmax=10,
                  script_args=[1, 2], restore_faces=False, alwayson_scripts={}, script_name="", infotext="",
                  seed_resize_from_h=0, seed_resize_from_w=-1, s_churn=0, s_noise=1, s_min_uncond=0)
    assert req.prompt == "a cat"


# -- txt2img: refused -------------------------------------------------------------------------------
@pytest.mark.parametrize("body, field", [
    ({"restore_faces": True}, "restore_faces"),
    ({"script_name": "X/Y/Z plot"}, "script_name"),
    ({"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts"),
    ({"infotext": "a cat\nSteps: 20"}, "infotext"),
    ({"seed_resize_from_h": 512, "seed_resize_from_w": 512}, "seed_resize_from_h"),
    ({"seed_resize_from_w": 512}, "seed_resize_from_w"),
    ({"s_min_uncond": 0.5}, "s_min_uncond"),
    ({"s_churn": 0.5}, "s_churn"),
    ({"s_noise": 0.9}, "s_noise"),
    ({"subseed": -2, "subseed_strength": 0.5}, "subseed"),
    ({"subseed_strength": 1.5}, "subseed_strength"),
    ({"sampler_name": "Euler a", "eta": 0.5}, "eta"),
    ({"sampler_name": "DDIM", "eta": 2}, "eta"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ({"enable_hr": True, "hr_upscaler": "SwinIR 4x"}, "hr_upscaler"),
    ({"enable_hr": True, "hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name"),
    ({"enable_hr": True, "hr_sampler_name": "DPM fast"}, "hr_sampler_name"),
    ({"enable_hr": True, "hr_prompt": "<lora:other:1> big"}, "hr_prompt"),
    ({"enable_hr": True, "refiner_checkpoint": "refiner"}, "enable_hr"),
    ({"enable_hr": True, "hr_scale": 9}, "enable_hr"),
    ({"enable_hr": True, "width": 1024, "height": 1024, "hr_scale": 2}, "enable_hr"),
    ({"enable_hr": True, "denoising_strength": 0}, "enable_hr"),
    ({"enable_hr": True, "firstphase_width": 256}, "firstphase_width"),
    ({"prompt": "a cat <hypernet:anime:1>"}, "prompt"),
    ({"prompt": "a cat <lora:a:1> <lora:a:0.5>"}, "prompt"),
    ({"prompt": "a cat <lora:a:te=1:unet=0.5>"}, "prompt"),
    ({"negative_prompt": "<hypernet:x:1>"}, "negative_prompt"),
    ({"clip_skip": 13}, "clip_skip"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 20}}, "override_settings.CLIP_stop_at_last_layers"),
    ({"override_settings": {"samples_format": "gif"}}, "override_settings.samples_format"),
    ({"override_settings": {"sd_vae": "sdxl_vae.safetensors"}}, "override_settings.sd_vae"),
    ({"override_settings": {"eta_noise_seed_delta": 31337}}, "override_settings.eta_noise_seed_delta"),
    ({"override_settings": {"randn_source": "GPU"}}, "override_settings.randn_source"),
    ({"override_settings": {"no_such_option": 1}}, "override_settings.no_such_option"),
])
def test_image_changing_fields_this_service_cannot_honour_are_400_naming_them(body, field):
    refused(txt2img, field, **{"width": 256, "height": 256, **body})


def test_an_unknown_checkpoint_in_override_settings_is_404_as_a1111_answers():
    def resolve(tag):
        raise InvalidRequest(f"model: unknown checkpoint {tag!r}; available: sdxl-base", field="model")

    with pytest.raises(ServiceError) as info:
        txt2img(override_settings={"sd_model_checkpoint": "nope"}, resolve=resolve)
    assert info.value.status == 404 and "available: sdxl-base" in info.value.message
    answer = json.loads(a1111.from_error(info.value).body)
    assert answer == {"error": "RuntimeError", "detail": info.value.message, "body": "",
                      "errors": "model 'nope' not found"}


# -- img2img ---------------------------------------------------------------------------------------------
def test_img2img_maps_onto_img2img_and_a_mask_onto_inpaint():
    req = img2img(denoising_strength=0.4, resize_mode=1, width=256, height=256, tiling=True, styles=["noir"])
    assert type(req).__name__ == "Img2ImgRequest" and (req.strength, req.resize_mode.value) == (0.4, "crop")
    assert (req.width, req.height, req.tiling, req.styles) == (256, 256, True, ["noir"])
    assert img2img().width is None and img2img(resize_mode=2).resize_mode.value == "fill"
    masked = img2img(mask=png(mode="L", color=255), mask_blur=8, inpainting_fill=1, inpaint_full_res=False,
                     inpainting_mask_invert=1)
    assert type(masked).__name__ == "InpaintRequest"
    assert (masked.mask_blur, masked.inpaint_fill.value, masked.mask_padding, masked.mask_invert) == (
        8, "original", None, True)
    defaults = img2img(mask=png(mode="L", color=255))  # A1111's API defaults: blur 4, fill, only masked, padding 0
    assert (defaults.mask_blur, defaults.inpaint_fill.value, defaults.mask_padding, defaults.strength) == (
        4, "fill", 0, 0.75)
    assert img2img(mask=png(mode="L", color=255), inpaint_full_res_padding=32).mask_padding == 32
    assert img2img(mask=png(mode="L", color=255), mask_blur_x=2, mask_blur_y=2).mask_blur == 2


@pytest.mark.parametrize("body, field", [
    ({"init_images": []}, "init_images"),
    ({"init_images": [PNG, PNG]}, "init_images"),
    ({"resize_mode": 3}, "resize_mode"),
    ({"subseed_strength": 0.5}, "subseed_strength"),
    ({"initial_noise_multiplier": 0.5}, "initial_noise_multiplier"),
    ({"latent_mask": PNG}, "latent_mask"),
    ({"mask": PNG, "inpainting_fill": 2}, "inpainting_fill"),
    ({"mask": PNG, "inpainting_fill": 3}, "inpainting_fill"),
    ({"mask": PNG, "mask_blur_x": 4, "mask_blur_y": 8}, "mask_blur_x"),
    ({"denoising_strength": 0}, "denoising_strength"),
    ({"restore_faces": True}, "restore_faces"),
    ({"script_name": "loopback"}, "script_name"),
])
def test_img2img_fields_that_do_not_map_are_400_naming_them(body, field):
    refused(img2img, field, **body)


# -- options --------------------------------------------------------------------------------------------
def test_options_store_is_per_owner_and_survives_a_new_instance(tmp_path: Path):
    store = opts.OptionsStore(tmp_path / "a1111-options.json")
    store.update("alice", {"sd_model_checkpoint": "photo:v2", "CLIP_stop_at_last_layers": 2})
    store.update("", {"samples_format": "webp"})
    assert store.get("alice") == {"sd_model_checkpoint": "photo:v2", "CLIP_stop_at_last_layers": 2}
    assert store.get("bob") == {} and store.get(None) == {"samples_format": "webp"}
    again = opts.OptionsStore(tmp_path / "a1111-options.json")  # another worker, or after a restart
    assert again.get("alice")["sd_model_checkpoint"] == "photo:v2"
    again.update("alice", {"sd_model_checkpoint": None})
    assert store.get("alice") == {"CLIP_stop_at_last_layers": 2}


def test_options_validation():
    values, ignored = opts.validate({"CLIP_stop_at_last_layers": "2", "samples_format": "JPG", "jpeg_quality": 90.0,
                                     "sd_checkpoint_hash": "abc", "sd_vae": "None", "eta_ddim": 0.2})
    assert values == {"CLIP_stop_at_last_layers": 2, "samples_format": "jpeg", "jpeg_quality": 90, "eta_ddim": 0.2}
    assert ignored == ["sd_checkpoint_hash"]  # read-only: ignored without an error, as A1111 does
    with pytest.raises(InvalidRequest) as info:
        opts.validate({"show_progressbar": True})
    assert info.value.details["a1111_error"] == "KeyError" and "show_progressbar" in info.value.message
    with pytest.raises(InvalidRequest, match="a whole number in 1..12"):
        opts.validate({"CLIP_stop_at_last_layers": 1.5})
    assert opts.checkpoint_name("sd_xl_base_1.0.safetensors [31e35c80fc]") == "sd_xl_base_1.0"


# -- /sdapi/v1 routes ---------------------------------------------------------------------------------
class FakeGeneration:
    models = SimpleNamespace(base_tag="sdxl-base:v1")

    @staticmethod
    def resolve_model(tag):
        known = {"": "sdxl-base:v1", "sdxl-base": "sdxl-base:v1", "sdxl-base:v1": "sdxl-base:v1",
                 "photo": "photo:v2", "photo:v2": "photo:v2"}
        if tag not in known:
            raise InvalidRequest(f"model: unknown checkpoint {tag!r}; available: photo, sdxl-base", field="model")
        return known[tag]


@pytest.fixture
def app(tmp_path: Path):
    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nnoir,"{prompt}, film noir",colour\nfilm,grainy,\n')
    models = [StoredPipeline("sdxl-base:v1", tmp_path / "base", {"role": "base", "sha256": "cd" * 32}),
              StoredPipeline("photo:v2", tmp_path / "photo", {"role": "base", "sha256": "ab" * 32}),
              StoredPipeline("unlisted:v1", tmp_path / "u", {"role": "base"})]
    reading = GpuReading(0, "H200", 40.0, 10.0, 2 * 2**30, 140 * 2**30, 100.0, 1000.0, 2000.0)
    refreshed = []
    service = SimpleNamespace(
        runtime=SimpleNamespace(scheduler=None, generation=FakeGeneration(),
                                throttle=SimpleNamespace(update=lambda: None, readings=[reading]),
                                refresh_checkpoints=lambda: refreshed.append(1)),
        front=SimpleNamespace(keys=None, a1111_owners=a1111.JobOwners(), styles=StyleBook(styles),
                              a1111_options=opts.OptionsStore(tmp_path / "options.json"),
                              settings=SimpleNamespace(styles_file=styles)))
    loras = [{"tag": "brand:abc", "source": "brand.safetensors", "rank": 4, "components": "unet"}]
    app = a1111.a1111_app(lambda: models, service=lambda: service, loras=lambda: loras)
    with TestClient(app) as client:
        client.refreshed = refreshed
        yield client


def test_every_get_route_answers_json_in_a1111_shape(app):
    answers = {path: app.get(f"/{path}") for path in a1111.ROUTES["GET"]}
    assert all(r.status_code == 200 and r.headers["content-type"] == "application/json" for r in answers.values())
    options = answers["options"].json()
    assert options["sd_model_checkpoint"] == "sdxl-base:v1" and options["sd_checkpoint_hash"] == "cd" * 32
    assert (options["sd_vae"], options["CLIP_stop_at_last_layers"], options["samples_format"]) == (
        "Automatic", 1, "png")
    assert [m["title"] for m in answers["sd-models"].json()] == ["sdxl-base:v1", "photo:v2"]  # what can run
    assert [s["name"] for s in answers["samplers"].json()] == [s.label for s in SAMPLERS]
    assert {"PLMS", "LMS", "Heun", "DPM2", "DPM++ 2M SDE", "DPM++ SDE", "DPM2 Karras", "DPM++ SDE Karras"} <= {
        s["name"] for s in answers["samplers"].json()}
    assert [s["label"] for s in answers["schedulers"].json()] == ["Automatic", "Uniform", "Karras", "Exponential"]
    assert answers["prompt-styles"].json() == [
        {"name": "noir", "prompt": "{prompt}, film noir", "negative_prompt": "colour"},
        {"name": "film", "prompt": "grainy", "negative_prompt": ""}]
    assert answers["loras"].json() == [{"name": "brand", "alias": "brand", "path": "brand:abc", "metadata": {
        "source": "brand.safetensors", "rank": 4, "components": "unet"}}]
    assert answers["embeddings"].json() == {"loaded": {}, "skipped": {}}
    for empty in ("hypernetworks", "face-restorers", "sd-vae", "realesrgan-models", "script-info", "extensions"):
        assert answers[empty].json() == [], empty
    assert [u["name"] for u in answers["upscalers"].json()] == ["None", "Lanczos", "Nearest"]
    assert [m["name"] for m in answers["latent-upscale-modes"].json()][0] == "Latent"
    assert answers["scripts"].json() == {"txt2img": [], "img2img": []}
    memory = answers["memory"].json()
    assert memory["cuda"]["system"] == {"free": 138 * 2**30, "used": 2 * 2**30, "total": 140 * 2**30}
    assert memory["ram"]["used"] > 0 and memory["ram"]["total"] >= memory["ram"]["used"]
    flags = answers["cmd-flags"].json()
    assert flags["api"] is True and flags["styles_file"] and flags["ckpt"] == "sdxl-base:v1"
    assert answers["progress"].json()["state"]["job_count"] == 0


def test_memory_without_a_gpu_is_unavailable_as_a1111_says():
    assert a1111.memory_view([])["cuda"] == {"error": "unavailable"}


def test_options_switch_the_checkpoint_and_answer_as_a1111(app):
    answer = app.post("/options", json={"sd_model_checkpoint": "photo", "CLIP_stop_at_last_layers": 2})
    assert answer.status_code == 200 and answer.json() is None  # A1111 answers null
    options = app.get("/options").json()
    assert options["sd_model_checkpoint"] == "photo:v2" and options["sd_checkpoint_hash"] == "ab" * 32
    assert options["CLIP_stop_at_last_layers"] == 2
    ignored = app.post("/options", json={"sd_checkpoint_hash": "0000"})
    assert ignored.status_code == 200 and ignored.json() is None
    assert ignored.headers["x-ignored-options"] == "sd_checkpoint_hash"
    unknown = app.post("/options", json={"no_such_option": 1})
    assert unknown.status_code == 400 and unknown.json()["error"] == "KeyError"
    assert unknown.json()["errors"] == "'no_such_option'" and "no_such_option" in unknown.json()["detail"]
    missing = app.post("/options", json={"sd_model_checkpoint": "nope.safetensors"})
    assert missing.status_code == 404 and missing.json()["error"] == "RuntimeError"
    assert missing.json()["errors"] == "model 'nope.safetensors' not found"
    fixed = app.post("/options", json={"sd_vae": "other.vae.pt"})
    assert fixed.status_code == 400 and "sd_vae" in fixed.json()["detail"]
    assert app.get("/options").json()["sd_model_checkpoint"] == "photo:v2"  # nothing changed by the refusals
    assert app.post("/options", json={"sd_model_checkpoint": "sdxl-base"}).status_code == 200
    assert app.get("/options").json()["sd_model_checkpoint"] == "sdxl-base:v1"


def test_unknown_paths_and_methods_are_json_in_a1111_shape(app):
    missing = app.get("/no-such-route")
    assert missing.status_code == 404 and missing.json() == {"error": "HTTPException", "detail": "Not Found",
                                                             "body": "", "errors": "404: Not Found"}
    wrong = app.get("/txt2img")
    assert wrong.status_code == 405 and wrong.json()["detail"] == "Method Not Allowed"
    assert app.delete("/options").status_code == 405


def test_refresh_checkpoints_and_the_other_posts(app):
    assert app.post("/refresh-checkpoints").json() is None and app.refreshed == [1]
    for path in ("refresh-vae", "refresh-loras", "skip"):
        assert app.post(f"/{path}").status_code == 200
    assert app.post("/interrupt").json() == {}
