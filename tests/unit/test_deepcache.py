"""DeepCache on the tiny SDXL base and refiner: real pipelines, random weights, CPU float32."""

import gc
import weakref
from contextlib import contextmanager

import pytest
import torch

from sdxl_bento.gpu.deepcache import deep_cache
from sdxl_bento.store.synth import build_pipelines

SIZE, STEPS = 128, 6
# Relative error at interval 3 over 6 steps, measured on the tiny model: 0.020 to 0.032 over seeds 1-4 for
# the base's final latents, 0.003 for the refiner's change to its input. A sanity bound with a wide margin:
# the random tiny UNet leans little on its deep path (zeroing the reused features instead gives 0.046), so
# the wiring itself is checked exactly by test_cached_call_on_same_input_reproduces_the_full_call.
MAX_REL_ERROR = 0.1


@pytest.fixture(scope="module")
def pipes():
    base, refiner = build_pipelines("tiny", refiner=True, seed=0)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


@pytest.fixture(scope="module")
def base(pipes):
    return pipes[0]


def generate(pipe, interval=None, seed=1, **kw):
    """Final latents of a text-to-image call; with ``interval``, inside a deep cache block."""
    args = dict(prompt="a cat", width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=5.0,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **kw)
    if interval is None:
        return pipe(**args).images, None
    with deep_cache(pipe.unet, interval) as stats:
        latents = pipe(**args).images
    return latents, stats


def rel_error(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


def unet_inputs(unet, batch=2, size=16, seed=0):
    """Positional and keyword arguments for calling the UNet directly, as the pipelines do."""
    cfg = unet.config
    n_ids = 6
    pooled = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
    g = torch.Generator("cpu").manual_seed(seed)
    sample = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    return (sample, torch.tensor(500.0)), dict(
        encoder_hidden_states=torch.randn(batch, 77, cfg.cross_attention_dim, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=g),
                           "time_ids": torch.randn(batch, n_ids, generator=g)},
        return_dict=False,
    )


@contextmanager
def call_counts(modules):
    """Counts calls of each named module (forward hooks owned by the test)."""
    counts = dict.fromkeys(modules, 0)
    handles = []
    for name, module in modules.items():
        def hook(mod, args, out, name=name):
            counts[name] += 1
        handles.append(module.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def patches(unet):
    """Instance-level forwards and hooks on the UNet and its modules: all should be gone after a block."""
    forwards = [name for name, m in unet.named_modules() if "forward" in m.__dict__]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())
    return forwards, hooks


def test_interval_one_is_exact(base):
    exact, _ = generate(base)
    latents, stats = generate(base, interval=1)
    assert (stats.full_steps, stats.cached_steps) == (STEPS, 0)
    assert torch.equal(latents, exact)


def test_interval_three_is_close_and_deterministic(base):
    exact, _ = generate(base)
    latents, stats = generate(base, interval=3)
    assert (stats.full_steps, stats.cached_steps) == (2, 4)
    assert stats.cached_fraction == pytest.approx(4 / 6)
    error = rel_error(latents, exact)
    assert 1e-4 < error < MAX_REL_ERROR
    again, _ = generate(base, interval=3)
    assert torch.equal(again, latents)
    # Larger intervals reuse staler features.
    coarser, stats = generate(base, interval=STEPS)
    assert (stats.full_steps, stats.cached_steps) == (1, STEPS - 1)
    assert rel_error(coarser, exact) > error


def test_cached_steps_skip_the_deep_modules(base):
    unet = base.unet
    deep = {
        "down_blocks[0].downsampler": unet.down_blocks[0].downsamplers[0].conv,
        "down_blocks[1]": unet.down_blocks[1].resnets[0],
        "mid_block": unet.mid_block.resnets[0],
        "up_blocks[0]": unet.up_blocks[0].resnets[0],
    }
    shallow = {
        "conv_in": unet.conv_in,
        "down_blocks[0]": unet.down_blocks[0].resnets[0],
        "up_blocks[-1]": unet.up_blocks[-1].resnets[0],
        "conv_out": unet.conv_out,
    }
    with call_counts({**deep, **shallow}) as counts:
        _, stats = generate(base, interval=3)
    assert (stats.full_steps, stats.cached_steps) == (2, 4)
    assert counts == {**dict.fromkeys(deep, 2), **dict.fromkeys(shallow, STEPS)}


@pytest.mark.parametrize("freeu", [False, True], ids=["plain", "freeu"])
def test_cached_call_on_same_input_reproduces_the_full_call(base, freeu):
    """With unchanged inputs the deep features are unchanged, so a cached call must be exact. FreeU scales the
    last up block's input in place (on the tiny UNet): the kept features must not compound."""
    unet = base.unet
    args, kwargs = unet_inputs(unet)
    if freeu:
        base.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        with torch.no_grad():
            exact = unet(*args, **kwargs)[0]
            with deep_cache(unet, 4) as stats:
                outs = [unet(*args, **kwargs)[0] for _ in range(4)]
    finally:
        base.disable_freeu()
    assert (stats.full_steps, stats.cached_steps) == (1, 3)
    for out in outs:
        assert torch.equal(out, exact)


def test_exit_restores_the_unet(base):
    unet = base.unet
    before = patches(unet)
    assert before[0] == []
    exact, _ = generate(base)

    kept = []
    with deep_cache(unet, 3) as stats:
        assert patches(unet) != before  # installed inside the block
        handle = unet.mid_block.register_forward_hook(lambda m, a, out: kept.append(weakref.ref(out)))
        generate(base)
        handle.remove()
    assert stats.full_steps == 2 and patches(unet) == before
    gc.collect()
    assert kept and all(ref() is None for ref in kept)  # no cached tensor outlives the block
    assert torch.equal(generate(base)[0], exact)

    def fail(pipe, step, timestep, callback_kwargs):
        if step == 2:  # after one full and two cached steps
            raise RuntimeError("stop")
        return callback_kwargs

    kept.clear()
    with pytest.raises(RuntimeError, match="stop"), deep_cache(unet, 3) as stats:
        handle = unet.mid_block.register_forward_hook(lambda m, a, out: kept.append(weakref.ref(out)))
        try:
            generate(base, callback_on_step_end=fail)
        finally:
            handle.remove()
    assert (stats.full_steps, stats.cached_steps) == (1, 2)
    assert patches(unet) == before
    gc.collect()
    assert kept and all(ref() is None for ref in kept)
    assert torch.equal(generate(base)[0], exact)

    # A new block starts with an empty cache: its first call is full, whatever the schedule.
    args, kwargs = unet_inputs(unet)
    with torch.no_grad(), deep_cache(unet, 3) as stats:
        unet(*args, **kwargs)
    assert (stats.full_steps, stats.cached_steps) == (1, 0)


def test_exit_restores_an_existing_instance_forward(base):
    mid = base.unet.mid_block
    calls = []
    original = mid.forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    mid.forward = spy
    try:
        _, stats = generate(base, interval=3)
        assert mid.__dict__["forward"] is spy
        assert len(calls) == stats.full_steps == 2
    finally:
        del mid.forward


def test_shape_change_forces_a_full_step(base):
    unet = base.unet
    args2, kwargs2 = unet_inputs(unet, batch=2)
    args1, kwargs1 = unet_inputs(unet, batch=1)
    args_big, kwargs_big = unet_inputs(unet, batch=1, size=24)
    with torch.no_grad():
        exact1 = unet(*args1, **kwargs1)[0]
        exact_big = unet(*args_big, **kwargs_big)[0]
        with deep_cache(unet, 3) as stats:
            unet(*args2, **kwargs2)  # call 0: full
            first = unet(*args1, **kwargs1)[0]  # call 1: scheduled cached, but the batch differs
            assert (stats.full_steps, stats.cached_steps) == (2, 0)
            second = unet(*args1, **kwargs1)[0]  # call 2: same input as the last full call, cached
            assert (stats.full_steps, stats.cached_steps) == (2, 1)
            # call 3 is scheduled full anyway; call 4 is scheduled cached, but the size differs
            unet(*args1, **kwargs1)
            big = unet(sample=args_big[0], timestep=args_big[1], **kwargs_big)[0]
            assert (stats.full_steps, stats.cached_steps) == (4, 1)
    assert torch.equal(first, exact1)
    assert torch.equal(second, exact1)
    assert torch.equal(big, exact_big)


def test_failed_full_call_is_never_reused(base):
    unet = base.unet
    args, kwargs = unet_inputs(unet)

    def fail(module, inputs, output):
        raise RuntimeError("boom")

    with torch.no_grad():
        exact = unet(*args, **kwargs)[0]
        with deep_cache(unet, 3) as stats:
            handle = unet.up_blocks[0].register_forward_hook(fail)  # after the down and mid blocks were kept
            with pytest.raises(RuntimeError, match="boom"):
                unet(*args, **kwargs)
            handle.remove()
            out = unet(*args, **kwargs)[0]  # scheduled cached, but the cache is incomplete
    assert (stats.full_steps, stats.cached_steps) == (2, 0)
    assert torch.equal(out, exact)


def test_img2img_refiner(pipes):
    base, refiner = pipes
    image, _ = generate(base)

    def refine(interval=None):
        args = dict(prompt="a cat", image=image, strength=0.5, num_inference_steps=2 * STEPS, guidance_scale=5.0,
                    generator=torch.Generator("cpu").manual_seed(2), output_type="latent")
        if interval is None:
            return refiner(**args).images, None
        with deep_cache(refiner.unet, interval) as stats:
            return refiner(**args).images, stats

    exact, _ = refine()
    same, stats = refine(1)
    assert torch.equal(same, exact) and stats.full_steps == STEPS
    latents, stats = refine(3)
    assert (stats.full_steps, stats.cached_steps) == (2, 4)
    # Measured on what the refiner changes: its output starts from the input latents.
    assert 1e-4 < rel_error(latents - image, exact - image) < MAX_REL_ERROR


def test_regional_compilation():
    """``compile_repeated_blocks`` compiles the transformer blocks; deep cache must not care."""
    pipe, _ = build_pipelines("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    expected, _ = generate(pipe, interval=3)
    pipe.unet.compile_repeated_blocks(backend="eager")  # dynamo without a C++ toolchain
    latents, stats = generate(pipe, interval=3)
    assert (stats.full_steps, stats.cached_steps) == (2, 4)
    assert torch.equal(latents, expected)


@pytest.mark.parametrize("interval", [0, -1, 1.5, True])
def test_invalid_interval(base, interval):
    before = patches(base.unet)
    with pytest.raises(ValueError, match="interval"):
        with deep_cache(base.unet, interval):
            pass
    assert patches(base.unet) == before


def test_one_block_per_unet(base):
    with deep_cache(base.unet, 2):
        with pytest.raises(RuntimeError, match="already active"):
            with deep_cache(base.unet, 2):
                pass
