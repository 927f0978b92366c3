"""Single-file SGM checkpoints: what ``save_single_file`` writes, diffusers' own loader reads back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdxl_bento.store.checkpoint import (
    CLIP_G_PREFIX,
    SGM_PREFIXES,
    clip_g_to_sgm,
    clip_l_to_sgm,
    save_single_file,
    unet_to_sgm,
    vae_to_sgm,
)
from sdxl_bento.store.synth import build_pipelines

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny base (seed 0) as one file, and a config folder holding DIFFERENT weights (seed 1)."""
    root = tmp_path_factory.mktemp("checkpoint")
    base, _ = build_pipelines("tiny", seed=0)
    path = save_single_file(base, root / "tiny.safetensors")
    other, _ = build_pipelines("tiny", seed=1)
    other.save_pretrained(root / "config")
    assert not torch.equal(other.unet.conv_in.weight, base.unet.conv_in.weight)
    return base, path, root / "config"


@pytest.fixture(scope="module")
def loaded(saved):
    from diffusers import StableDiffusionXLPipeline

    _, path, config = saved
    return StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), local_files_only=True)


def test_keys_are_sgm_layout(saved):
    base, path, _ = saved
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("conditioner.embedders.1.model.text_projection").dtype == torch.float32
    assert all(k.startswith(SGM_PREFIXES) for k in keys)
    assert {p for p in SGM_PREFIXES if any(k.startswith(p) for k in keys)} == set(SGM_PREFIXES)
    assert not any(k.startswith(("unet.", "vae.", "text_encoder")) for k in keys)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight", "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding", "conditioner.embedders.1.model.ln_final.weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
    ):
        assert key in keys, key
    total = sum(len(getattr(base, name).state_dict()) for name in COMPONENTS)
    n_layers = base.text_encoder_2.config.num_hidden_layers
    assert len(keys) == total - 4 * n_layers  # q/k/v weights and biases fuse into 2 in_proj tensors a layer


def test_tensors_keep_the_pipeline_dtype(tmp_path):
    half, _ = build_pipelines("tiny", dtype=torch.float16)
    state = load_file(save_single_file(half, tmp_path / "half.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.float16}


def test_single_file_loads_back_bit_exact(saved, loaded):
    base, _, _ = saved
    for name in COMPONENTS:
        want, got = getattr(base, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(got) == set(want), name
        for key, value in want.items():
            assert got[key].device.type == "cpu" and torch.equal(got[key], value), f"{name}.{key}"


def test_single_file_generates_the_same_image(saved, loaded):
    base, _, _ = saved
    images = []
    for pipe in (base, loaded):
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red cube", height=64, width=64, num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(7))
        images.append(out.images)
    assert images[0].shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(images[0], images[1])


def test_full_preset_maps_to_what_the_loader_expects():
    """SDXL 1.0's real shapes, on the meta device: key names, routing and the loader's conversion."""
    from accelerate import init_empty_weights
    from diffusers.loaders import single_file_utils as sfu

    with init_empty_weights():
        base, _ = build_pipelines("full")
    sgm = {**unet_to_sgm(base.unet), **vae_to_sgm(base.vae),
           **clip_l_to_sgm(base.text_encoder), **clip_g_to_sgm(base.text_encoder_2)}
    assert sfu.infer_diffusers_model_type(sgm) == "xl_base"
    assert sgm[sfu.CHECKPOINT_KEY_NAMES["clip_sdxl"]].shape[-1] == 768
    assert sgm[sfu.CHECKPOINT_KEY_NAMES["open_clip_sdxl"]].shape[-1] == 1280
    assert sgm["model.diffusion_model.output_blocks.2.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sgm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sgm["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)

    converted = {
        "unet": sfu.convert_ldm_unet_checkpoint(sgm, dict(base.unet.config)),
        "vae": sfu.convert_ldm_vae_checkpoint(sgm, dict(base.vae.config)),
        # transformers 5 flattened CLIPTextModel; the loader strips "text_model." for it the same way
        "text_encoder": {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(sgm).items()},
        "text_encoder_2": sfu.convert_open_clip_checkpoint(base.text_encoder_2, sgm, prefix=CLIP_G_PREFIX),
    }
    for name, state in converted.items():
        want = getattr(base, name).state_dict()
        assert set(state) == set(want), name
        assert all(state[k].shape == want[k].shape for k in want), name
