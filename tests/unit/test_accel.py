"""Speed without changing the function: regional compilation with a persistent cache, CUDA graphs, the VAE
decode copy. Real tiny SDXL pipelines; the CUDA-graph test needs a GPU and is skipped on the CPU."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdxl_bento.gpu.accel import Acceleration, Decoder, UNetGraphs, eager, graph_inputs, graphs_of, signature
from sdxl_bento.gpu.engine import BatchKey, Engine, Work

KEY = BatchKey(kind="txt2img", width=256, height=256, steps=3, guidance_scale=5.0, scheduler="euler")


def pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def pipes():
    from sdxl_bento.store.synth import build_pipelines

    base, refiner = build_pipelines("tiny", refiner=True, seed=0)
    base.set_progress_bar_config(disable=True)
    return base, refiner


def test_resolve_turns_speedups_on_for_cuda_only():
    assert Acceleration.resolve("cpu") == Acceleration(compile="off", cuda_graphs=False, vae_dtype=None)
    cuda = Acceleration.resolve("cuda")
    assert (cuda.compile, cuda.cuda_graphs, cuda.vae_dtype) == ("regional", True, torch.bfloat16)
    off = Acceleration.resolve("cuda", compile="off", cuda_graphs="off", vae_dtype="pipeline")
    assert (off.compile, off.cuda_graphs, off.vae_dtype) == ("off", False, None)
    assert Acceleration.resolve("cpu", compile="regional").compile == "regional"
    with pytest.raises(ValueError, match="CUDA"):
        Acceleration.resolve("cpu", cuda_graphs="on")


def test_decoder_in_the_pipeline_dtype_gives_the_pipelines_pixels(pipes):
    base, _ = pipes
    with torch.inference_mode():
        latents = base(prompt="a cat", width=256, height=256, num_inference_steps=2, output_type="latent",
                       generator=torch.Generator().manual_seed(3)).images
        theirs = base.vae.decode(latents / base.vae.config.scaling_factor, return_dict=False)[0]
    decoder = Decoder(base.vae, torch.float32)
    assert torch.equal(decoder(latents), theirs)
    assert "encoder" not in decoder.vae._modules and "encoder" in base.vae._modules  # no second encoder
    assert decoder.vae.decoder is not base.vae.decoder
    fast = Decoder(base.vae, torch.bfloat16)
    assert next(fast.vae.parameters()).dtype == torch.bfloat16
    assert next(base.vae.parameters()).dtype == torch.float32  # the pipeline's VAE is untouched
    difference = (fast(latents) - theirs).abs()
    assert 0 < float(difference.max()) < 0.05  # images are in [-1, 1]: under 2% of the range


def test_engine_with_the_bfloat16_decoder_keeps_the_image(bentoml_home, engine):
    from sdxl_bento.store import modelstore as store

    fast = Engine(store.resolve("sdxl-base:latest", "base"), device="cpu",
                  acceleration=Acceleration(vae_dtype=torch.bfloat16))
    (ours,), = fast.generate([Work(KEY, "a red bicycle", "", [4])])
    (plain,), = engine.generate([Work(KEY, "a red bicycle", "", [4])])
    difference = np.abs(pixels(ours) - pixels(plain))
    assert ours.size == plain.size and difference.mean() < 1.0 and difference.max() <= 8


def test_deepcache_through_the_engine_changes_the_image_deterministically(engine):
    key = BatchKey(**{**KEY.__dict__, "steps": 6})
    fast = BatchKey(**{**key.__dict__, "approximation": "deepcache"})
    assert fast != key  # never batched with exact work
    (exact,), = engine.generate([Work(key, "a red bicycle", "", [4])])
    (a,), = engine.generate([Work(fast, "a red bicycle", "", [4])])
    (b,), = engine.generate([Work(fast, "a red bicycle", "", [4])])
    assert np.array_equal(pixels(a), pixels(b))
    assert 0 < np.abs(pixels(a) - pixels(exact)).mean() < 20
    (again,), = engine.generate([Work(key, "a red bicycle", "", [4])])
    assert np.array_equal(pixels(again), pixels(exact))  # nothing left behind


_COMPILE_RUN = r"""
import json, sys, torch
from torch._dynamo.utils import counters
from sdxl_bento.store import modelstore as store
from sdxl_bento.gpu.accel import Acceleration
from sdxl_bento.gpu.engine import BatchKey, Engine, Work
key = BatchKey(kind="txt2img", width=256, height=256, steps=3, guidance_scale=5.0, scheduler="euler")
stored = store.resolve("sdxl-base:latest", "base")
plain = Engine(stored, device="cpu", acceleration=Acceleration())
compiled = Engine(stored, device="cpu", acceleration=Acceleration(compile="regional", compile_cache=sys.argv[1]))
latents = []
for engine in (plain, compiled):
    work = Work(key, "a lighthouse", "", [7])
    pipe = engine.models.base
    pipe.scheduler = engine._scheduler(pipe.scheduler.config, "euler")
    with torch.inference_mode():
        latents.append(pipe(prompt=work.prompt, width=256, height=256, num_inference_steps=3, guidance_scale=5.0,
                            output_type="latent", generator=torch.Generator().manual_seed(7)).images)
    engine.generate([work])  # and through the engine's own path
compiled_blocks = sum(1 for m in compiled.models.base.unet.modules() if getattr(m, "_compiled_call_impl", None))
print(json.dumps({"error": float((latents[1] - latents[0]).norm() / latents[0].norm()),
                  "compiled_blocks": compiled_blocks,
                  "hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def test_regional_compilation_is_the_same_function_and_its_cache_survives_a_restart(bentoml_home, tmp_path):
    """Two processes, one compile cache: the first compiles (misses), the second finds every kernel (hits only).
    Compiled and eager latents agree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR")}
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _COMPILE_RUN, str(tmp_path / "cache")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    for run in runs:
        assert run["compiled_blocks"] > 0
        assert run["error"] < 1e-4
    assert cold["misses"] > 0
    assert warm["hits"] > 0 and warm["misses"] == 0
    assert any((tmp_path / "cache").iterdir())


_BROKEN_COMPILER_RUN = r"""
import logging, sys, torch
logging.basicConfig(level=logging.ERROR)
from sdxl_bento.store import modelstore as store
from sdxl_bento.gpu.accel import Acceleration
from sdxl_bento.gpu.engine import BatchKey, Engine, Work
engine = Engine(store.resolve("sdxl-base:latest", "base"), device="cpu",
                acceleration=Acceleration(compile="regional", compile_cache=sys.argv[1]))
engine.warmup()
unet = engine.models.base.unet
assert engine.acceleration.compile == "off" and engine.manager.acceleration.compile == "off"
assert not any(getattr(m, "_compiled_call_impl", None) for m in unet.modules())
key = BatchKey(kind="txt2img", width=256, height=256, steps=2, guidance_scale=5.0, scheduler="euler")
(image,), = engine.generate([Work(key, "a cat", "", [1])])
print("served", image.size)
"""


def test_a_failing_compiler_leaves_the_engine_serving_eagerly(bentoml_home, tmp_path):
    """No working C++ compiler (CXX=/bin/false, empty compile cache): warm-up logs the failure, drops the
    speed-ups and serves."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR")}, "CXX": "/bin/false"}
    done = subprocess.run([sys.executable, "-c", _BROKEN_COMPILER_RUN, str(tmp_path / "cache")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "served (256, 256)" in done.stdout
    assert "serving without compilation and CUDA graphs" in done.stderr


def test_graph_inputs_take_only_the_plain_cuda_call(pipes):
    base, _ = pipes
    sample = torch.zeros(2, 4, 32, 32)
    ehs = torch.zeros(2, 77, 80)
    added = {"text_embeds": torch.zeros(2, 32), "time_ids": torch.zeros(2, 6)}
    with torch.inference_mode():
        assert graph_inputs((sample, torch.tensor(10.0)), {"encoder_hidden_states": ehs, "added_cond_kwargs": added,
                                                           "return_dict": False}) is None  # CPU tensors
        if torch.cuda.is_available():
            on = {k: v.cuda() for k, v in added.items()}
            args = (sample.cuda(), torch.tensor(10.0).cuda())
            tensors = graph_inputs(args, {"encoder_hidden_states": ehs.cuda(), "added_cond_kwargs": on})
            assert tensors is not None and list(tensors) == ["sample", "timestep", "encoder_hidden_states",
                                                             "text_embeds", "time_ids"]
            assert graph_inputs(args, {"encoder_hidden_states": ehs.cuda(), "added_cond_kwargs": on,
                                       "cross_attention_kwargs": {"scale": 0.5}}) is None
            bigger = dict(tensors, sample=torch.zeros(4, 4, 32, 32, device="cuda"))
            assert signature(bigger) != signature(tensors)


def test_graphs_install_pause_and_fall_back_to_eager_off_cuda(pipes):
    base, _ = pipes
    unet = base.unet
    graphs = UNetGraphs.install(unet)
    try:
        assert graphs_of(unet) is graphs
        with eager(unet, None):
            assert graphs._paused == 1
        assert graphs._paused == 0
        with torch.inference_mode():
            out = base(prompt="a cat", width=256, height=256, num_inference_steps=3, output_type="latent",
                       generator=torch.Generator().manual_seed(1)).images
        assert out.shape == (1, 4, 32, 32) and graphs.captures == 0  # CPU tensors: always eager
    finally:
        del unet.forward
    assert graphs_of(unet) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replays_the_same_unet_function(pipes):
    base, _ = pipes
    base.to("cuda", torch.float16)
    try:
        def run():
            with torch.inference_mode():
                return base(prompt="a cat", width=256, height=256, num_inference_steps=6, output_type="latent",
                            generator=torch.Generator().manual_seed(1)).images.float()

        want = run()
        graphs = UNetGraphs.install(base.unet)
        got = run()
        assert graphs.captures == 1 and graphs.replays == 4  # eager, capture, then 4 replays
        assert float((got - want).norm() / want.norm()) < 1e-2
        again = run()
        assert graphs.captures == 1 and graphs.replays == 10
        assert torch.equal(again, got)
        with eager(base.unet):
            run()
        assert graphs.replays == 10
    finally:
        base.unet.__dict__.pop("forward", None)
        base.to("cpu", torch.float32)
