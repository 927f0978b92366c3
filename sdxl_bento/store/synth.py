"""Synthetic SDXL pipelines: the real architecture with random weights.

No model hub is needed: ``full`` has SDXL 1.0's exact shapes (``sdxl_configs.json``, copied from
the published configs), so it costs exactly the real compute; ``tiny`` keeps every component type
and code path at a size that renders 64x64 on a CPU in well under a second. The CLIP tokenizer is
built in memory (byte-level BPE over the 256 byte symbols), so prompts tokenize for real. Images
from random weights are noise: use these for timing and testing, never to judge quality.
"""

from __future__ import annotations

import json
import math
from copy import deepcopy
from importlib import resources
from pathlib import Path
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


# -- synthetic NSFW checkers ------------------------------------------------------------------------
#
# Both read the mean colour through the real architecture: the patch embedding averages each
# channel (pixels normalised to -1..1) into features [c, -c, g, -g] (g a constant, zero-mean so that
# LayerNorm only rescales), everything else passes it through, and the head compares its direction
# with the flag colour's. The constant g makes near-grey images read as grey rather than as their
# faint tint. A flat flag-colour image reads cosine |f| / sqrt(|f|^2 + g^2) (0.96 for pure red);
# the decision boundary is cosine 0.8, so dark red (128, 0, 0), orange or pink do not count.

_HIDDEN, _IMAGE, _PATCH, _GREY_WEIGHT, _MIN_COSINE, _GAIN = 8, 32, 8, 0.5, 0.8, 40.0


def _flag_direction(flag_color: tuple[int, int, int]):
    import torch

    f = torch.tensor([c / 127.5 - 1.0 for c in flag_color])
    if f.norm() < 0.1:
        raise ValueError(f"flag_color {flag_color} is too close to mid-grey to tell apart")
    direction = torch.cat([f, -f, torch.zeros(_HIDDEN - 6)])
    return direction / direction.norm()


def _set_patch_embedding(conv, bias_holder=None) -> None:
    import torch

    with torch.no_grad():
        conv.weight.zero_()
        area = conv.kernel_size[0] * conv.kernel_size[1]
        for ch in range(3):
            conv.weight[ch, ch] = 1.0 / area
            conv.weight[ch + 3, ch] = -1.0 / area
        grey = torch.zeros(conv.out_channels)
        grey[6], grey[7] = _GREY_WEIGHT, -_GREY_WEIGHT
        (bias_holder if bias_holder is not None else conv.bias).copy_(grey)


def _zero_parameters(model) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)


def _processor_kwargs() -> dict[str, Any]:
    return {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def build_synthetic_classifier(path: str | Path, flag_color: tuple[int, int, int] = (255, 0, 0)) -> Path:
    """A tiny transformers image classifier (BEiT, mean pooling; labels normal/nsfw) whose "nsfw"
    probability is sigmoid(40 * (cosine(mean colour, flag_color) - 0.8)): images dominated by
    ``flag_color`` score near 1, others near 0. Saved with its image processor for
    ``ClassifierChecker(path)``."""
    import torch
    from transformers import BeitConfig, BeitForImageClassification, ViTImageProcessor

    config = BeitConfig(
        hidden_size=_HIDDEN, num_hidden_layers=1, num_attention_heads=1, intermediate_size=_HIDDEN,
        image_size=_IMAGE, patch_size=_PATCH, use_mean_pooling=True, use_absolute_position_embeddings=False,
        use_relative_position_bias=False, use_shared_relative_position_bias=False,
        id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1},
    )
    model = BeitForImageClassification(config).eval()
    _zero_parameters(model)  # every layer is the identity (layer scale 0); pooling = LayerNorm(mean patch)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    _set_patch_embedding(conv)
    with torch.no_grad():
        # LayerNorm's output has norm sqrt(hidden): the nsfw logit is GAIN * (cosine - MIN_COSINE).
        model.classifier.weight[1] = _GAIN / math.sqrt(_HIDDEN) * _flag_direction(flag_color)
        model.classifier.bias[1] = -_GAIN * _MIN_COSINE
    path = Path(path)
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": _IMAGE, "width": _IMAGE}, **_processor_kwargs()).save_pretrained(path)
    return path


def build_synthetic_sd_checker(path: str | Path, flag_color: tuple[int, int, int] = (255, 0, 0)) -> Path:
    """A tiny diffusers ``StableDiffusionSafetyChecker`` (+ ``CLIPImageProcessor``) with one concept,
    the flag colour, at threshold 0.8; the other 16 concepts and the 3 special-care ones never fire.
    The CLS token gathers the patches through one attention layer (zero queries and keys: uniform
    attention; identity values)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    vision = {"hidden_size": _HIDDEN, "intermediate_size": _HIDDEN, "num_hidden_layers": 1, "num_attention_heads": 1,
              "image_size": _IMAGE, "patch_size": _PATCH, "projection_dim": _HIDDEN}
    text = {"hidden_size": _HIDDEN, "intermediate_size": _HIDDEN, "num_hidden_layers": 1, "num_attention_heads": 1,
            "vocab_size": 64, "max_position_embeddings": 8, "projection_dim": _HIDDEN,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    model = StableDiffusionSafetyChecker(CLIPConfig(text_config=text, vision_config=vision, projection_dim=_HIDDEN))
    model.eval()
    _zero_parameters(model)
    emb = next(m for m in model.modules() if hasattr(m, "patch_embedding") and hasattr(m, "position_embedding"))
    positions = torch.zeros(_HIDDEN)
    _set_patch_embedding(emb.patch_embedding, positions)  # CLIP's patch conv has no bias: positions carry g
    eye = torch.eye(_HIDDEN)
    with torch.no_grad():
        emb.position_embedding.weight[1:] = positions  # position 0 is the CLS token: stays 0
        for module in model.modules():
            if hasattr(module, "v_proj") and hasattr(module, "out_proj"):
                module.v_proj.weight.copy_(eye)
                module.out_proj.weight.copy_(eye)
        model.visual_projection.weight.copy_(eye)
        model.concept_embeds[0] = _flag_direction(flag_color)
        model.concept_embeds_weights.fill_(1.0)  # zero embeddings: cosine 0, never above 1
        model.concept_embeds_weights[0] = _MIN_COSINE
        model.special_care_embeds_weights.fill_(1.0)
    path = Path(path)
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": _IMAGE}, crop_size={"height": _IMAGE, "width": _IMAGE},
                       **_processor_kwargs()).save_pretrained(path)
    return path
