"""Synthetic SDXL pipelines: the real architecture with random weights.

No model hub is needed: ``full`` has SDXL 1.0's exact shapes (``sdxl_configs.json``, copied from
the published configs), so it costs exactly the real compute; ``tiny`` keeps every component type
and code path at a size that renders 64x64 on a CPU in well under a second. The CLIP tokenizer is
built in memory (byte-level BPE over the 256 byte symbols), so prompts tokenize for real. Images
from random weights are noise: use these for timing and testing, never to judge quality.
"""

from __future__ import annotations

import json
from copy import deepcopy
from importlib import resources
from typing import Any, Literal

import torch

Preset = Literal["tiny", "full"]

# SDXL's time embedding takes 6 ids for the base (original size, crop, target size) and 5 for
# the refiner (original size, crop, aesthetic score).
_BASE_TIME_IDS, _REFINER_TIME_IDS = 6, 5


def sdxl_configs() -> dict[str, Any]:
    """SDXL 1.0's published architecture numbers."""
    text = resources.files("sdxl_bento").joinpath("sdxl_configs.json").read_text()
    return json.loads(text)


def _tiny_configs() -> dict[str, Any]:
    text_encoder = {
        "hidden_act": "gelu", "hidden_size": 32, "intermediate_size": 37, "max_position_embeddings": 77,
        "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": 32, "vocab_size": 1000,
    }
    # The two encoders differ in width, as in SDXL (768 vs 1280): diffusers' single-file loader tells
    # them apart by width, so equal widths would load text_encoder_2 from CLIP-L's weights.
    text_encoder_2 = {**text_encoder, "hidden_size": 48, "intermediate_size": 53}
    time_dim = 8
    unet = {
        "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
        "attention_head_dim": [2, 4], "block_out_channels": [32, 64], "in_channels": 4, "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
        "norm_num_groups": 8, "sample_size": 32, "transformer_layers_per_block": [1, 1],
        "use_linear_projection": True,
        "cross_attention_dim": text_encoder["hidden_size"] + text_encoder_2["hidden_size"],
        "projection_class_embeddings_input_dim": _BASE_TIME_IDS * time_dim + 32,
    }
    refiner = {**unet, "cross_attention_dim": text_encoder_2["hidden_size"],
               "projection_class_embeddings_input_dim": _REFINER_TIME_IDS * time_dim + 32}
    vae = {
        "act_fn": "silu", "block_out_channels": [8, 16, 16, 16], "in_channels": 3, "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 256,
        "scaling_factor": 0.13025, "force_upcast": True,
    }
    full = sdxl_configs()
    return {
        "base_unet": unet, "refiner_unet": refiner, "vae": vae,
        "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
        "scheduler": full["scheduler"], "refiner_pipeline": full["refiner_pipeline"],
    }


def configs(preset: Preset) -> dict[str, Any]:
    if preset == "full":
        return sdxl_configs()
    if preset == "tiny":
        return _tiny_configs()
    raise ValueError(f"unknown preset {preset!r}: use 'tiny' or 'full'")


def build_tokenizer(max_length: int = 77):
    """A CLIP byte-level BPE tokenizer built in memory: every byte is a symbol, no merges learned."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for symbol in symbols:
            vocab[symbol + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _clean(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _text_encoder(config: dict[str, Any], with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    text_config = CLIPTextConfig(**_clean(config), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return cls(text_config)


def build_pipelines(preset: Preset, refiner: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build (base, refiner or None) with random weights; the refiner shares text_encoder_2 and VAE."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    cfg = deepcopy(configs(preset))
    torch.manual_seed(seed)
    te1 = _text_encoder(cfg["text_encoder"], with_projection=False)
    te2 = _text_encoder(cfg["text_encoder_2"], with_projection=True)
    unet = UNet2DConditionModel(**_clean(cfg["base_unet"]))
    vae = AutoencoderKL(**_clean(cfg["vae"]))
    tokenizer = build_tokenizer(cfg["text_encoder"]["max_position_embeddings"])
    scheduler = EulerDiscreteScheduler(**_clean(cfg["scheduler"]))
    base = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(cfg["text_encoder_2"]["max_position_embeddings"]),
        unet=unet, scheduler=scheduler, add_watermarker=False,  # the service watermarks (generation.py)
    ).to(dtype=dtype)
    if not refiner:
        return base, None
    refiner_unet = UNet2DConditionModel(**_clean(cfg["refiner_unet"])).to(dtype=dtype)
    ref_cfg = cfg["refiner_pipeline"]
    refiner_pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=refiner_unet, scheduler=EulerDiscreteScheduler(**_clean(cfg["scheduler"])),
        requires_aesthetics_score=ref_cfg["requires_aesthetics_score"],
        force_zeros_for_empty_prompt=ref_cfg["force_zeros_for_empty_prompt"], add_watermarker=False,
    )
    return base, refiner_pipe
