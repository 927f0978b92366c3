"""Write an SDXL base pipeline as one ``.safetensors`` file in Stability's original ("SGM") layout.

Community SDXL checkpoints ship as a single file with the keys of Stability's ``sgm`` code, and
``models import`` accepts such files (diffusers reads them with ``from_single_file``). No such file
can be downloaded here, so this module makes one from any diffusers pipeline, the synthetic ones
included: tests and users can build a single-file checkpoint offline. The mapping is the exact
inverse of diffusers' single-file loader (``diffusers/loaders/single_file_utils.py``):

* ``model.diffusion_model.*``: the UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``);
* ``first_stage_model.*``: the VAE (``encoder.down.N.block.M``, ``mid.attn_1`` as 1x1 convs, ...);
* ``conditioner.embedders.0.transformer.text_model.*``: CLIP-L, in the Hugging Face layout;
* ``conditioner.embedders.1.model.*``: OpenCLIP bigG, in the open_clip layout (fused q/k/v
  ``in_proj``, ``ln_final``, ``positional_embedding``, a transposed ``text_projection``).

Layer counts are read from the modules, so the same code writes the tiny and the full preset.
Tensors are stored contiguous, on the CPU, in the pipeline's own dtypes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
SGM_PREFIXES = (UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, CLIP_G_PREFIX)

StateDict = dict[str, torch.Tensor]

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "norm2.": "out_layers.0.", "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.", "conv_shortcut.": "skip_connection.",
}
_VAE_TOP = {
    "encoder.conv_norm_out.": "encoder.norm_out.",
    "decoder.conv_norm_out.": "decoder.norm_out.",
}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
_CLIP_G_LAYER = {
    "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def _rename(suffix: str, table: dict[str, str], where: str) -> str:
    for old, new in table.items():
        if suffix.startswith(old):
            return new + suffix[len(old):]
    raise KeyError(f"no SGM name for {where}{suffix}")


def _split(key: str, prefix: str) -> tuple[int, int, str]:
    """``down_blocks.1.resnets.0.conv1.weight`` with prefix ``down_blocks.`` -> (1, 0, ``conv1.weight``)."""
    block, _kind, index, rest = key[len(prefix):].split(".", 3)
    return int(block), int(index), rest


def unet_to_sgm(unet: UNet2DConditionModel) -> StateDict:
    """The UNet's weights under ``model.diffusion_model.`` in the SGM block numbering."""
    per_block = unet.config.layers_per_block
    if not isinstance(per_block, int):
        raise ValueError("the SGM layout needs one layers_per_block for every UNet block")
    step = per_block + 1  # each down block also holds its downsampler; each up block has one layer more
    has_attention = {i: hasattr(b, "attentions") for i, b in enumerate(unet.up_blocks)}
    out: StateDict = {}
    for key, value in unet.state_dict().items():
        if key.startswith(tuple(_UNET_TOP)):
            new = _rename(key, _UNET_TOP, "")
        elif key.startswith("down_blocks."):
            block, index, rest = _split(key, "down_blocks.")
            if ".downsamplers." in key:
                new = f"input_blocks.{(block + 1) * step}.0.op.{rest.removeprefix('conv.')}"
            elif ".resnets." in key:
                new = f"input_blocks.{block * step + index + 1}.0.{_rename(rest, _UNET_RESNET, key)}"
            else:
                new = f"input_blocks.{block * step + index + 1}.1.{rest}"
        elif key.startswith("mid_block."):
            _, kind, index, rest = key.split(".", 3)
            if kind == "resnets":
                new = f"middle_block.{2 * int(index)}.{_rename(rest, _UNET_RESNET, key)}"
            else:
                new = f"middle_block.1.{rest}"
        elif key.startswith("up_blocks."):
            block, index, rest = _split(key, "up_blocks.")
            if ".upsamplers." in key:
                slot = 2 if has_attention[block] else 1
                new = f"output_blocks.{block * step + per_block}.{slot}.{rest}"
            elif ".resnets." in key:
                new = f"output_blocks.{block * step + index}.0.{_rename(rest, _UNET_RESNET, key)}"
            else:
                new = f"output_blocks.{block * step + index}.1.{rest}"
        else:
            raise KeyError(f"no SGM name for unet {key}")
        out[UNET_PREFIX + new] = value
    return out


def vae_to_sgm(vae: AutoencoderKL) -> StateDict:
    """The VAE's weights under ``first_stage_model.``; mid-block attention as 1x1 convolutions."""
    n_up = len(vae.decoder.up_blocks)
    out: StateDict = {}
    for key, value in vae.state_dict().items():
        if key.startswith(tuple(_VAE_TOP)):
            new = _rename(key, _VAE_TOP, "")
        elif key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")):
            coder, _, block_s, _, index, rest = key.split(".", 5)
            block = int(block_s)
            name, sampler = ("down", "downsample") if coder == "encoder" else ("up", "upsample")
            sgm_block = block if coder == "encoder" else n_up - 1 - block  # SGM counts up blocks from the bottom
            if "samplers." in key:
                new = f"{coder}.{name}.{sgm_block}.{sampler}.{rest}"
            else:
                new = f"{coder}.{name}.{sgm_block}.block.{index}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}"
        elif ".mid_block.resnets." in key:
            coder, _, _, index, rest = key.split(".", 4)
            new = f"{coder}.mid.block_{int(index) + 1}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}"
        elif ".mid_block.attentions.0." in key:
            coder, rest = key.split(".mid_block.attentions.0.")
            new = f"{coder}.mid.attn_1.{_rename(rest, _VAE_ATTENTION, key)}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        else:
            new = key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
        out[VAE_PREFIX + new] = value
    return out


def _text_model_keys(model: torch.nn.Module) -> StateDict:
    """The HF CLIP state dict with one ``text_model.`` prefix, whether the model is flattened or not."""
    return {
        (k if k.startswith("text_projection.") else "text_model." + k.removeprefix("text_model.")): v
        for k, v in model.state_dict().items()
    }


def clip_l_to_sgm(text_encoder: CLIPTextModel) -> StateDict:
    """CLIP-L under ``conditioner.embedders.0.transformer.``: the Hugging Face layout, as SGM stores it."""
    return {CLIP_L_PREFIX + k: v for k, v in _text_model_keys(text_encoder).items()}


def clip_g_to_sgm(text_encoder_2: CLIPTextModelWithProjection) -> StateDict:
    """OpenCLIP bigG under ``conditioner.embedders.1.model.`` in the open_clip layout."""
    state = _text_model_keys(text_encoder_2)
    out: StateDict = {
        "token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T,
    }
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    for layer in sorted(layers):
        src, dst = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
        for key in [k for k in state if k.startswith(src)]:
            out[dst + _rename(key[len(src):], _CLIP_G_LAYER, key)] = state.pop(key)
    if state:
        raise KeyError(f"no SGM name for text_encoder_2 {sorted(state)}")
    return {CLIP_G_PREFIX + k: v for k, v in out.items()}


def to_sgm_state_dict(pipe: StableDiffusionXLPipeline) -> StateDict:
    """All four weighted components of an SDXL base pipeline, SGM keys, contiguous CPU tensors."""
    if pipe.text_encoder is None or pipe.text_encoder_2 is None:
        raise ValueError("an SDXL base pipeline (both text encoders) is needed")
    parts = (unet_to_sgm(pipe.unet), vae_to_sgm(pipe.vae),
             clip_l_to_sgm(pipe.text_encoder), clip_g_to_sgm(pipe.text_encoder_2))
    return {k: v.detach().to("cpu").contiguous() for part in parts for k, v in part.items()}


def save_single_file(pipe: StableDiffusionXLPipeline, path: str | Path) -> Path:
    """Write ``pipe`` to ``path`` as one SGM-layout safetensors file; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_sgm_state_dict(pipe), str(path), metadata={"format": "pt"})
    return path
