"""LoRA adapters per request, on the tiny SDXL: synthetic LoRAs made with peft, imported into the model store."""

import numpy as np
import pytest
import torch

from sdxl_bento.errors import InvalidRequest
from sdxl_bento.gpu.engine import BatchKey, Work
from sdxl_bento.store import modelstore as store
from sdxl_bento.store.loras import LORA_WEIGHT_NAME, find_lora, import_lora, inspect_lora, list_loras
from sdxl_bento.store.synth import build_pipelines, configs

KEY = BatchKey(kind="txt2img", width=64, height=64, steps=2, guidance_scale=5.0, scheduler="euler")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora(folder, seed: int, text_encoder: bool = False, scale: float = 0.5):
    """A rank-4 LoRA for the tiny UNet (and CLIP-L text encoder) with random, non-zero lora_B, saved as diffusers
    training scripts do."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    pipe, _ = build_pipelines("tiny", seed=0)
    layers = {}
    generator = torch.Generator().manual_seed(seed)
    parts = [("unet", pipe.unet, UNET_TARGETS)]
    if text_encoder:
        parts.append(("text_encoder", pipe.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"]))
    for name, model, targets in parts:
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=True))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    StableDiffusionXLPipeline.save_lora_weights(str(folder), **layers)
    return folder


@pytest.fixture(scope="module")
def loras(bentoml_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    a = make_lora(root / "a", seed=1)
    return {
        "a": import_lora(str(a / LORA_WEIGHT_NAME), "style-a"),          # a file
        "b": import_lora(str(make_lora(root / "b", seed=2)), "style-b"),  # a folder
        "te": import_lora(str(make_lora(root / "te", seed=3, text_encoder=True)), "style-te"),
    }


def render(engine, loras=(), seed=5, model="", prompt="a cat"):
    key = BatchKey(**{**KEY.__dict__, "loras": tuple(loras), "model": model})
    (image,), = engine.generate([Work(key, prompt, "", [seed])])
    return np.asarray(image, dtype=np.int16)


def diff(a, b):
    return np.abs(a - b)


def test_import_lora_into_the_store(loras, tmp_path):
    stored = find_lora("style-a")
    assert stored is not None and str(stored.tag) == loras["a"]
    assert stored.metadata["role"] == "lora" and stored.metadata["rank"] == 4
    assert stored.metadata["components"] == "unet" and len(stored.metadata["sha256"]) == 64
    assert (stored.path / LORA_WEIGHT_NAME).is_file()
    assert find_lora("style-te").metadata["components"] == "text_encoder,unet"
    assert {row["tag"] for row in list_loras()} >= set(loras.values())
    assert find_lora("sdxl-base") is None and find_lora("no-such-lora") is None
    # a safetensors file that is no LoRA, a wrong suffix, a folder without the weights file, nothing
    vae = store.resolve("sdxl-base:latest", "base").path / "vae" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ValueError, match="not a LoRA"):
        import_lora(str(vae), "bad")
    (tmp_path / "x.bin").write_bytes(b"123")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        import_lora(str(tmp_path / "x.bin"), "bad")
    with pytest.raises(ValueError, match=LORA_WEIGHT_NAME):
        import_lora(str(tmp_path), "bad")
    with pytest.raises(ValueError, match="no such file"):
        import_lora(str(tmp_path / "missing.safetensors"), "bad")
    # A and B for each targeted layer: q, k, v, out of 8 attentions (self and cross, 4 transformer blocks)
    assert inspect_lora(stored.path / LORA_WEIGHT_NAME) == {"tensors": 2 * 4 * 8, "rank": 4, "components": ["unet"]}


def test_lora_changes_the_image_weight_zero_is_none_and_nothing_leaks(engine, loras):
    baseline = render(engine)
    with_lora = render(engine, [("style-a", 1.0)])
    assert diff(with_lora, baseline).mean() > 1
    assert diff(render(engine, [("style-a", 0.0)]), baseline).max() <= 1
    assert np.array_equal(render(engine), baseline)  # the next request without LoRA: exactly the baseline
    assert np.array_equal(render(engine, [("style-a", 1.0)]), with_lora)  # and back again
    assert np.array_equal(render(engine), baseline)


def test_two_loras_combine_with_their_weights(engine, loras):
    a, b = render(engine, [("style-a", 1.0)]), render(engine, [("style-b", 1.0)])
    both = render(engine, [("style-a", 1.0), ("style-b", 1.0)])
    assert diff(both, a).mean() > 1 and diff(both, b).mean() > 1 and diff(a, b).mean() > 1
    assert diff(render(engine, [("style-b", 1.0), ("style-a", 1.0)]), both).max() <= 1   # order does not matter
    assert diff(render(engine, [("style-a", 1.0), ("style-b", 0.0)]), a).max() <= 1      # a weight-0 mate adds nothing
    half = render(engine, [("style-a", 0.5), ("style-b", 0.5)])
    assert diff(half, both).mean() > 1 and diff(half, a).mean() > 1


def test_each_lora_is_loaded_once_per_pipeline(engine, loras, monkeypatch):
    render(engine, [("style-a", 1.0)])
    render(engine, [("style-b", 0.7)])
    pipe = engine.manager.ensure("").pipe
    calls = []
    original = pipe.load_lora_weights
    monkeypatch.setattr(pipe, "load_lora_weights", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    for weights in ([("style-a", 0.3)], [("style-a", 1.0), ("style-b", 0.2)], []):
        render(engine, weights)
    assert calls == []
    adapters = pipe.get_list_adapters()["unet"]
    assert len(adapters) == len(set(adapters)) and sum("style_a" in a for a in adapters) == 1


def test_batch_with_a_lora_equals_one_by_one(engine, loras):
    key = BatchKey(**{**KEY.__dict__, "loras": (("style-a", 0.8),)})
    batched = engine.generate([Work(key, "a cat", "", [1, 2]), Work(key, "a dog", "", [3])])
    singles = [render(engine, [("style-a", 0.8)], seed=s, prompt=p)
               for p, s in (("a cat", 1), ("a cat", 2), ("a dog", 3))]
    for got, want in zip([img for images in batched for img in images], singles):
        assert diff(np.asarray(got, dtype=np.int16), want).max() <= 1


def test_unknown_or_bad_lora_is_a_clear_error_and_harmless(engine, loras):
    baseline = render(engine)
    with pytest.raises(InvalidRequest, match="unknown LoRA 'nope'"):
        render(engine, [("nope", 1.0)])
    with pytest.raises(InvalidRequest, match="finite"):
        render(engine, [("style-a", float("nan"))])
    with pytest.raises(InvalidRequest, match="refiner takes none"):
        engine.generate([Work(BatchKey(kind="refine", width=64, height=64, steps=4, guidance_scale=5.0,
                                       scheduler="euler", strength=0.5, loras=(("style-a", 1.0),)),
                              "x", "", [1], init_images=[None])])
    assert np.array_equal(render(engine), baseline)


def test_text_encoder_lora_does_not_leak_through_a_shared_text_encoder(engine, loras, bentoml_home):
    """A fine-tune sharing sdxl-base's text encoders: a LoRA with text encoder layers on one checkpoint is off for
    the other, and each checkpoint gets its own copy of the adapter."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    pipe, _ = build_pipelines("tiny", seed=0)
    torch.manual_seed(11)
    unet = UNet2DConditionModel(**{k: v for k, v in configs("tiny")["base_unet"].items() if not k.startswith("_")})
    tag = store.save_pipeline(StableDiffusionXLPipeline(**{**pipe.components, "unet": unet}), name="lora-finetune",
                              role="base", source="synthetic:tiny", dtype="float32", synthetic=True)
    engine.add_checkpoint(store.resolve(tag, "base"))
    finetune_baseline = render(engine, model=tag)
    assert engine.manager.get(tag).pipe.text_encoder is engine.manager.get("").pipe.text_encoder
    default_baseline = render(engine)
    te_default = render(engine, [("style-te", 1.0)])
    assert diff(te_default, default_baseline).mean() > 1
    assert np.array_equal(render(engine, model=tag), finetune_baseline)
    te_finetune = render(engine, [("style-te", 1.0)], model=tag)
    assert diff(te_finetune, finetune_baseline).mean() > 1
    assert np.array_equal(render(engine), default_baseline)
    assert np.array_equal(render(engine, [("style-te", 1.0)]), te_default)
    assert np.array_equal(render(engine, model=tag), finetune_baseline)


def test_lora_applies_to_img2img_on_the_same_modules(engine, loras):
    from PIL import Image

    init = Image.new("RGB", (64, 64), (120, 60, 30))
    key = BatchKey(kind="img2img", width=64, height=64, steps=4, guidance_scale=5.0, scheduler="euler", strength=0.5)

    def img2img(loras=()):
        (image,), = engine.generate([Work(BatchKey(**{**key.__dict__, "loras": tuple(loras)}), "a cat", "", [2],
                                          init_images=[init])])
        return np.asarray(image, dtype=np.int16)

    plain = img2img()
    assert diff(img2img([("style-a", 1.0)]), plain).mean() > 1
    assert np.array_equal(img2img(), plain)


def test_lora_with_the_refiner_ensemble_leaves_nothing_behind(engine, loras):
    key = BatchKey(**{**KEY.__dict__, "refine": "ensemble", "steps": 4})

    def ensemble(loras=()):
        (image,), = engine.generate([Work(BatchKey(**{**key.__dict__, "loras": tuple(loras)}), "a cat", "", [6])])
        return np.asarray(image, dtype=np.int16)

    plain = ensemble()
    assert diff(ensemble([("style-te", 1.0)]), plain).mean() > 1
    assert np.array_equal(ensemble(), plain)
