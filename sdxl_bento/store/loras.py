"""LoRA adapters in the Bento model store: imported once (a ``.safetensors`` file, a folder or a hub id), then
named by requests (``loras: [{name, weight}]``). ``gpu/models.py`` loads them into pipelines."""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .modelstore import file_sha256, hub_snapshot, safetensors_header

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_ROLE = "lora"
_LORA_KEY = re.compile(r"lora(_linear_layer)?[._](a|b|up|down)\b|lora_(unet|te\d?)_|\.alpha$", re.IGNORECASE)
_LORA_DOWN = re.compile(r"lora(_linear_layer)?[._](a|down)\b", re.IGNORECASE)


def inspect_lora(path: str | Path) -> dict[str, Any]:
    """What a LoRA file holds: tensor count, rank, components; ValueError when it is no LoRA."""
    path = Path(path)
    header = safetensors_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    lora_keys = [k for k in tensors if _LORA_KEY.search(k)]
    if not lora_keys:
        raise ValueError(f"{path}: no LoRA tensors in this safetensors file (no lora_A/lora_B, lora_down/lora_up "
                         "or lora.down/lora.up weights): not a LoRA")
    ranks = {min(v["shape"]) for k, v in tensors.items()
             if _LORA_DOWN.search(k) and len(v.get("shape", [])) >= 2}
    components = sorted({k.split(".")[0] if not k.startswith("lora_") else k.split("_")[1] for k in lora_keys})
    return {"tensors": len(lora_keys), "rank": max(ranks) if ranks else None, "components": components}


def import_lora(source: str, tag: str) -> str:
    """Save a LoRA (a ``.safetensors`` file, a folder holding ``pytorch_lora_weights.safetensors``, or a hub id
    whose repository holds one) into the Bento model store as ``tag``; returns the new tag (``name:version``)."""
    import bentoml

    path = Path(source).expanduser()
    if not path.exists():
        path = hub_snapshot(source, [LORA_WEIGHT_NAME])
    if path.is_dir():
        file = path / LORA_WEIGHT_NAME
        if not file.is_file():
            raise ValueError(f"{source}: no {LORA_WEIGHT_NAME} in this folder")
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{source}: a LoRA must be a .safetensors file")
        file = path
    else:
        raise ValueError(f"{source}: not a file or folder")
    info = inspect_lora(file)
    metadata = {"role": LORA_ROLE, "source": str(source), "sha256": file_sha256(file), "synthetic": False,
                "tensors": info["tensors"], "rank": info["rank"] or 0, "components": ",".join(info["components"])}
    labels = {"project": "sdxl-bento", "role": LORA_ROLE}
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        shutil.copyfile(file, Path(model.path) / LORA_WEIGHT_NAME)
    logger.info("saved LoRA %s from %s (%d tensors, rank %s)", model.tag, source, info["tensors"], info["rank"])
    return str(model.tag)


@dataclass(frozen=True)
class StoredLora:
    tag: str
    path: Path
    """The folder; the weights are ``path / LORA_WEIGHT_NAME``."""
    metadata: dict[str, Any]


def find_lora(name: str) -> StoredLora | None:
    """The stored LoRA ``name`` (``name`` or ``name:version``), or None when there is no LoRA by that name."""
    import bentoml

    try:
        model = bentoml.models.get(name)
    except (bentoml.exceptions.NotFound, bentoml.exceptions.BentoMLException, ValueError):
        return None
    metadata = dict(model.info.metadata)
    if metadata.get("role") != LORA_ROLE or not (Path(model.path) / LORA_WEIGHT_NAME).is_file():
        return None
    return StoredLora(str(model.tag), Path(model.path), metadata)


def list_loras() -> list[dict[str, Any]]:
    """Every LoRA in the store: tag, source, rank, components."""
    import bentoml

    rows = []
    for model in bentoml.models.list():
        metadata = dict(model.info.metadata)
        if metadata.get("role") == LORA_ROLE:
            rows.append({"tag": str(model.tag), "source": metadata.get("source"), "rank": metadata.get("rank"),
                         "components": metadata.get("components")})
    return rows
