"""Several checkpoints: loaded on demand, identical components shared, LRU unloading under a memory budget."""

import logging

import numpy as np
import pytest
import torch

from sdxl_bento.errors import InvalidRequest
from sdxl_bento.gpu.engine import BatchKey, Work
from sdxl_bento.gpu.models import ModelBudgetExceeded, ModelManager, module_bytes
from sdxl_bento.store import modelstore as store
from sdxl_bento.store.synth import build_pipelines, configs

KEY = BatchKey(kind="txt2img", width=64, height=64, steps=2, guidance_scale=5.0, scheduler="euler")


def _with_other_unet(seed: int):
    """The tiny base of seed 0 (sdxl-base's weights) with another UNet: a 'fine-tune' of sdxl-base."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    pipe, _ = build_pipelines("tiny", seed=0)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{k: v for k, v in configs("tiny")["base_unet"].items() if not k.startswith("_")})
    return StableDiffusionXLPipeline(**{**pipe.components, "unet": unet})


@pytest.fixture(scope="module")
def stored(bentoml_home):
    """sdxl-base, a fine-tune of it ('finetune': only the UNet differs) and an unrelated base ('other')."""
    other, _ = build_pipelines("tiny", seed=7)
    tags = {
        "finetune": store.save_pipeline(_with_other_unet(1), name="finetune", role="base", source="synthetic:tiny",
                                        dtype="float32", synthetic=True),
        "other": store.save_pipeline(other, name="other", role="base", source="synthetic:tiny", dtype="float32",
                                     synthetic=True),
    }
    return {"base": store.resolve("sdxl-base:latest", "base"),
            **{name: store.resolve(tag, "base") for name, tag in tags.items()}}


def manager(stored, budget=None, pin_base=False):
    m = ModelManager("cpu", torch.float32, budget_bytes=budget)
    m.register(stored["base"], pinned=pin_base)
    m.register(stored["finetune"])
    m.register(stored["other"])
    return m


def full_bytes(loaded):
    return sum(module_bytes(m) for m in loaded.modules().values())


@pytest.fixture(scope="module")
def sizes(stored):
    m = manager(stored)
    base, finetune = m.ensure(""), m.ensure("finetune")
    return {"base": full_bytes(base), "unet": module_bytes(finetune.pipe.unet),
            "finetune_own": m.own_bytes(finetune.tag),
            "estimate_base": m._estimate(stored["base"].path, ["unet", "vae", "text_encoder", "text_encoder_2"])}


def test_loaded_on_demand_and_identical_components_shared(stored, caplog):
    m = manager(stored)
    swaps = []
    m.on_swap = lambda tag, seconds: swaps.append((tag, seconds))
    assert m.loaded() == [] and m.last_swap_s is None
    assert not m.is_loaded("") and not m.is_loaded("finetune")
    with caplog.at_level(logging.INFO, logger="sdxl_bento.gpu.models"):
        base = m.ensure("")
        finetune = m.ensure("finetune:latest")
        other = m.ensure(stored["other"].tag)
    assert m.last_swap_s and m.last_swap_s > 0 and finetune.load_seconds > 0
    assert [tag for tag, _ in swaps] == [base.tag, finetune.tag, other.tag] and swaps[-1][1] == m.last_swap_s
    assert any("checkpoint finetune:" in r.message and "loaded in" in r.message for r in caplog.records)
    assert m.loaded() == [other.tag, finetune.tag, base.tag]  # most recently used first
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert getattr(finetune.pipe, name) is getattr(base.pipe, name), name
        assert getattr(other.pipe, name) is not getattr(base.pipe, name), name
    assert finetune.pipe.unet is not base.pipe.unet
    assert finetune.shared == {n: base.tag for n in ("vae", "text_encoder", "text_encoder_2")}
    assert other.shared == {}
    # Only the UNet is the fine-tune's own memory; the shared modules are counted once in all.
    assert m.own_bytes(finetune.tag) == module_bytes(finetune.pipe.unet)
    assert m.used_bytes() == full_bytes(base) + module_bytes(finetune.pipe.unet) + full_bytes(other)
    assert m.ensure("finetune") is finetune  # no reload
    rows = {r["tag"]: r for r in m.available()}
    assert rows[base.tag] == {"tag": base.tag, "loaded": True, "pinned": False, "synthetic": True,
                              "source": "synthetic:tiny", "default": True, "bytes": m.own_bytes(base.tag)}
    assert set(rows) == {base.tag, finetune.tag, other.tag}


def test_shared_text_encoder_gives_the_same_images_as_its_own_copy(stored):
    """Reusing sdxl-base's modules changes nothing: the fine-tune renders as when loaded alone."""
    alone = manager(stored).ensure("finetune")
    m = manager(stored)
    m.ensure("")
    shared = m.ensure("finetune")
    assert shared.shared and not alone.shared

    def render(loaded):
        return np.asarray(loaded.pipe(prompt="a cat", width=64, height=64, num_inference_steps=2,
                                      generator=torch.Generator().manual_seed(3)).images[0])

    assert np.array_equal(render(alone), render(shared))


def test_estimate_matches_the_loaded_bytes(sizes):
    assert abs(sizes["estimate_base"] - sizes["base"]) <= 0.01 * sizes["base"]
    assert sizes["finetune_own"] == sizes["unet"]


def test_budget_unloads_the_least_recently_used_unpinned(stored, sizes):
    budget = 2 * sizes["base"] + sizes["unet"] // 2  # base + other fit; base + other + finetune's UNet does not
    m = manager(stored, budget=budget, pin_base=True)
    base = m.ensure("")
    m.ensure("finetune")
    m.ensure("other")  # needs a whole pipeline: the fine-tune (LRU, unpinned) goes
    assert m.loaded() == [stored["other"].tag, base.tag]
    assert m.used_bytes() <= budget
    m.ensure("finetune")  # the base is pinned: 'other' goes
    assert m.loaded() == [stored["finetune"].tag, base.tag]
    assert m.is_loaded("") and not m.is_loaded("other")
    assert m.ensure("").pipe is base.pipe  # pinned: never reloaded


def test_nothing_unpinned_to_unload_is_a_clear_error(stored, sizes):
    m = manager(stored, budget=sizes["base"] + sizes["unet"] + sizes["unet"] // 2, pin_base=True)
    m.ensure("")
    m.ensure("finetune")
    m.register(stored["finetune"], pinned=True)
    with pytest.raises(ModelBudgetExceeded, match=r"nothing more can be unloaded.*\(pinned\)"):
        m.ensure("other")
    assert m.loaded() == [stored["finetune"].tag, stored["base"].tag]
    with pytest.raises(ValueError, match="pinned"):
        m.unload("finetune")
    assert m.unload("other") is False  # not loaded: nothing to do


def test_unloading_the_sharer_keeps_what_others_use(stored):
    m = manager(stored)
    base = m.ensure("")
    finetune = m.ensure("finetune")
    vae = base.pipe.vae
    assert m.unload("")
    assert finetune.pipe.vae is vae and m.loaded() == [finetune.tag]
    assert m.own_bytes(finetune.tag) == full_bytes(finetune)
    again = m.ensure("")  # sharing works from a module whose first owner is gone
    assert again.pipe.vae is vae and again.pipe.unet is not finetune.pipe.unet


def test_unknown_checkpoint(stored):
    m = manager(stored)
    with pytest.raises(InvalidRequest, match="unknown checkpoint 'nope'.*finetune"):
        m.ensure("nope")


def test_engine_generates_with_the_named_checkpoint(engine, stored):
    tag = engine.add_checkpoint(stored["finetune"])
    assert tag == stored["finetune"].tag and not engine.manager.is_loaded("finetune")
    (default,), = engine.generate([Work(KEY, "a cat", "", [5])])
    (named_default,), = engine.generate([Work(BatchKey(**{**KEY.__dict__, "model": "sdxl-base"}), "a cat", "", [5])])
    finetune_key = BatchKey(**{**KEY.__dict__, "model": "finetune"})
    (finetuned,), = engine.generate([Work(finetune_key, "a cat", "", [5])])
    assert engine.manager.is_loaded("finetune") and engine.manager.last_swap_s > 0
    assert np.array_equal(np.asarray(default), np.asarray(named_default))
    assert np.abs(np.asarray(finetuned, dtype=np.int16) - np.asarray(default, dtype=np.int16)).mean() > 1
    (again,), = engine.generate([Work(KEY, "a cat", "", [5])])
    assert np.array_equal(np.asarray(default), np.asarray(again))
    with pytest.raises(ValueError, match="share a batch key"):
        engine.generate([Work(KEY, "a cat", "", [5]), Work(finetune_key, "a cat", "", [5])])
    with pytest.raises(InvalidRequest, match="unknown checkpoint"):
        engine.generate([Work(BatchKey(**{**KEY.__dict__, "model": "nope"}), "a cat", "", [5])])
    assert engine.models.base is engine.manager.get("").pipe and engine.manager.get("").pinned
