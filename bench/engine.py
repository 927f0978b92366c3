"""Plain diffusers vs. our engine, same process, same inputs: latency, step time, fixed cost,
throughput, peak memory, and a check that both compute the same function.

    .venv/bin/python bench/engine.py --preset full --size 1024 --steps 30     # on a GPU: the real measurement
    .venv/bin/python bench/engine.py --preset tiny --size 256 --steps 8       # on a CPU: exercises the harness

The reference is ``StableDiffusionXLPipeline`` as a user would run it (fp16 on CUDA, float32 on the
CPU, default attention, Euler). Ours is ``sdxl_bento.engine.Engine`` as the service runs it (loaded
from a model store entry made here from the same weights). Both start from the same seed; the final
latents must agree within fp16 tolerance (relative error < 1e-2), so a speed-up never silently
changes the image. Synthetic weights cost exactly the real compute; their images are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", default="1,2,4", help="batch sizes for the throughput sweep")
    p.add_argument("--out", help="also write the JSON result to this file")
    args = p.parse_args(argv)

    os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="sdxl-bench-home-"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    import diffusers
    from diffusers import StableDiffusionXLPipeline

    from sdxl_bento import store
    from sdxl_bento.engine import BatchKey, Engine, Work, pick_device

    device, dtype = pick_device("auto")
    process_start = time.perf_counter()
    tag = store.save_synthetic(args.preset, seed=0)[0]
    stored = store.resolve(tag, "base")
    engine_start = time.perf_counter()
    engine = Engine(stored, device=device)
    engine.warmup()
    ready_s = time.perf_counter() - engine_start

    reference = StableDiffusionXLPipeline.from_pretrained(str(stored.path), dtype=dtype).to(device)
    reference.set_progress_bar_config(disable=True)
    size, steps = args.size, args.steps
    key = BatchKey(kind="txt2img", width=size, height=size, steps=steps, guidance_scale=args.guidance,
                   scheduler="euler")

    def ref_call(n: int, output_type: str = "pil", num_steps: int = steps):
        return reference(prompt=["a lighthouse at dusk"] * n, width=size, height=size, num_inference_steps=num_steps,
                         guidance_scale=args.guidance, output_type=output_type,
                         generator=[torch.Generator("cpu").manual_seed(s) for s in range(n)]).images

    def ours_call(n: int, num_steps: int = steps):
        k = BatchKey(**{**key.__dict__, "steps": num_steps})
        return engine.generate([Work(k, "a lighthouse at dusk", "", list(range(n)))])

    # the same function: final latents from the same seed
    ref_latents = ref_call(1, output_type="latent")
    captured = {}
    vae_decode = engine.models.base.vae.decode

    def capture(latents, *a, **kw):
        captured.setdefault("latents", latents.clone())
        return vae_decode(latents, *a, **kw)

    engine.models.base.vae.decode = capture
    ours_call(1)
    engine.models.base.vae.decode = vae_decode
    # the pipeline divides by the VAE scaling factor before decoding; undo it to compare raw latents
    ref = ref_latents.float()
    ours = (captured["latents"] * engine.models.base.vae.config.scaling_factor).float().to(ref.device)
    rel_error = float((ours - ref).norm() / ref.norm())

    def median_latency(fn) -> float:
        fn()  # warm
        return statistics.median(timed(fn, device) for _ in range(args.repeats))

    result: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.processor() or 'x86_64'}, "
                                                                         f"{os.cpu_count()} cores)",
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "preset": args.preset, "size": size, "steps": steps, "guidance": args.guidance,
        "same_function": {"latent_relative_error": rel_error, "ok": rel_error < 1e-2},
        "ready_s": {"ours_load_and_warmup": round(ready_s, 3),
                    "process_to_ready": round(time.perf_counter() - process_start, 3)},
    }
    for name, fn in (("reference", ref_call), ("ours", ours_call)):
        one = median_latency(lambda: fn(1))
        two_steps = median_latency(lambda: fn(1, num_steps=2))
        per_step = (one - two_steps) / max(1, steps - 2)  # the fixed cost (text encoders, VAE) cancels out
        throughput = {}
        for n in (int(b) for b in args.batches.split(",")):
            seconds = median_latency(lambda: fn(n))
            throughput[n] = round(n / seconds, 3)
        result[name] = {"latency_s": round(one, 4), "step_s": round(per_step, 4),
                        "fixed_s": round(one - per_step * steps, 4), "images_per_s": throughput,
                        "best_images_per_s": max(throughput.values())}
    if device == "cuda":
        result["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["ratio_ours_over_reference"] = {
        "latency": round(result["ours"]["latency_s"] / result["reference"]["latency_s"], 3),
        "best_throughput": round(result["ours"]["best_images_per_s"] / result["reference"]["best_images_per_s"], 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if result["same_function"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
