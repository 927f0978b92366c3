"""Several SDXL checkpoints in one process, and LoRA adapters per request.

``ModelManager`` holds base pipelines loaded lazily from the Bento model store. Fine-tunes of SDXL
usually keep SDXL's VAE and text encoders byte for byte, so a component whose stored weights are
identical to one already loaded is reused (one module, several pipelines) instead of loaded again.
Memory is the GPU's: under a budget in bytes, loading a checkpoint first unloads the least recently
used unpinned ones; what is pinned stays.

LoRAs live in the store too (``store/loras.py``). The engine asks the manager for exactly one adapter
set per batch: each LoRA is loaded once per pipeline (diffusers' PEFT integration), then every batch
sets which adapters are active with which weights, or disables them all, so nothing leaks from one
request into the next.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import InvalidRequest, Unavailable
from ..store.loras import LORA_WEIGHT_NAME, StoredLora, find_lora
from ..store.modelstore import StoredPipeline, file_sha256, safetensors_header
from .accel import Acceleration, prepare_unet

logger = logging.getLogger(__name__)

SHAREABLE = ("vae", "text_encoder", "text_encoder_2")
"""Components reused across checkpoints when their stored weights are identical (never the UNet: that is
what a fine-tune changes, and what LoRAs are loaded into)."""
MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_OTHER_BYTES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ModelBudgetExceeded(Unavailable):
    """A checkpoint does not fit in the model memory budget even after unloading everything unpinned."""


# -- loaded pipelines ----------------------------------------------------------------------------------------
def module_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers."""
    if not isinstance(module, torch.nn.Module):
        return 0
    return (sum(p.numel() * p.element_size() for p in module.parameters())
            + sum(b.numel() * b.element_size() for b in module.buffers()))


@dataclass
class LoadedPipeline:
    """One checkpoint in memory: its txt2img pipeline and, made on demand from the same modules, img2img and
    inpainting pipelines (no copies)."""

    tag: str
    stored: StoredPipeline
    pipe: Any
    pinned: bool
    serial: int
    """Distinguishes this load's LoRA adapter names from another pipeline's in a shared text encoder."""
    load_seconds: float
    scheduler_config: Any
    shared: dict[str, str] = field(default_factory=dict)
    """Component -> tag of the checkpoint it is shared with (reused, not loaded)."""
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA tag -> adapter name in this pipeline, in least recently used order."""
    last_used: int = 0
    _img2img: Any = None
    _inpaint: Any = None

    def _derived(self, cls: Any) -> Any:
        base = self.pipe
        pipe = cls(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                   tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                   scheduler=base.scheduler, requires_aesthetics_score=False,
                   force_zeros_for_empty_prompt=base.config.force_zeros_for_empty_prompt, add_watermarker=False)
        pipe.watermark = getattr(base, "watermark", None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def img2img(self) -> Any:
        """``StableDiffusionXLImg2ImgPipeline`` on this checkpoint's modules (LoRAs set on ``pipe`` apply)."""
        if self._img2img is None:
            from diffusers import StableDiffusionXLImg2ImgPipeline

            self._img2img = self._derived(StableDiffusionXLImg2ImgPipeline)
        return self._img2img

    def inpaint(self) -> Any:
        """``StableDiffusionXLInpaintPipeline`` on this checkpoint's modules (the base UNet: latents blended)."""
        if self._inpaint is None:
            from diffusers import StableDiffusionXLInpaintPipeline

            self._inpaint = self._derived(StableDiffusionXLInpaintPipeline)
        return self._inpaint

    def modules(self) -> dict[str, Any]:
        modules = {name: getattr(self.pipe, name, None) for name in MODULES}
        return {name: module for name, module in modules.items() if module is not None}


@dataclass
class _Component:
    """A loaded shareable module and what identifies its stored weights."""

    name: str
    folder: Path
    sizes: tuple[tuple[str, int], ...]
    module: "weakref.ReferenceType[Any]"
    tag: str


def _component_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _config_of(folder: Path) -> dict[str, Any]:
    config = folder / "config.json"
    if not config.is_file():
        return {}
    data = json.loads(config.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_") and k != "transformers_version"}


class ModelManager:
    """Base pipelines by model store tag: loaded on demand, components shared, unloaded by LRU under a budget."""

    def __init__(self, device: str, dtype: torch.dtype, *, budget_bytes: int | None = None,
                 max_loras_per_pipeline: int = 16,
                 on_swap: Callable[[str, float], None] | None = None,
                 acceleration: Acceleration | None = None) -> None:
        self.device = device
        self.dtype = dtype
        self.acceleration = acceleration or Acceleration()
        """Compilation and CUDA graphs, applied to every UNet loaded."""
        self.budget_bytes = budget_bytes
        """GPU (or host) bytes all loaded weights may take; None: no limit."""
        self.max_loras_per_pipeline = max_loras_per_pipeline
        """LoRAs kept loaded per pipeline; beyond it the least recently used one (not in use) is deleted."""
        self.on_swap = on_swap
        """Called with (tag, seconds) after each load, for metrics."""
        self.default = ""
        self.last_swap_s: float | None = None
        """Seconds the last load took, unloading included."""
        self._registered: dict[str, tuple[StoredPipeline, bool]] = {}
        self._loaded: dict[str, LoadedPipeline] = {}
        self._components: list[_Component] = []
        self._extra: dict[str, Any] = {}
        self._loras: dict[str, StoredLora] = {}
        self._lora_used = False
        self._fingerprints: dict[tuple[str, int, int], str] = {}
        self._clock = itertools.count(1)
        self._serials = itertools.count(1)
        self._lock = threading.RLock()
        """Guards the tables (short holds, so status reads never wait for a load)."""
        self._load_lock = threading.Lock()
        """One load at a time."""

    # -- registry -----------------------------------------------------------------------------------------------
    def register(self, stored: StoredPipeline, *, pinned: bool = False, default: bool = False) -> str:
        """Make a stored base pipeline available (not loaded); the first registered is the default."""
        with self._lock:
            if stored.tag in self._registered:
                pinned = pinned or self._registered[stored.tag][1]
            self._registered[stored.tag] = (stored, pinned)
            if stored.tag in self._loaded:
                self._loaded[stored.tag].pinned = pinned
            if default or not self.default:
                self.default = stored.tag
        return stored.tag

    def add_shared(self, name: str, module_holder: Any) -> None:
        """Keep another pipeline's modules (the refiner) in the memory accounting; they are never unloaded."""
        with self._lock:
            self._extra[name] = module_holder

    def resolve(self, tag: str) -> str:
        """A registered tag for ``tag``: empty (the default), ``name:version``, ``name`` or ``name:latest``."""
        with self._lock:
            if not tag:
                if not self.default:
                    raise Unavailable("no base checkpoint is registered")
                return self.default
            if tag in self._registered:
                return tag
            name = tag.removesuffix(":latest")
            if ":" not in name:
                matches = [t for t in self._registered if t.split(":")[0] == name]
                if matches:
                    return matches[-1]  # the last registered version of that name
            known = ", ".join(sorted(t.split(":")[0] for t in self._registered)) or "none"
            raise InvalidRequest(f"model: unknown checkpoint {tag!r}; available: {known}", field="model")

    def is_loaded(self, tag: str) -> bool:
        try:
            return self.resolve(tag) in self._loaded
        except InvalidRequest:
            return False

    def loaded(self) -> list[str]:
        """Loaded tags, the most recently used first."""
        with self._lock:
            return [p.tag for p in sorted(self._loaded.values(), key=lambda p: -p.last_used)]

    def available(self) -> list[dict[str, Any]]:
        """Every registered checkpoint: tag, loaded, pinned, synthetic, source, default, bytes (own, when loaded)."""
        with self._lock:
            rows = []
            for tag, (stored, pinned) in self._registered.items():
                loaded = tag in self._loaded
                rows.append({
                    "tag": tag, "loaded": loaded, "pinned": pinned, "synthetic": stored.synthetic,
                    "source": stored.metadata.get("source"), "default": tag == self.default,
                    "bytes": self.own_bytes(tag) if loaded else None,
                })
            return rows

    def stored(self, tag: str = "") -> StoredPipeline:
        """The model store entry of a registered checkpoint (``resolve``'s rules)."""
        with self._lock:
            return self._registered[self.resolve(tag)][0]

    def get(self, tag: str = "") -> LoadedPipeline | None:
        """The loaded pipeline for ``tag`` without loading it (None when not loaded)."""
        with self._lock:
            return self._loaded.get(self.resolve(tag))

    # -- memory --------------------------------------------------------------------------------------------------
    def _holders(self, without: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        holders = [(p.tag, p.modules()) for p in self._loaded.values() if p.tag != without]
        for name, holder in self._extra.items():
            modules = {n: getattr(holder, n, None) for n in MODULES}
            holders.append((name, {n: m for n, m in modules.items() if m is not None}))
        return holders

    def _unique_modules(self, without: str | None = None, extra: list[Any] = ()) -> dict[int, Any]:
        modules: dict[int, Any] = {}
        for _, mods in self._holders(without):
            for module in mods.values():
                modules[id(module)] = module
        for module in extra:
            modules[id(module)] = module
        return modules

    def used_bytes(self) -> int:
        """Bytes of every loaded module, each counted once however many pipelines share it."""
        with self._lock:
            return sum(module_bytes(m) for m in self._unique_modules().values())

    def own_bytes(self, tag: str) -> int:
        """Bytes of the modules only this pipeline holds: what unloading it frees."""
        with self._lock:
            pipe = self._loaded.get(tag)
            if pipe is None:
                return 0
            others = self._unique_modules(without=tag)
            return sum(module_bytes(m) for m in pipe.modules().values() if id(m) not in others)

    def _estimate(self, folder: Path, names: list[str]) -> int:
        """Bytes the components ``names`` of a stored pipeline take once loaded in this manager's dtype."""
        target = torch.tensor([], dtype=self.dtype).element_size()
        total = 0
        for name in names:
            for file in _component_files(folder / name):
                for key, info in safetensors_header(file).items():
                    if key == "__metadata__":
                        continue
                    numel = math.prod(info["shape"])
                    dtype = info["dtype"]
                    total += numel * (target if dtype in _FLOAT_BYTES else _OTHER_BYTES.get(dtype, 4))
        return total

    # -- sharing -------------------------------------------------------------------------------------------------
    def _fingerprint(self, folder: Path) -> str:
        """sha256 over a component's config (minus bookkeeping keys) and the sha256 of each weights file."""
        digest = hashlib.sha256(json.dumps(_config_of(folder), sort_keys=True).encode())
        for file in _component_files(folder):
            stat = file.stat()
            cache_key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
            if cache_key not in self._fingerprints:
                self._fingerprints[cache_key] = file_sha256(file)
            digest.update(f"{file.name}:{self._fingerprints[cache_key]}".encode())
        return digest.hexdigest()

    def _sizes(self, folder: Path) -> tuple[tuple[str, int], ...]:
        return tuple((f.name, f.stat().st_size) for f in _component_files(folder))

    def _find_shared(self, stored: StoredPipeline) -> dict[str, _Component]:
        """Components of ``stored`` whose weights are byte-identical to a module already in memory. Files are
        hashed only when their names and sizes already match a loaded component's."""
        found: dict[str, _Component] = {}
        self._components = [c for c in self._components if c.module() is not None]
        for name in SHAREABLE:
            folder = stored.path / name
            sizes = self._sizes(folder) if folder.is_dir() else ()
            if not sizes:
                continue
            for component in self._components:
                if component.name != name or component.sizes != sizes:
                    continue
                if self._fingerprint(component.folder) == self._fingerprint(folder):
                    found[name] = component
                    break
        return found

    # -- loading and unloading -----------------------------------------------------------------------------------
    def ensure(self, tag: str = "") -> LoadedPipeline:
        """The pipeline for ``tag``, loaded now if it is not (unloading LRU unpinned ones to fit the budget)."""
        tag = self.resolve(tag)
        with self._lock:
            pipe = self._loaded.get(tag)
            if pipe is not None:
                pipe.last_used = next(self._clock)
                return pipe
        with self._load_lock:
            with self._lock:
                if tag in self._loaded:  # loaded by another caller meanwhile
                    return self.ensure(tag)
            return self._load(tag)

    def _load(self, tag: str) -> LoadedPipeline:
        from diffusers import StableDiffusionXLPipeline

        started = time.perf_counter()
        stored, pinned = self._registered[tag]
        shared = self._find_shared(stored)
        reused = {name: c.module() for name, c in shared.items()}
        fresh = [n for n in MODULES if n not in reused and (stored.path / n).is_dir()]
        unloaded = self._make_room(tag, self._estimate(stored.path, fresh), list(reused.values()))
        # The service watermarks images itself (``generation``, per the ``watermark`` setting): never the pipeline too.
        pipe = StableDiffusionXLPipeline.from_pretrained(str(stored.path), dtype=self.dtype, add_watermarker=False,
                                                         **reused)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if self.dtype == torch.float16:
            # SDXL's VAE overflows in fp16 (black/NaN images): decode in float32.
            pipe.vae.register_to_config(force_upcast=True)
        prepare_unet(pipe.unet, self.acceleration)
        loaded = LoadedPipeline(tag=tag, stored=stored, pipe=pipe, pinned=pinned, serial=next(self._serials),
                                load_seconds=0.0, scheduler_config=pipe.scheduler.config,
                                shared={n: c.tag for n, c in shared.items()}, last_used=next(self._clock))
        with self._lock:
            self._loaded[tag] = loaded
            for name in SHAREABLE:
                module = getattr(pipe, name, None)
                if module is not None and name not in shared and (stored.path / name).is_dir():
                    self._components.append(_Component(name, stored.path / name, self._sizes(stored.path / name),
                                                       weakref.ref(module), tag))
        seconds = time.perf_counter() - started
        loaded.load_seconds = seconds
        self.last_swap_s = seconds
        own = self.own_bytes(tag)
        logger.info("checkpoint %s loaded in %.2f s (%.1f MiB of its own%s%s)", tag, seconds, own / 2**20,
                    f"; shared {', '.join(f'{n} with {t}' for n, t in loaded.shared.items())}" if shared else "",
                    f"; unloaded {', '.join(unloaded)}" if unloaded else "")
        if self.budget_bytes is not None and self.used_bytes() > self.budget_bytes:
            logger.warning("model memory %.1f MiB is above the budget of %.1f MiB (the estimate was short)",
                           self.used_bytes() / 2**20, self.budget_bytes / 2**20)
        if self.on_swap is not None:
            self.on_swap(tag, seconds)
        return loaded

    def _make_room(self, tag: str, fresh_bytes: int, reused: list[Any]) -> list[str]:
        """Unload LRU unpinned pipelines until the new one fits; ModelBudgetExceeded when it cannot."""
        if self.budget_bytes is None:
            return []
        unloaded = []
        while True:
            with self._lock:
                used = sum(module_bytes(m) for m in self._unique_modules(extra=reused).values())
                if used + fresh_bytes <= self.budget_bytes:
                    return unloaded
                victims = sorted((p for p in self._loaded.values() if not p.pinned and p.tag != tag),
                                 key=lambda p: p.last_used)
            if not victims:
                raise ModelBudgetExceeded(
                    f"model: checkpoint {tag} needs about {fresh_bytes / 2**20:.0f} MiB more; "
                    f"{used / 2**20:.0f} MiB of the {self.budget_bytes / 2**20:.0f} MiB model budget is in use "
                    "and nothing more can be unloaded (loaded: "
                    + ", ".join(f"{t}{' (pinned)' if self._loaded[t].pinned else ''}" for t in self.loaded())
                    + ")", field="model")
            self.unload(victims[0].tag)
            unloaded.append(victims[0].tag)

    def unload(self, tag: str) -> bool:
        """Drop a loaded pipeline (its LoRAs too) and free the memory; False if it was not loaded."""
        from .vram import free_cuda_memory

        with self._lock:
            tag = self.resolve(tag)
            loaded = self._loaded.get(tag)
            if loaded is None:
                return False
            if loaded.pinned:
                raise ValueError(f"{tag} is pinned: it is never unloaded")
            del self._loaded[tag]
        if loaded.adapters:
            # Adapters may sit in a text encoder that another pipeline shares: remove them from it.
            try:
                loaded.pipe.delete_adapters(list(loaded.adapters.values()))
            except Exception:  # noqa: BLE001 - the pipeline is going away anyway
                logger.warning("could not delete the LoRA adapters of %s", tag, exc_info=True)
        loaded.pipe = loaded._img2img = loaded._inpaint = None
        del loaded
        free_cuda_memory()
        logger.info("checkpoint %s unloaded", tag)
        return True

    # -- LoRAs ---------------------------------------------------------------------------------------------------
    def register_lora(self, name: str, stored: StoredLora) -> None:
        with self._lock:
            self._loras[name] = stored

    def lora(self, name: str) -> StoredLora:
        """The stored LoRA for a request's name (looked up in the model store once)."""
        with self._lock:
            stored = self._loras.get(name)
        if stored is None:
            stored = find_lora(name)
            if stored is None:
                raise InvalidRequest(f"loras: unknown LoRA {name!r} (not a LoRA in the model store; import it with "
                                     "sdxl_bento.models.import_lora)", field="loras")
            self.register_lora(name, stored)
        return stored

    def activate_loras(self, loaded: LoadedPipeline, loras: tuple[tuple[str, float], ...]) -> None:
        """Make exactly ``loras`` (name, weight) active on ``loaded``: loaded once per pipeline, then weighted;
        with none, every adapter is disabled (including ones another pipeline put into a shared module)."""
        pipe = loaded.pipe
        if not loras:
            if self._lora_used:
                pipe.disable_lora()
            return
        names, weights = [], []
        for name, weight in loras:
            if not math.isfinite(weight):
                raise InvalidRequest(f"loras: the weight of {name!r} must be a finite number", field="loras")
            stored = self.lora(name)
            adapter = loaded.adapters.pop(stored.tag, None) or self._load_lora(loaded, stored)
            loaded.adapters[stored.tag] = adapter  # most recently used last
            names.append(adapter)
            weights.append(float(weight))
        if len(set(names)) != len(names):
            raise InvalidRequest("loras: a LoRA is named twice", field="loras")
        self._trim_adapters(loaded, keep=set(names))
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=weights)

    def _load_lora(self, loaded: LoadedPipeline, stored: StoredLora) -> str:
        from diffusers.utils import USE_PEFT_BACKEND

        if not USE_PEFT_BACKEND:
            raise Unavailable("loras: LoRAs need the peft package, which is not installed", field="loras")
        adapter = re.sub(r"[^A-Za-z0-9_]", "_", stored.tag) + f"_p{loaded.serial}"
        started = time.perf_counter()
        self._lora_used = True
        try:
            loaded.pipe.load_lora_weights(str(stored.path), weight_name=LORA_WEIGHT_NAME, adapter_name=adapter)
        except Exception as exc:
            self._drop_adapter(loaded, adapter)
            raise InvalidRequest(f"loras: LoRA {stored.tag} does not fit checkpoint {loaded.tag}: "
                                 f"{exc.__class__.__name__}: {str(exc)[:300]}", field="loras") from None
        present = {a for adapters in loaded.pipe.get_list_adapters().values() for a in adapters}
        if adapter not in present:
            raise InvalidRequest(f"loras: LoRA {stored.tag} has no weights for any layer of checkpoint {loaded.tag}",
                                 field="loras")
        logger.info("LoRA %s loaded into %s in %.2f s", stored.tag, loaded.tag, time.perf_counter() - started)
        return adapter

    def _drop_adapter(self, loaded: LoadedPipeline, adapter: str) -> None:
        try:
            present = {a for adapters in loaded.pipe.get_list_adapters().values() for a in adapters}
            if adapter in present:
                loaded.pipe.delete_adapters([adapter])
        except Exception:  # noqa: BLE001
            logger.warning("could not delete LoRA adapter %s from %s", adapter, loaded.tag, exc_info=True)

    def _trim_adapters(self, loaded: LoadedPipeline, keep: set[str]) -> None:
        while len(loaded.adapters) > self.max_loras_per_pipeline:
            victim = next((t for t, a in loaded.adapters.items() if a not in keep), None)
            if victim is None:
                return
            self._drop_adapter(loaded, loaded.adapters.pop(victim))
            logger.info("LoRA %s unloaded from %s (more than %d loaded)", victim, loaded.tag,
                        self.max_loras_per_pipeline)

    def quiet_loras(self, pipe: Any) -> None:
        """Disable LoRA layers in a pipeline that takes none (the refiner: its text encoder may be the base's)."""
        if self._lora_used and pipe is not None:
            pipe.disable_lora()
