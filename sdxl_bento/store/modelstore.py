"""The Bento model store: the only place the service takes weights from.

``import_pipeline`` and ``save_synthetic`` put diffusers pipelines into the store (the weights
in safetensors, the provenance in metadata); the service resolves tags at startup and never
downloads anything while serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import bentoml

from ..errors import ModelMissing

logger = logging.getLogger(__name__)

Role = Literal["base", "refiner", "safety", "preview"]
ROLES: tuple[Role, ...] = ("base", "refiner", "safety", "preview")
DEFAULT_TAGS: dict[Role, str] = {"base": "sdxl-base", "refiner": "sdxl-refiner", "safety": "sdxl-safety",
                                 "preview": "sdxl-taesd"}
DEFAULT_SOURCES: dict[Role, str] = {
    "base": "stabilityai/stable-diffusion-xl-base-1.0",
    "refiner": "stabilityai/stable-diffusion-xl-refiner-1.0",
    "safety": "CompVis/stable-diffusion-safety-checker",
    "preview": "madebyollin/taesdxl",
}
CHECKER_KINDS = ("sd-safety-checker", "classifier")
DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class StoredPipeline:
    tag: str
    path: Path
    metadata: dict[str, Any]

    @property
    def synthetic(self) -> bool:
        return bool(self.metadata.get("synthetic"))


def fix_command(role: Role, tag: str) -> str:
    """The command that puts a missing model into the store."""
    name = tag.split(":")[0]
    name_arg = "" if name == DEFAULT_TAGS[role] else f" --tag {name}"
    return (
        f"sdxl-bento models import {DEFAULT_SOURCES[role]} --role {role}{name_arg}"
        f"   (offline, for trying it out: sdxl-bento models synth --preset tiny"
        f"{' --refiner' if role == 'refiner' else ''})"
    )


def from_model(model: Any) -> StoredPipeline:
    """A ``bentoml.models.Model`` (as a service's BentoModel attribute resolves) as a StoredPipeline."""
    return StoredPipeline(str(model.tag), Path(model.path), dict(model.info.metadata))


def is_hub_id(source: str) -> bool:
    """``owner/name``: a Hugging Face repository id rather than a path."""
    return not source.startswith((".", "/", "~")) and source.count("/") == 1


def hub_snapshot(source: str, patterns: list[str]) -> Path:
    """Download the files of a hub repository matching ``patterns``; clear errors offline or for a bad id."""
    if not is_hub_id(source):
        raise ValueError(f"{source}: no such file or folder, and not a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=patterns))
    except OSError as exc:  # huggingface_hub raises OSError subclasses when offline or not found
        raise ConnectionError(f"could not fetch {source} from the Hugging Face Hub ({exc}); import a local "
                              "file or folder instead") from exc


def find(tag: str) -> StoredPipeline | None:
    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        return None
    return from_model(model)


def resolve(tag: str, role: Role) -> StoredPipeline:
    """The stored pipeline for ``tag``, or a ModelMissing error naming the command that fixes it."""
    stored = find(tag)
    if stored is None:
        raise ModelMissing(
            f"SDXL {role} model {tag!r} is not in the Bento model store "
            f"(`bentoml models list` shows what is there). Put it there with:\n  "
            + fix_command(role, tag)
        )
    if stored.metadata.get("role") not in (None, role):
        raise ModelMissing(f"model {stored.tag} was imported as role {stored.metadata.get('role')!r}, not {role!r}")
    return stored


def save_pipeline(pipe: Any, *, name: str, role: Role, source: str, dtype: str, synthetic: bool,
                  extra: dict[str, Any] | None = None) -> str:
    """Save a diffusers pipeline into the store; returns the new tag (``name:version``)."""
    import diffusers

    metadata = {
        "role": role, "source": source, "dtype": dtype, "synthetic": synthetic,
        "diffusers_version": diffusers.__version__, "pipeline_class": type(pipe).__name__,
        **(extra or {}),
    }
    labels = {"project": "sdxl-bento", "role": role, "synthetic": str(synthetic).lower()}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        pipe.save_pretrained(model.path, safe_serialization=True)
        model.info.metadata["weights_sha256"] = folder_weights_sha256(Path(model.path))  # C2PA manifests name it
    logger.info("saved %s %s from %s", role, model.tag, source)
    return str(model.tag)


def _pipeline_class(role: Role):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if role == "base" else StableDiffusionXLImg2ImgPipeline


def load_source(source: str, role: Role, dtype: str = "float16", config: str | None = None) -> Any:
    """Load a pipeline from a hub id, a local diffusers folder or a single ``.safetensors`` file."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    cls = _pipeline_class(role)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in (".safetensors",):
            raise ValueError(f"{source}: a single-file checkpoint must be a .safetensors file")
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if config:
            kwargs.update(config=config, local_files_only=True)
        return cls.from_single_file(str(path), **kwargs)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{source}: not a diffusers pipeline folder (no model_index.json)")
        return cls.from_pretrained(str(path), dtype=torch_dtype, use_safetensors=True)
    if not is_hub_id(source):
        raise ValueError(f"{source}: no such file or folder, and not a Hugging Face repo id (owner/name)")
    variant = "fp16" if dtype == "float16" else None
    try:
        return cls.from_pretrained(source, dtype=torch_dtype, variant=variant, use_safetensors=True)
    except OSError as exc:  # huggingface_hub raises OSError subclasses when offline or not found
        raise ConnectionError(
            f"could not fetch {source} from the Hugging Face Hub ({exc.__class__.__name__}: {exc}).\n"
            "Offline, import a local diffusers folder or a .safetensors file instead, or try the service "
            "without weights: sdxl-bento models synth --preset tiny --refiner"
        ) from exc


def import_pipeline(source: str, role: Role, tag: str | None = None, dtype: str = "float16",
                    config: str | None = None) -> str:
    pipe = load_source(source, role, dtype=dtype, config=config)
    return save_pipeline(pipe, name=tag or DEFAULT_TAGS[role], role=role, source=source, dtype=dtype,
                         synthetic=False)


def save_synthetic(preset: str, refiner: bool = False, base_tag: str | None = None,
                   refiner_tag: str | None = None, seed: int = 0) -> list[str]:
    """Build SDXL-architecture pipelines with random weights and save them (``synthetic: true``)."""
    from .synth import build_pipelines

    base, refiner_pipe = build_pipelines(preset, refiner=refiner, seed=seed)  # type: ignore[arg-type]
    extra = {"preset": preset, "seed": seed}
    tags = [save_pipeline(base, name=base_tag or DEFAULT_TAGS["base"], role="base",
                          source=f"synthetic:{preset}", dtype="float32", synthetic=True, extra=extra)]
    if refiner_pipe is not None:
        tags.append(save_pipeline(refiner_pipe, name=refiner_tag or DEFAULT_TAGS["refiner"], role="refiner",
                                  source=f"synthetic:{preset}", dtype="float32", synthetic=True, extra=extra))
    return tags


def list_models() -> list[StoredPipeline]:
    """Every SDXL pipeline in the store (models saved by this project)."""
    return [from_model(m) for m in bentoml.models.list() if m.info.metadata.get("role") in ROLES]


def import_checker(source: str, kind: str, tag: str | None = None, synthetic: bool = False) -> str:
    """Save an NSFW checker (a folder, or a hub id) into the store; ``kind`` says how to load it."""
    import shutil

    if kind not in CHECKER_KINDS:
        raise ValueError(f"checker kind must be one of {', '.join(CHECKER_KINDS)}, not {kind!r}")
    path = Path(source).expanduser()
    if not path.is_dir():
        path = hub_snapshot(source, ["*.json", "*.safetensors", "*.txt"])
    if not (path / "config.json").is_file() and not (path / "safety_checker" / "config.json").is_file():
        raise ValueError(f"{source}: no config.json: not a transformers/diffusers checker folder")
    metadata = {"role": "safety", "kind": kind, "source": source, "synthetic": synthetic, "dtype": "float32"}
    labels = {"project": "sdxl-bento", "role": "safety", "synthetic": str(synthetic).lower()}
    with bentoml.models.create(tag or DEFAULT_TAGS["safety"], labels=labels, metadata=metadata) as model:
        shutil.copytree(path, model.path, dirs_exist_ok=True)
    return str(model.tag)


# -- TAESD-XL, for previews -----------------------------------------------------------------------------
def import_preview(source: str, tag: str | None = None, synthetic: bool = False) -> str:
    """Save TAESD-XL (a diffusers ``AutoencoderTiny`` folder, or a hub id such as ``madebyollin/taesdxl``) as
    the preview decoder (role ``preview``)."""
    from diffusers import AutoencoderTiny

    path = Path(source).expanduser()
    if not path.is_dir():
        path = hub_snapshot(source, ["config.json", "*.safetensors"])
    if not (path / "config.json").is_file():
        raise ValueError(f"{source}: no config.json: not a diffusers AutoencoderTiny folder")
    vae = AutoencoderTiny.from_pretrained(str(path))
    return _save_preview(vae, tag or DEFAULT_TAGS["preview"], source, synthetic)


def save_synthetic_preview(tag: str | None = None, seed: int = 0) -> str:
    """A tiny TAESD with random weights (same code path as TAESD-XL; its previews are noise)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)
    return _save_preview(vae, tag or DEFAULT_TAGS["preview"], "synthetic:tiny", True)


def _save_preview(vae: Any, name: str, source: str, synthetic: bool) -> str:
    metadata = {"role": "preview", "kind": "taesd", "source": source, "synthetic": synthetic, "dtype": "float32"}
    labels = {"project": "sdxl-bento", "role": "preview", "synthetic": str(synthetic).lower()}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        vae.save_pretrained(model.path, safe_serialization=True)
    return str(model.tag)


# -- weight files -----------------------------------------------------------------------------------
def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), without reading the tensors."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 1024 * 1024:
            raise ValueError(f"{path}: not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise ValueError(f"{path}: not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file")
    return header


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")


def weights_listing(root: Path) -> str:
    """``sha256sum`` lines (``<hex>  <path>``) of every weight file under ``root``, by path (byte order)."""
    files = sorted((p for p in Path(root).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix().encode())
    return "".join(f"{file_sha256(p)}  {p.relative_to(root).as_posix()}\n" for p in files)


def folder_weights_sha256(root: Path) -> str:
    """The sha256 of a model's weights: of its ``weights_listing``, so that anyone can recompute it with
    ``cd MODEL && find . -type f -name '*.safetensors' -printf '%P\\n' | LC_ALL=C sort | xargs sha256sum | sha256sum``
    (README: Provenance)."""
    return hashlib.sha256(weights_listing(root).encode()).hexdigest()


def weights_sha256(stored: StoredPipeline, cache_dir: Path | None = None) -> str:
    """The weights' sha256 as recorded at import; for a model imported before it was recorded, computed once and
    kept in ``cache_dir/weights-sha256.json`` by tag (a stored version's files never change)."""
    recorded = stored.metadata.get("weights_sha256")
    if isinstance(recorded, str) and len(recorded) == 64:
        return recorded
    cache = Path(cache_dir) / "weights-sha256.json" if cache_dir is not None else None
    known: dict[str, str] = {}
    if cache is not None and cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except ValueError:
            known = {}
    if stored.tag not in known:
        logger.info("computing the sha256 of %s's weights (once; recorded at import for models imported from now on)",
                    stored.tag)
        known[stored.tag] = folder_weights_sha256(stored.path)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # workers may compute it side by side
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
            tmp.replace(cache)
    return known[stored.tag]
