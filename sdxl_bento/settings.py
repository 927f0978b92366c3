"""One typed settings object, read once from ``SDXL_BENTO_*`` environment variables.

No other module reads ``os.environ``: everything else receives a ``Settings`` instance,
so tests can build one with plain keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDXL_BENTO_", extra="ignore", frozen=True)

    base_model: str = "sdxl-base:latest"
    """Bento model store tag of the SDXL base pipeline."""

    refiner_model: str = "sdxl-refiner:latest"
    """Bento model store tag of the SDXL refiner pipeline."""

    refiner: Literal["auto", "on", "off"] = "auto"
    """Load the refiner: ``auto`` when it is in the store, ``on`` requires it, ``off`` never loads it."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to run: ``auto`` picks CUDA (float16) when present, else the CPU (float32)."""

    image_dir: Path = Field(default_factory=lambda: Path.home() / ".sdxl-bento" / "images")
    """Folder of the image store (generated images, by random UUID)."""

    public_url: str = ""
    """Base URL put in front of ``/images/{id}`` links; empty gives links relative to the server."""

    max_prompt_chars: int = Field(default=500, ge=1, le=10_000)
    """Longest prompt or negative prompt accepted, in characters."""

    max_pixels: int = Field(default=1536 * 1536, ge=256 * 256, le=2048 * 2048)
    """Largest width x height accepted."""

    max_batch_images: int = Field(default=8, ge=1, le=64)
    """Most images generated in one pipeline call (requests are batched up to this)."""

    concurrency: int = Field(default=4, ge=1, le=64)
    """Requests the GPU works on at once: the most requests merged into one engine batch."""

    max_concurrency: int = Field(default=32, ge=1, le=10_000)
    """Requests admitted per worker, running and waiting; beyond it: 503 with Retry-After."""

    timeout: float = Field(default=300.0, gt=0, le=86_400)
    """Seconds a request may wait for its images; work that cannot start in time is never started."""

    workers: int = Field(default=1, ge=1, le=16)
    """BentoML worker processes; each loads its own pipelines (one per GPU)."""

    def traffic(self) -> dict[str, float | int]:
        """BentoML traffic settings.

        BentoML answers 429 itself past ``max_concurrency``; ours answers 503 with Retry-After
        first, so BentoML's bound is set above it, leaving room for status polls and downloads.
        BentoML's timeout likewise sits above ours, so ours always answers first.
        """
        return {
            "concurrency": self.concurrency,
            "max_concurrency": self.max_concurrency + 64,
            "timeout": self.timeout + 60,
        }
