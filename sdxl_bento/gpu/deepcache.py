"""DeepCache: reuse the UNet's deep features across denoising steps (approximate, opt-in).

After Ma et al., "DeepCache: Accelerating Diffusion Models for Free" (2023). The deep, low-resolution
part of the UNet (every down block but the first, the mid block, every up block but the last) changes
slowly between adjacent denoising steps, so it is computed only every ``interval``-th UNet call and its
outputs reused in between; the shallow, high-resolution path (time embedding, ``conv_in``, the first
down block's resnets, the last up block, ``conv_out``) still runs on every call, with fresh skip
connections. This is an APPROXIMATION: it changes the image (``interval=1`` is exactly the plain UNet),
so it is opt-in and never on by default.

Saving: a cached call costs about 7% of a full call's FLOPs for SDXL's base UNet at 1024x1024 (9% for
the refiner; counted with ``torch.utils.flop_counter`` on the real configs), so ``interval=3`` runs
about 38% of the plain UNet's FLOPs. The wall time saved also depends on memory traffic (the shallow
path works at the highest resolution); the benchmark measures it.

Uses diffusers' own ``UNet2DConditionModel.forward``: during the block each deep module's ``forward``
is shadowed by an instance attribute that calls the real one and keeps its output on a full call, and
returns the kept output on a cached call (the forward loop only concatenates and slices what they
return, and the inputs handed to skipped modules are ignored).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

# UNets with a deep cache installed: two blocks on one UNet would share (and corrupt) the patches.
_active: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass
class DeepCacheStats:
    """UNet calls inside one ``deep_cache`` block: full ones and ones that reused the deep features."""

    full_steps: int = 0
    cached_steps: int = 0

    @property
    def cached_fraction(self) -> float:
        """Fraction of UNet calls that skipped the deep modules."""
        total = self.full_steps + self.cached_steps
        return self.cached_steps / total if total else 0.0


class _DeepCache:
    def __init__(self, unet: nn.Module, interval: int) -> None:
        if len(unet.up_blocks) < 2:
            raise ValueError("deep_cache needs a UNet with at least two resolution levels")
        self.interval = interval
        self.stats = DeepCacheStats()
        self.calls = 0
        self.mode = "off"  # "full" | "cached" while the UNet runs, "off" otherwise
        self.key: tuple[Any, ...] | None = None  # input signature of the last complete full call
        self.pending: tuple[Any, ...] | None = None  # that of the full call now running
        self.outputs: dict[int, Any] = {}
        # The first down block's downsampler feeds only the second down block and the second-to-last
        # up block, so it is skipped too. The second-to-last up block's output is the one cached value
        # the live path reads; it is copied because FreeU scales it in place when the last up block is
        # one of the first two (``apply_freeu``), which would otherwise compound on every reuse.
        first = unet.down_blocks[0]
        deep = [*(getattr(first, "downsamplers", None) or ()), *unet.down_blocks[1:]]
        if unet.mid_block is not None:
            deep.append(unet.mid_block)
        deep.extend(unet.up_blocks[:-1])
        bridge = unet.up_blocks[-2]
        self.saved: list[tuple[nn.Module, Callable[..., Any] | None]] = []
        for index, module in enumerate(deep):
            self.saved.append((module, module.__dict__.get("forward")))
            module.forward = self._forward(index, module.forward, copy=module is bridge)
        self.handles = [
            unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            unet.register_forward_hook(self._post_hook, always_call=True),
        ]

    def _forward(self, index: int, original: Callable[..., Any], copy: bool) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.mode == "cached":
                kept = self.outputs[index]
                return kept.clone() if copy else kept
            out = original(*args, **kwargs)
            if self.mode == "full":
                self.outputs[index] = out.clone() if copy else out
            return out

        return forward

    def _pre_hook(self, unet: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        key = (sample.shape, sample.dtype, sample.device, None if context is None else context.shape)
        scheduled = self.calls % self.interval == 0
        self.calls += 1
        if scheduled or key != self.key:
            self.mode, self.key = "full", None
            self.outputs.clear()
            self.stats.full_steps += 1
            self.pending = key
        else:
            self.mode = "cached"
            self.stats.cached_steps += 1

    def _post_hook(self, unet: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # Also runs when the forward raised (``always_call``, ``output=None``): the key stays unset, so a
        # partial cache is never reused, and deep modules called outside a UNet call run for real.
        if output is None:
            self.outputs.clear()
        elif self.mode == "full":
            self.key = self.pending
        self.mode = "off"

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for module, forward in self.saved:
            if forward is None:
                del module.forward
            else:
                module.forward = forward
        self.saved.clear()
        self.outputs.clear()
        self.key = None
        self.mode = "off"


@contextmanager
def deep_cache(unet: nn.Module, interval: int = 3) -> Iterator[DeepCacheStats]:
    """Run a ``UNet2DConditionModel``'s deep modules only on every ``interval``-th call in this block.

    APPROXIMATE: reused deep features change the image; ``interval=1`` is bit-identical to the plain
    UNet. Use one block per pipeline call (``with deep_cache(pipe.unet, 3) as stats: pipe(...)``): call
    ``k`` (from 0) of the block is full when ``k % interval == 0``, and also whenever the cache is empty
    or the input's shape, dtype or device (batch size included) or the text context's shape differs
    from the last full call's. It assumes one UNet call per denoising step, as the SDXL pipelines make
    (classifier-free guidance is batched). The UNet must not be called concurrently from other threads
    while the block is open; on exit every patch and cached tensor is dropped, also on exceptions.

    Yields:
        A ``DeepCacheStats`` counting the full and cached UNet calls made in the block.
    """
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"deep_cache interval must be an integer >= 1, got {interval!r}")
    if unet in _active:
        raise RuntimeError("deep_cache is already active on this UNet")
    cache = _DeepCache(unet, interval)
    _active.add(unet)
    try:
        yield cache.stats
    finally:
        cache.remove()
        _active.discard(unet)
