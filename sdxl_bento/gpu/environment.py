"""What ran a batch, for each image's reproducibility manifest (``core/manifest.py``): the weights, the scheduler,
the versions, the device and the acceleration. The core asks through ``describe(batch_key)``; it never sees the engine.

The sha256 of a checkpoint's weights (``store.modelstore.weights_sha256``: recorded at import, or computed once for
an older model and kept in the state folder) is looked up here for both kinds of manifest: this one and the C2PA
one (``sha256``). The configured checkpoints and the refiner are looked up at startup, so that no request waits
for a hash; one added later (A1111's refresh-checkpoints) on first use.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import torch

from ..buildinfo import build_info
from ..errors import InvalidRequest
from ..jobs import BatchKey
from ..samplers import BY_NAME as SAMPLERS
from ..store.modelstore import StoredPipeline, weights_sha256

logger = logging.getLogger(__name__)


class Environment:
    def __init__(self, engine: Any, state_dir: Path | None, *, refiner: StoredPipeline | None = None) -> None:
        self.engine = engine
        self.state_dir = state_dir
        self.refiner = refiner
        self._lock = threading.Lock()
        self._weights: dict[str, dict[str, Any]] = {}
        self._schedulers: dict[tuple[str, str], dict[str, Any]] = {}
        name = torch.cuda.get_device_name(torch.cuda.current_device()) if engine.device == "cuda" else "cpu"
        self.device = {"type": engine.device, "name": name, "dtype": str(engine.dtype).removeprefix("torch.")}
        self.versions = {**build_info(), "cudnn": str(torch.backends.cudnn.version()) if engine.device == "cuda"
                         else None}
        for row in engine.manager.available():
            self.weights(engine.manager.stored(row["tag"]))
        if refiner is not None:
            self.weights(refiner)

    def weights(self, stored: StoredPipeline) -> dict[str, Any]:
        """Tag, sha256 of the weights and whether the weights are synthetic."""
        with self._lock:
            known = self._weights.get(stored.tag)
        if known is None:
            known = {"tag": stored.tag, "sha256": weights_sha256(stored, cache_dir=self.state_dir),
                     "synthetic": stored.synthetic, "source": stored.metadata.get("source")}
            with self._lock:
                self._weights[stored.tag] = known
        return known

    def sha256(self, tag: str) -> str | None:
        """The weights' sha256 of a checkpoint, the refiner or a LoRA, by tag or name (C2PA's claim names it);
        None when there is none such."""
        if self.refiner is not None and tag == self.refiner.tag:
            return self.weights(self.refiner)["sha256"]
        try:
            return self.weights(self.engine.manager.stored(tag))["sha256"]
        except InvalidRequest:  # not a checkpoint
            pass
        try:
            return self.engine.manager.lora(tag).metadata.get("sha256")
        except InvalidRequest:
            return None

    def _scheduler(self, role: str, config: Any, sampler: str) -> dict[str, Any]:
        with self._lock:
            found = self._schedulers.get((role, sampler))
        if found is None:
            import diffusers

            spec = SAMPLERS[sampler]
            built = getattr(diffusers, spec.scheduler).from_config(config, **spec.config)
            found = {"name": sampler, "class": spec.scheduler,
                     "config": json.loads(json.dumps(dict(built.config), default=str))}
            with self._lock:
                self._schedulers[(role, sampler)] = found
        return found

    def describe(self, key: BatchKey) -> dict[str, Any]:
        engine, manager = self.engine, self.engine.manager
        models: dict[str, Any] = {}
        if key.kind != "refine":
            stored = manager.stored(key.model)
            models["base"] = self.weights(stored)
            loaded = manager.get(stored.tag)
            config = loaded.scheduler_config if loaded is not None else engine.models.scheduler_configs["base"]
            scheduler = self._scheduler(stored.tag, config, key.scheduler)
        else:
            scheduler = self._scheduler("refiner", engine.models.scheduler_configs["refiner"], key.scheduler)
        if key.uses_refiner and self.refiner is not None:
            models["refiner"] = self.weights(self.refiner)
            if key.kind != "refine":
                models["refiner_scheduler"] = self._scheduler(
                    "refiner", engine.models.scheduler_configs["refiner"], key.scheduler)
        loras = []
        for name, weight in key.loras:
            stored_lora = manager.lora(name)
            loras.append({"name": name, "weight": weight, "tag": stored_lora.tag,
                          "sha256": stored_lora.metadata.get("sha256")})
        acceleration = {**engine.acceleration.labels(), "approximation": key.approximation,
                        "eager_unet": bool(key.loras) or key.approximation != "none"}
        if key.approximation == "deepcache":
            acceleration["deepcache_interval"] = engine.deepcache_interval
        return {"models": models, "loras": loras, "scheduler": scheduler, "versions": self.versions,
                "device": self.device, "acceleration": acceleration}
