"""What a live preview costs (issue 17): the linear latent-to-RGB approximation and TAESD-XL, each with its JPEG
encode, on the latents of a 1024x1024 SDXL image (4 x 128 x 128), batch 1 and 4.

    .venv/bin/python bench/previews.py --repeats 20 --out /tmp/previews.json

TAESD-XL is built from its real configuration (diffusers' ``AutoencoderTiny`` defaults, which madebyollin/taesdxl
uses) with random weights: the compute is the real one, the pictures are noise. A task makes a preview every
``SDXL_BENTO_PREVIEW_EVERY`` steps; the figures say what that adds per preview on this machine (CPU or GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch


def timed(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    fn()  # warm-up
    sync()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    at = lambda q: round(samples[min(len(samples) - 1, round(q * (len(samples) - 1)))], 3)  # noqa: E731
    return {"median_ms": at(0.5), "p90_ms": at(0.9), "min_ms": at(0.0), "n": len(samples)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024, help="image side; the latents are size/8")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--taesd-repeats", type=int,
                   help="TAESD-XL's repeats (default: --repeats; it takes seconds on a CPU)")
    p.add_argument("--preview-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import diffusers
    from diffusers import AutoencoderTiny

    from sdxl_bento.gpu.previews import LinearPreview, TaesdPreview

    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    linear = LinearPreview(size=args.preview_size)
    taesd = TaesdPreview.__new__(TaesdPreview)  # the class's own decode, on a model made here (no store needed)
    taesd.size, taesd.device, taesd.dtype = args.preview_size, device, dtype
    torch.manual_seed(0)
    taesd.vae = AutoencoderTiny().to(device, dtype).eval()
    result: dict[str, Any] = {
        "command": " ".join(["bench/previews.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "latents": [4, args.size // 8, args.size // 8], "preview_size": args.preview_size, "dtype": str(dtype)}
    for batch in (int(b) for b in args.batches.split(",")):
        latents = torch.randn(batch, 4, args.size // 8, args.size // 8, device=device, dtype=dtype)
        result[f"batch_{batch}"] = {
            "linear": timed(lambda: linear(latents), args.repeats, sync),
            "taesd_xl": timed(lambda: taesd(latents), args.taesd_repeats or args.repeats, sync),
            "jpeg_bytes_linear": sum(map(len, linear(latents))) // batch,
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
