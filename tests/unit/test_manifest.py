"""Manifests and replay on the tiny real pipelines: what ran is recorded (weights' sha256, scheduler configuration,
versions, device, acceleration), a manifest's request makes the same pixels again, and differences are named.
Previews come from the latents by the linear approximation and by a (synthetic) TAESD."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from sdxl_bento.core import manifest
from sdxl_bento.core.images import ImageStore, encode
from sdxl_bento.errors import InvalidRequest, Unavailable
from sdxl_bento.schemas import GenerateRequest, Img2ImgRequest, InpaintRequest


@pytest.fixture(scope="module")
def environment(engine, tmp_path_factory):
    from sdxl_bento.gpu.environment import Environment
    from sdxl_bento.store import modelstore

    return Environment(engine, tmp_path_factory.mktemp("state"),
                      refiner=modelstore.resolve("sdxl-refiner:latest", "refiner"))


def make(engine, environment, req, index=0):
    from sdxl_bento.core.generation import Generation, ModelInfo

    generation = Generation(None, None, ModelInfo("sdxl-base", "sdxl-refiner", True), timeout=60)  # only .work()
    work = generation.work(req)
    (images,) = engine.generate([work])
    seed = work.seeds[index]
    data = encode(images[index], "png")
    return manifest.build(req, work.key, seed, index, environment.describe(work.key), fmt="png", data=data,
                          pixels=manifest.pixels_sha256(images[index]), width=256, height=256,
                          postprocess={"watermark": False}, batch_images=len(images)), data


def test_a_manifest_records_what_ran_and_replays_to_identical_pixels(engine, environment, tmp_path):
    req = GenerateRequest(prompt="a lighthouse", width=256, height=256, steps=3, seed=41, num_images=2,
                          scheduler="dpmpp_2m", refine="ensemble", webhook="https://hooks.example.com/x")
    found, data = make(engine, environment, req, index=1)
    assert found["seed"] == 42 and found["request"]["seed"] == 42 and found["request"]["num_images"] == 1
    assert "webhook" not in found["request"] and found["kind"] == "txt2img"
    base, refiner = found["models"]["base"], found["models"]["refiner"]
    assert len(base["sha256"]) == 64 and base["synthetic"] is True and base["tag"].startswith("sdxl-base:")
    assert len(refiner["sha256"]) == 64 and refiner["sha256"] != base["sha256"]
    assert found["scheduler"]["class"] == "DPMSolverMultistepScheduler" and found["scheduler"]["config"][
        "num_train_timesteps"] == 1000
    assert found["versions"]["torch"] and found["versions"]["diffusers"] and found["versions"]["cuda"] == "cpu"
    assert found["device"] == {"type": "cpu", "name": "cpu", "dtype": "float32"}
    assert found["acceleration"]["compile"] == "off" and found["acceleration"]["approximation"] == "none"

    store = ImageStore(tmp_path / "images")
    image_id = store.save(data, "png", owner="alice", manifest=found)
    stored = store.manifest(image_id)
    assert stored["image"]["id"] == image_id and stored["created"]

    again = manifest.request_from(stored)
    assert again.seed == 42 and again.num_images == 1 and again.scheduler.value == "dpmpp_2m"
    replayed, new_data = make(engine, environment, again)
    # made in a batch of two, replayed alone: on the CPU the arithmetic may differ in the last bit, and the
    # manifest names the one field that explains it
    assert [d["field"] for d in manifest.differences(stored, replayed)] == ["batch_key.batch_images"]
    compared = manifest.compare(data, new_data)
    assert compared["identical"] or compared["max_abs_diff"] <= 2

    alone, alone_data = make(engine, environment, again)  # the replay of an image that was made alone
    twice, twice_data = make(engine, environment, manifest.request_from(alone))
    assert manifest.compare(alone_data, twice_data) == {"identical": True, "max_abs_diff": 0, "mean_abs_diff": 0.0,
                                                        "compared": "pixels"}
    assert manifest.compare(None, twice_data, alone["image"]["pixels_sha256"])["identical"] is True
    assert manifest.differences(alone, twice) == []


def test_differences_name_the_fields(engine, environment):
    req = GenerateRequest(prompt="a boat", width=256, height=256, steps=2, seed=1)
    first, data = make(engine, environment, req)
    other, other_data = make(engine, environment, req.model_copy(update={"seed": 2}))
    diff = {d["field"]: (d["original"], d["replay"]) for d in manifest.differences(first, other)}
    assert diff == {"seed": (1, 2), "request.seed": (1, 2)}
    compared = manifest.compare(data, other_data)
    assert compared["identical"] is False and compared["max_abs_diff"] > 0 and compared["mean_abs_diff"] > 0
    changed = {**first, "versions": {**first["versions"], "torch": "0.0"}}
    assert [d["field"] for d in manifest.differences(changed, first)] == ["versions.torch"]


def test_what_cannot_be_replayed_says_why():
    with pytest.raises(InvalidRequest):
        manifest.request_from({"manifest_version": 99})
    base = {"manifest_version": 1, "request": {"prompt": "x", "strength": 0.5}}
    with pytest.raises(Unavailable, match="uploaded"):
        manifest.request_from({**base, "kind": "img2img"})
    with pytest.raises(Unavailable, match="mask"):
        manifest.request_from({**base, "kind": "inpaint"})
    uploaded = Img2ImgRequest(prompt="x", image="aGVsbG8=")
    assert "image" not in uploaded.model_dump(exclude={"image"})
    assert InpaintRequest  # imported for the kinds' table


def test_previews_from_the_latents(engine, bentoml_home):
    from sdxl_bento.gpu.previews import LinearPreview, TaesdPreview
    from sdxl_bento.jobs import BatchKey, Work
    from sdxl_bento.store import modelstore

    key = BatchKey(kind="txt2img", width=256, height=256, steps=4, guidance_scale=5.0, scheduler="euler")
    work = Work(key=key, prompt="p", negative_prompt="", seeds=[1, 2])
    tag = modelstore.save_synthetic_preview(tag="sdxl-taesd-test")
    for previewer in (LinearPreview(size=64), TaesdPreview(modelstore.find(tag).path, "cpu", engine.dtype, size=64)):
        got = []
        engine.preview_every, engine.previewer = 2, previewer
        try:
            engine.generate([work], on_preview=lambda done, total, images: got.append((done, total, images)))
        finally:
            engine.preview_every, engine.previewer = 5, None
        assert [(done, total, len(images)) for done, total, images in got] == [(2, 4, 2)]
        for jpeg in got[0][2]:
            image = Image.open(io.BytesIO(jpeg))
            assert image.format == "JPEG" and max(image.size) <= 64 and min(image.size) >= 16


def test_one_lookup_names_the_weights_for_both_manifests(engine, environment):
    """C2PA's claim asks ``sha256`` by tag; the reproducibility manifest's ``models`` has the same digests."""
    from sdxl_bento.store import modelstore

    base = engine.manager.stored("")
    assert environment.sha256(base.tag) == environment.weights(base)["sha256"] == modelstore.weights_sha256(base)
    assert environment.sha256(base.tag.split(":")[0]) == environment.sha256(base.tag)  # a name resolves as requests'
    assert environment.sha256(environment.refiner.tag) == modelstore.weights_sha256(environment.refiner)
    assert environment.sha256("no-such-model") is None
