"""Plain diffusers vs. our engine, same process, same inputs: latency, step time, fixed cost,
throughput, peak memory, time to ready (cold and with a warm compile cache), and a check that
both compute the same function.

    .venv/bin/python bench/engine.py --preset full --size 1024 --steps 30 --refiner   # on a GPU
    .venv/bin/python bench/engine.py --preset tiny --size 256 --steps 8               # on a CPU: the harness

The reference is ``StableDiffusionXLPipeline`` as a user would run it (fp16 on CUDA, float32 on the
CPU, default attention, Euler). Ours is ``sdxl_bento.gpu.engine.Engine`` as the service runs it (loaded
from a model store entry made here from the same weights, with the service's acceleration settings,
which the flags override). Both start from the same seed; the final latents must agree within fp16
tolerance (relative error < 1e-2), so a speed-up never silently changes the image; the pixel
difference of the final images is reported too. The approximate mode (``deepcache``) is measured
apart and labelled so. Synthetic weights cost exactly the real compute; their images are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPT = "a lighthouse at dusk"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median); one warm-up run before")
    p.add_argument("--batches", default="1,2,4", help="batch sizes for the throughput sweep")
    p.add_argument("--refiner", action="store_true", help="also load the refiner (peak VRAM with both, batch 4)")
    p.add_argument("--compile", choices=("auto", "off", "regional"), default="auto")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--vae-decode", choices=("auto", "pipeline", "bfloat16"), default="auto")
    p.add_argument("--fuse-qkv", action="store_true", help="experiment: fused QKV projections in our UNets")
    p.add_argument("--channels-last", action="store_true", help="experiment: channels_last UNets")
    p.add_argument("--compile-cache", type=Path, default=Path.home() / ".sdxl-bento" / "compile-cache")
    p.add_argument("--deepcache", type=int, default=3, metavar="N",
                   help="also time the approximate deepcache mode, one full step in N (0: skip it)")
    p.add_argument("--ready", action="store_true",
                   help="also time process start to ready twice in fresh processes: cold (empty compile cache) "
                        "and warm (the cache the cold run left)")
    p.add_argument("--only-ready", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help="also write the JSON result to this file")
    return p.parse_args(argv)


def build(args: argparse.Namespace, compile_cache: Path):
    """The model store entries and our engine, as the service builds them."""
    from sdxl_bento.gpu.accel import Acceleration
    from sdxl_bento.gpu.engine import Engine, pick_device
    from sdxl_bento.store import modelstore as store

    device, dtype = pick_device("auto")
    if args.only_ready:  # the parent's model store: load only, as a restarted service does
        tags = ["sdxl-base:latest", "sdxl-refiner:latest"]
    else:
        tags = store.save_synthetic(args.preset, refiner=args.refiner, seed=0)
    stored = store.resolve(tags[0], "base")
    refiner = store.resolve(tags[1], "refiner") if args.refiner else None
    acceleration = Acceleration.resolve(device, compile=args.compile, cuda_graphs=args.cuda_graphs,
                                        vae_dtype=args.vae_decode, compile_cache=compile_cache)
    started = time.perf_counter()
    engine = Engine(stored, refiner, device=device, acceleration=acceleration, deepcache_interval=max(2, args.deepcache))
    for unet in filter(None, (engine.models.base.unet, engine.models.refiner and engine.models.refiner.unet)):
        # experiments the reference measured without gain eagerly; before warm-up, so compilation sees them
        if args.fuse_qkv:
            unet.fuse_qkv_projections()
        if args.channels_last:
            unet.to(memory_format=torch.channels_last)
    engine.warmup(args.size, args.size)
    return engine, stored, device, dtype, time.perf_counter() - started


def ready_times(args: argparse.Namespace, argv: list[str]) -> dict[str, float]:
    """Process start to ready in two fresh processes sharing a new compile cache: cold, then warm."""
    cache = Path(tempfile.mkdtemp(prefix="sdxl-bench-compile-cache-"))
    times = {}
    for name in ("cold", "warm"):
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, *argv, "--only-ready", "--compile-cache", str(cache)], check=True)
        times[name] = round(time.perf_counter() - started, 2)
    return times


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="sdxl-bench-home-"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    process_start = time.perf_counter()
    if args.only_ready:
        build(args, args.compile_cache)
        return 0
    import diffusers
    from diffusers import StableDiffusionXLPipeline

    from sdxl_bento.gpu.engine import BatchKey, Work

    engine, stored, device, dtype, ready_s = build(args, args.compile_cache)
    size, steps = args.size, args.steps
    key = BatchKey(kind="txt2img", width=size, height=size, steps=steps, guidance_scale=args.guidance,
                   scheduler="euler")
    batches = [int(b) for b in args.batches.split(",")]

    def ours_call(n: int, num_steps: int = steps, **changes):
        k = BatchKey(**{**key.__dict__, "steps": num_steps, **changes})
        return engine.generate([Work(k, PROMPT, "", list(range(n)))])[0]

    def median_latency(fn) -> float:
        fn()  # warm (and, with CUDA graphs, capture this signature)
        return statistics.median(timed(fn, device) for _ in range(args.repeats))

    # Peak memory of ours alone (base and refiner loaded), before the reference is in memory.
    peak = {}
    if device == "cuda":
        for refine in (("none", "ensemble") if args.refiner else ("none",)):
            torch.cuda.reset_peak_memory_stats()
            ours_call(max(batches), refine=refine, high_noise_frac=0.8)
            peak[f"batch {max(batches)}, refine={refine}"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    reference = StableDiffusionXLPipeline.from_pretrained(str(stored.path), dtype=dtype,
                                                          add_watermarker=False).to(device)
    reference.set_progress_bar_config(disable=True)
    if dtype == torch.float16:
        reference.vae.register_to_config(force_upcast=True)

    def ref_call(n: int, num_steps: int = steps, output_type: str = "pil"):
        return reference(prompt=[PROMPT] * n, width=size, height=size, num_inference_steps=num_steps,
                         guidance_scale=args.guidance, output_type=output_type,
                         generator=[torch.Generator("cpu").manual_seed(s) for s in range(n)]).images

    # The same function: final latents and images from the same seed.
    def our_latents(**changes):
        captured = {}
        scheduler_class = type(engine.models.base.scheduler)  # the engine makes a new one per call
        original_step = scheduler_class.step

        def step(self, *a, **kw):  # the scheduler's last step leaves the final latents
            out = original_step(self, *a, **kw)
            captured["latents"] = (out[0] if isinstance(out, tuple) else out.prev_sample).clone()
            return out

        scheduler_class.step = step
        try:
            image = ours_call(1, **changes)[0]
        finally:
            scheduler_class.step = original_step
        return captured["latents"].float(), image

    ref_latents = ref_call(1, output_type="latent").float()
    ref_image = np.asarray(ref_call(1)[0], dtype=np.int16)

    def compare(latents, image) -> dict:
        pixels = np.abs(np.asarray(image, dtype=np.int16) - ref_image)
        error = float((latents.to(ref_latents.device) - ref_latents).norm() / ref_latents.norm())
        return {"latent_relative_error": error, "pixel_mean_abs_diff": round(float(pixels.mean()), 3),
                "pixel_max_abs_diff": int(pixels.max())}

    same = compare(*our_latents())
    same["ok"] = same["latent_relative_error"] < 1e-2
    result: dict = {
        "command": " ".join(["bench/engine.py", *argv]),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.processor() or 'x86_64'}, "
                                                                         f"{os.cpu_count()} cores)",
        "driver": _driver() if device == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "acceleration": engine.acceleration.describe() + "".join(
            f", {flag}" for flag in ("fuse_qkv", "channels_last") if getattr(args, flag)),
        "preset": args.preset, "size": size, "steps": steps, "guidance": args.guidance,
        "same_function": same,
        "ready_s": {"ours_load_compile_warmup": round(ready_s, 2),
                    "process_to_ready": round(time.perf_counter() - process_start, 2)},
    }
    variants = [("reference", ref_call, {}), ("ours", ours_call, {})]
    if args.deepcache:
        variants.append(("ours_deepcache_APPROXIMATE", ours_call, {"approximation": "deepcache"}))
        result["deepcache_APPROXIMATE"] = {"interval": args.deepcache, **compare(*our_latents(approximation="deepcache"))}
    for name, fn, changes in variants:
        one = median_latency(lambda: fn(1, **changes))
        two_steps = median_latency(lambda: fn(1, num_steps=2, **changes))
        per_step = (one - two_steps) / max(1, steps - 2)  # the fixed cost (text encoders, VAE) cancels out
        throughput = {n: round(n / median_latency(lambda: fn(n, **changes)), 3) for n in batches}
        result[name] = {"latency_s": round(one, 4), "step_s": round(per_step, 4),
                        "fixed_s": round(one - per_step * steps, 4), "images_per_s": throughput,
                        "best_images_per_s": max(throughput.values()),
                        "best_batch": max(throughput, key=throughput.get)}
    if device == "cuda":
        result["peak_vram_gib_ours"] = peak
        result["peak_vram_gib_whole_run"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["ratio_ours_over_reference"] = {
        name: {"latency": round(result[name]["latency_s"] / result["reference"]["latency_s"], 3),
               "best_throughput": round(result[name]["best_images_per_s"] / result["reference"]["best_images_per_s"],
                                        3)}
        for name, _, _ in variants[1:]}
    graphs = getattr(engine.models.base.unet.__dict__.get("forward"), "captures", None)
    if graphs is not None:
        result["cuda_graphs_captured"] = graphs
    if args.ready:
        result["ready_s"]["fresh_process"] = ready_times(args, argv)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if same["ok"] else 1


def _driver() -> str | None:
    from sdxl_bento.gpu.thermal import NvmlSource

    nvml = NvmlSource.open()
    return nvml.driver_version() if nvml else None


if __name__ == "__main__":
    sys.exit(main())
