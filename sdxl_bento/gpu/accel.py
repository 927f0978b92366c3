"""Making the exact SDXL computation fast: compilation, CUDA graphs, a low-precision VAE decode.

The eager diffusers step is bound by CPU-side kernel launches (the GPU is busy about 43 of every 69 ms on an
H100: the reference figures in BENCHMARKS.md), so the largest wins remove launches rather than FLOPs:

- **regional compilation**: only the repeated ``BasicTransformerBlock`` is compiled (diffusers'
  ``compile_repeated_blocks``), once for all its instances, so a cold compile takes seconds, not the
  unbounded minutes of a whole-UNet ``max-autotune``; Inductor's on-disk cache lives in a persistent folder,
  so a restart on the same GPU type and versions does not compile again;
- **CUDA graphs**: the whole UNet forward (both guidance halves, already one batch in diffusers) is captured
  once per input signature and replayed, one launch per step instead of thousands; inputs are copied into
  static buffers, the output is copied out at once, so captured graphs can share one memory pool;
- **VAE decode in bfloat16**: SDXL's VAE overflows in float16, so diffusers decodes in float32; bfloat16 has
  float32's range, so a bfloat16 copy of the decoder is safe and several times faster.

All of these compute the same function as the plain pipeline (the benchmark checks the final latents and
reports the pixel difference); approximations (``deepcache``) live elsewhere and are opt-in.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Acceleration:
    """What the engine turns on, resolved for one device (see ``resolve``)."""

    compile: Literal["off", "regional"] = "off"
    cuda_graphs: bool = False
    vae_dtype: Optional[torch.dtype] = None
    """Dtype of the decoder copy used for decoding; None: decode with the pipeline's own VAE, as diffusers does."""
    compile_cache: Optional[Path] = None
    max_graphs: int = 8

    @classmethod
    def resolve(cls, device: str, *, compile: str = "auto", cuda_graphs: str = "auto", vae_dtype: str = "auto",
                compile_cache: Path | None = None, max_graphs: int = 8) -> "Acceleration":
        """``auto`` means: on for CUDA, off for the CPU (where compiling the full model costs minutes and there
        are no launches to save). CUDA graphs need CUDA."""
        cuda = device == "cuda"
        if cuda_graphs == "on" and not cuda:
            raise ValueError("cuda_graphs=on needs a CUDA device")
        vae = {"auto": torch.bfloat16 if cuda else None, "pipeline": None, "bfloat16": torch.bfloat16}[vae_dtype]
        return cls(compile="regional" if compile == "regional" or (compile == "auto" and cuda) else "off",
                   cuda_graphs=cuda_graphs == "on" or (cuda_graphs == "auto" and cuda),
                   vae_dtype=vae, compile_cache=compile_cache, max_graphs=max_graphs)

    def labels(self) -> dict[str, str]:
        return {"compile": self.compile, "cuda_graphs": "on" if self.cuda_graphs else "off",
                "vae_decode": str(self.vae_dtype).removeprefix("torch.") if self.vae_dtype else "pipeline"}

    def describe(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.labels().items())


def use_compile_cache(folder: Path | str) -> Path:
    """Keep Inductor's (and Triton's) compiled kernels in ``folder``, so a restart does not compile again.

    Inductor keys its entries by graph, torch version and device properties, so one folder safely serves
    several GPU types and versions. Inductor fills in its default folder on first use, so this must run
    before anything compiles (its path caches are cleared here in case something already looked).
    """
    folder = Path(folder).expanduser().absolute()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    from torch._inductor.utils import clear_caches

    clear_caches()
    return folder


def compile_regions(unet: torch.nn.Module) -> int:
    """Compile the UNet's repeated transformer blocks in place; returns how many were compiled.

    ``fullgraph=True`` makes a graph break an error instead of a silent slowdown. Shapes start static; a
    second resolution or batch size makes Dynamo recompile once with dynamic shapes.
    """
    unet.compile_repeated_blocks(fullgraph=True)
    names = set(getattr(unet, "_repeated_blocks", ()))
    return sum(1 for m in unet.modules() if type(m).__name__ in names)


# -- CUDA graphs ------------------------------------------------------------------------------------------------
_GRAPHABLE = frozenset({"encoder_hidden_states", "added_cond_kwargs", "return_dict", "timestep_cond",
                        "cross_attention_kwargs"})


def graph_inputs(args: tuple, kwargs: dict[str, Any]) -> Optional[dict[str, torch.Tensor]]:
    """The UNet call's tensors by name, when the call is one a graph can replay (the plain call diffusers'
    SDXL pipelines make); None otherwise (extra conditioning, LoRA scales, non-CUDA tensors, autograd)."""
    if len(args) != 2 or not set(kwargs) <= _GRAPHABLE or torch.is_grad_enabled():
        return None
    if kwargs.get("cross_attention_kwargs") is not None or kwargs.get("timestep_cond") is not None:
        return None
    sample, timestep = args
    added = kwargs.get("added_cond_kwargs") or {}
    if set(added) != {"text_embeds", "time_ids"}:
        return None
    if not torch.is_tensor(timestep):
        # as UNet2DConditionModel.forward itself makes it
        dtype = torch.float64 if isinstance(timestep, float) else torch.int64
        timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
    tensors = {"sample": sample, "timestep": timestep, "encoder_hidden_states": kwargs.get("encoder_hidden_states"),
               "text_embeds": added["text_embeds"], "time_ids": added["time_ids"]}
    if not all(torch.is_tensor(t) and t.device.type == "cuda" for t in tensors.values()):
        return None
    return tensors


def signature(tensors: dict[str, torch.Tensor]) -> tuple:
    """What must match for a captured graph to be replayed: shapes, dtypes and devices of every input."""
    return tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in tensors.items())


class _Captured:
    def __init__(self, static: dict[str, torch.Tensor], graph: Any, output: torch.Tensor) -> None:
        self.static, self.graph, self.output = static, graph, output


class UNetGraphs:
    """The UNet's forward, replayed from CUDA graphs: one per input signature, at most ``max_graphs`` (LRU).

    Installed as ``unet.forward``; the first call of a signature runs eagerly (it may compile), the second
    captures, later ones replay. Inside ``paused()`` (see ``eager``) every call runs eagerly: LoRA scales and
    step caching change the computation, which a graph would not see.
    """

    def __init__(self, unet: torch.nn.Module, max_graphs: int = 8) -> None:
        self.eager = unet.forward
        self.max_graphs = max_graphs
        self.graphs: "OrderedDict[tuple, _Captured]" = OrderedDict()
        self.seen: dict[tuple, int] = {}
        self.pool: Any = None
        self.replays = 0
        self.captures = 0
        self._paused = 0

    @classmethod
    def install(cls, unet: torch.nn.Module, max_graphs: int = 8) -> "UNetGraphs":
        graphs = cls(unet, max_graphs)
        unet.forward = graphs  # nn.Module.__call__ calls the instance attribute
        return graphs

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = None if self._paused else graph_inputs(args, kwargs)
        if tensors is None:
            return self.eager(*args, **kwargs)
        key = signature(tensors)
        captured = self.graphs.get(key)
        if captured is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] < 2:
                return self.eager(*args, **kwargs)
            return self._wrap(self._capture(key, tensors), kwargs)
        self.graphs.move_to_end(key)
        for name, value in tensors.items():
            captured.static[name].copy_(value)
        captured.graph.replay()
        self.replays += 1
        return self._wrap(captured.output.clone(), kwargs)

    def _run(self, static: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.eager(static["sample"], static["timestep"], encoder_hidden_states=static["encoder_hidden_states"],
                          added_cond_kwargs={"text_embeds": static["text_embeds"], "time_ids": static["time_ids"]},
                          return_dict=False)[0]

    def _capture(self, key: tuple, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Capture a graph for ``key``; returns this call's output."""
        static = {name: t.clone() for name, t in tensors.items()}
        # Lazy initialisation (cuBLAS workspaces, autotuning) must happen outside the capture, on a side stream;
        # that run's output is this call's answer.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            output = self._run(static).clone()
        torch.cuda.current_stream().wait_stream(side)
        output.record_stream(torch.cuda.current_stream())  # made on the side stream, read on this one
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self._run(static)
        self.pool = graph.pool()
        self.graphs[key] = _Captured(static, graph, static_out)
        self.captures += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        logger.info("captured a CUDA graph of the UNet for %s", {n: tuple(t.shape) for n, t in tensors.items()})
        return output

    @staticmethod
    def _wrap(output: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        if kwargs.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=output)
        return (output,)


def graphs_of(unet: torch.nn.Module) -> Optional[UNetGraphs]:
    forward = unet.__dict__.get("forward")
    return forward if isinstance(forward, UNetGraphs) else None


@contextmanager
def eager(*unets: Any) -> Iterator[None]:
    """Run these UNets without CUDA graphs inside the block (a no-op for UNets without graphs)."""
    with ExitStack() as stack:
        for unet in unets:
            graphs = graphs_of(unet) if unet is not None else None
            if graphs is not None:
                stack.enter_context(graphs.paused())
        yield


# -- VAE decode -------------------------------------------------------------------------------------------------
class Decoder:
    """Latents to images with a copy of the VAE's decoder in ``dtype`` (the encoder is not copied).

    Decodes exactly as diffusers' SDXL pipelines do (scaling factor, optional latents mean/std), so with the
    pipeline's dtype it gives the same pixels; with bfloat16 it is faster and cannot overflow.
    """

    def __init__(self, vae: Any, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.config = vae.config
        shallow = copy.copy(vae)  # the decode path only: no second encoder in memory
        shallow._modules = {k: v for k, v in vae._modules.items() if k in ("decoder", "post_quant_conv")}
        self.vae = copy.deepcopy(shallow).to(dtype=dtype)
        self.vae.requires_grad_(False)

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents as the denoising loop leaves them -> images in [-1, 1], float32."""
        mean, std = getattr(self.config, "latents_mean", None), getattr(self.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / self.config.scaling_factor + mean
        else:
            latents = latents / self.config.scaling_factor
        image = self.vae.decode(latents.to(self.dtype), return_dict=False)[0]
        return image.float()


def prepare_unet(unet: torch.nn.Module, acceleration: Acceleration) -> None:
    """Apply ``acceleration`` to a freshly loaded UNet (compile first: graphs capture the compiled kernels)."""
    if graphs_of(unet) is not None:
        return
    if acceleration.compile == "regional":
        count = compile_regions(unet)
        logger.info("compiling %d transformer blocks on first use (compile cache: %s)", count,
                    os.environ.get("TORCHINDUCTOR_CACHE_DIR", "Inductor's default"))
    if acceleration.cuda_graphs:
        UNetGraphs.install(unet, acceleration.max_graphs)


def unaccelerate(unet: torch.nn.Module) -> None:
    """Undo ``prepare_unet``: compiled blocks run eagerly again and CUDA graphs are dropped."""
    if graphs_of(unet) is not None:
        del unet.forward
    for module in unet.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None  # what nn.Module.compile() set
