"""GPU memory: admission that keeps batches inside the free VRAM, and recovery when one does not fit.

Peak memory of an SDXL batch beyond the weights grows linearly with output pixels x images (latents,
UNet activations with memory-efficient attention, the VAE decode), so a two-parameter model
calibrated on two measured points predicts it well enough to size batches. The model is an
estimate: a batch that still runs out of memory is split in halves and retried, and a single
request that cannot fit fails with ``OutOfMemory`` (503) while the worker lives on.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
from dataclasses import dataclass
from typing import Callable, TypeVar

from ..errors import OutOfMemory

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

GiB = 1 << 30


@dataclass(frozen=True)
class MemoryModel:
    """Bytes of GPU memory a batch needs beyond the loaded weights, as a function of its shape."""

    bytes_per_pixel_image: float
    """Activation memory per output pixel per image (CFG doubles the UNet batch: folded in)."""
    fixed_bytes: int
    """Per batch, whatever its size: CUDA workspaces, text encoder activations, allocator slack."""
    refiner_factor: float = 1.25
    """Multiplies the whole estimate for batches that run the refiner (its UNet's activations on top)."""

    def estimate(self, width: int, height: int, images: int, refiner: bool) -> int:
        need = self.fixed_bytes + self.bytes_per_pixel_image * width * height * images
        return math.ceil(need * (self.refiner_factor if refiner else 1.0))


# Calibration. Reference: an H100, fp16, 1024x1024 with CFG, peak VRAM 13.3 GiB for 1 image and 20.4 GiB
# for 4 images, with ~6.9 GiB of base weights (UNet, both text encoders, VAE) resident. Beyond the weights
# that is 6.4 GiB for 1 image and 13.5 GiB for 4: the 3 extra images cost 7.1 GiB, 2.367 GiB each, i.e.
# 2423.5 bytes per output pixel per image; the rest of the 1-image point, 4.033 GiB, is fixed per batch.
REFERENCE_WEIGHTS_BYTES = int(6.9 * GiB)
REFERENCE_PEAKS_BYTES = {1: int(13.3 * GiB), 4: int(20.4 * GiB)}
"""Images (1024x1024, CFG) -> measured peak VRAM, weights included."""
_PER_IMAGE = (REFERENCE_PEAKS_BYTES[4] - REFERENCE_PEAKS_BYTES[1]) / 3
SDXL_FP16 = MemoryModel(
    bytes_per_pixel_image=_PER_IMAGE / (1024 * 1024),                                   # ~2423.5
    fixed_bytes=int(REFERENCE_PEAKS_BYTES[1] - REFERENCE_WEIGHTS_BYTES - _PER_IMAGE),   # ~4.033 GiB
)


class VramBudget:
    """How much a batch may use: the memory free after the weights are loaded and warmed up."""

    def __init__(self, budget_bytes: int | None, model: MemoryModel) -> None:
        self.budget_bytes = budget_bytes
        """None: no limit (the CPU, where memory is the host's and an estimate would only refuse work)."""
        self.model = model

    @classmethod
    def measure(cls, model: MemoryModel, *, headroom: float = 0.9, device: int = 0) -> "VramBudget":
        """Call after warm-up: free memory of ``device`` x ``headroom``; no limit without CUDA.

        The allocator's cache is emptied first, so memory PyTorch holds but does not use counts as free.
        """
        if not 0 < headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {headroom}")
        import torch

        if not torch.cuda.is_available():
            logger.info("no CUDA: no GPU memory budget")
            return cls(None, model)
        free_cuda_memory()
        free, total = torch.cuda.mem_get_info(device)
        budget = cls(int(free * headroom), model)
        logger.info("GPU memory budget %.2f GiB (free %.2f of %.2f GiB x %.2f); at most %d images of 1024x1024",
                    budget.budget_bytes / GiB, free / GiB, total / GiB, headroom,
                    budget.max_images(1024, 1024, False))
        return budget

    def fits(self, width: int, height: int, images: int, refiner: bool) -> bool:
        return self.budget_bytes is None or self.model.estimate(width, height, images, refiner) <= self.budget_bytes

    def max_images(self, width: int, height: int, refiner: bool) -> int:
        """The largest image count that fits (>= 0); ``sys.maxsize`` with no limit (callers cap it)."""
        if self.budget_bytes is None:
            return sys.maxsize
        factor = self.model.refiner_factor if refiner else 1.0
        per_image = self.model.bytes_per_pixel_image * width * height
        n = max(0, int((self.budget_bytes / factor - self.model.fixed_bytes) // per_image)) if per_image > 0 else 0
        while n > 0 and not self.fits(width, height, n, refiner):  # the formula's float rounding, both ways
            n -= 1
        while self.fits(width, height, n + 1, refiner) and n < sys.maxsize:
            n += 1
        return n

    def split(self, counts: list[int], width: int, height: int, refiner: bool) -> list[list[int]]:
        """Cut one would-be batch (requests' image counts, in order) into consecutive groups that fit.

        A request that alone does not fit is a group of its own: the schema bounds it, so the caller runs
        it and relies on the OOM path rather than refusing what may well fit on the day.
        """
        groups: list[list[int]] = []
        current: list[int] = []
        total = 0
        for index, images in enumerate(counts):
            if current and not self.fits(width, height, total + images, refiner):
                groups.append(current)
                current, total = [], 0
            current.append(index)
            total += images
        if current:
            groups.append(current)
        return groups


def is_cuda_oom(exc: BaseException) -> bool:
    """``torch.cuda.OutOfMemoryError``, or a RuntimeError saying "out of memory" (cuDNN, cuBLAS, older torch)."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_cuda_memory() -> None:
    """Drop unreachable tensors, then hand the allocator's cached blocks back to the driver."""
    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_with_oom_retry(run: Callable[[list[T]], list[R]], items: list[T], *, sizes: Callable[[T], int],
                       is_oom: Callable[[BaseException], bool] = is_cuda_oom,
                       free: Callable[[], None] = free_cuda_memory,
                       log: logging.Logger = logger) -> list[R]:
    """``run(items)``, one result per item in order; on OOM free memory and retry in halves.

    Halves are cut by image count (``sizes``), never inside an item, recursively down to single items.
    Every item gets at least one attempt on freshly freed memory; a single item that still runs out
    raises ``OutOfMemory``. Other errors propagate untouched. The OOM exception is dropped before
    ``free()`` and never chained: its traceback holds the frames, and so the tensors, that filled the GPU.
    """
    return _attempt(run, list(items), sizes, is_oom, free, log, after_free=False)


def _attempt(run, items, sizes, is_oom, free, log, *, after_free: bool):
    message = None
    try:
        results = run(items)
    except Exception as exc:
        if not is_oom(exc):
            raise
        message = f"{exc.__class__.__name__}: {str(exc)[:200]}"
    if message is None:
        if len(results) != len(items):
            raise RuntimeError(f"run returned {len(results)} results for {len(items)} items")
        return results
    # Out of the except block: the exception and its traceback are unreachable now, so free() can reclaim.
    free()
    images = sum(sizes(item) for item in items)
    if len(items) == 1:
        if after_free:
            log.error("out of GPU memory on a single request of %d image(s), even alone: %s", images, message)
            raise OutOfMemory(
                f"not enough GPU memory for this request ({images} image(s)), even alone; "
                "try fewer images or a smaller size, or try again later",
                retry_after=30, images=images)
        log.warning("out of GPU memory on a request of %d image(s); freed the cache, retrying it once: %s",
                    images, message)
        return _attempt(run, items, sizes, is_oom, free, log, after_free=True)
    cut = _halve(items, sizes)
    log.warning("out of GPU memory on a batch of %d requests (%d images); freed the cache, retrying as %d + %d "
                "requests: %s", len(items), images, cut, len(items) - cut, message)
    return (_attempt(run, items[:cut], sizes, is_oom, free, log, after_free=True)
            + _attempt(run, items[cut:], sizes, is_oom, free, log, after_free=True))


def _halve(items: list, sizes: Callable) -> int:
    """The first cut (1..len-1) at which the left part holds at least half of the images."""
    total = sum(sizes(item) for item in items)
    seen = 0
    for cut, item in enumerate(items[:-1], start=1):
        seen += sizes(item)
        if seen * 2 >= total:
            return cut
    return len(items) - 1
