"""The engine on the tiny synthetic SDXL (real diffusers pipelines, random weights, CPU float32)."""

import numpy as np
import pytest

from sdxl_bento.gpu.engine import BatchKey, Work
from sdxl_bento.samplers import BY_NAME as SAMPLERS

KEY = BatchKey(kind="txt2img", width=256, height=256, steps=4, guidance_scale=5.0, scheduler="euler_a")


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_same_seed_same_image_other_seed_other_image(engine):
    (a,), = engine.generate([Work(KEY, "a red bicycle", "", [11])])
    (b,), = engine.generate([Work(KEY, "a red bicycle", "", [11])])
    (c,), = engine.generate([Work(KEY, "a red bicycle", "", [12])])
    assert a.size == (256, 256)
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 5


def test_batched_equals_one_by_one(engine):
    """An image depends on its own prompt and seed only, not on its batch mates. On the CPU, BLAS sums in
    an order that depends on the batch size, so float32 results may differ in the last bit: at most 1/255."""
    works = [Work(KEY, "a cat", "", [1, 2]), Work(KEY, "a dog on a skateboard", "", [3])]
    batched = engine.generate(works)
    assert [len(images) for images in batched] == [2, 1]
    singles = [engine.generate([Work(KEY, w.prompt, "", [s])])[0][0] for w in works for s in w.seeds]
    for got, want in zip([img for images in batched for img in images], singles):
        assert np.abs(pixels(got) - pixels(want)).max() <= 1


def test_negative_prompts_differ_from_none(engine):
    key = BatchKey(**{**KEY.__dict__, "has_negative": True})
    (with_negative,), = engine.generate([Work(key, "a cat", "blurry", [5])])
    (without,), = engine.generate([Work(KEY, "a cat", "", [5])])
    assert np.abs(pixels(with_negative) - pixels(without)).mean() > 1


@pytest.mark.parametrize("scheduler", list(SAMPLERS))
@pytest.mark.parametrize("refine", ["none", "ensemble", "img2img"])
def test_every_scheduler_and_refine_mode_runs(engine, scheduler, refine):
    key = BatchKey(kind="txt2img", width=256, height=256, steps=4, guidance_scale=5.0, scheduler=scheduler,
                   refine=refine)
    seen = []
    (image,), = engine.generate([Work(key, "a lighthouse", "", [3])], on_step=lambda d, t: seen.append((d, t)))
    assert image.size == (256, 256)
    assert seen and seen[-1] == (key.total_steps(), key.total_steps())
    assert all(done <= total for done, total in seen)


def test_refine_a_given_image(engine):
    (source,), = engine.generate([Work(KEY, "a house", "", [9])])
    key = BatchKey(kind="refine", width=256, height=256, steps=10, guidance_scale=5.0, scheduler="euler",
                   strength=0.5)
    (refined,), = engine.generate([Work(key, "a house, detailed", "", [9], init_images=[source])])
    assert refined.size == source.size
    assert np.abs(pixels(refined) - pixels(source)).mean() > 1


def test_step_callback_can_abort(engine):
    class Stop(Exception):
        pass

    def stop(done, total):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        engine.generate([Work(KEY, "a cat", "", [1])], on_step=stop)


def test_refiner_is_shared_not_copied(engine):
    models = engine.models
    assert models.refiner.text_encoder_2 is models.base.text_encoder_2
    assert models.refiner.vae is models.base.vae
    assert models.synthetic and models.device == "cpu"


def test_checkpoint_and_lora_set_are_part_of_the_batch_key():
    """Works for another checkpoint or another LoRA set never share a batch (the scheduler batches equal keys)."""
    assert KEY.model == "" and KEY.loras == ()
    assert BatchKey(**{**KEY.__dict__, "model": "photo"}) != KEY
    with_lora = BatchKey(**{**KEY.__dict__, "loras": (("style", 0.8),)})
    assert with_lora != KEY and with_lora != BatchKey(**{**KEY.__dict__, "loras": (("style", 0.5),)})
    assert with_lora == BatchKey(**{**KEY.__dict__, "loras": (("style", 0.8),)}) and hash(with_lora)
    for kind in ("img2img", "inpaint"):
        assert BatchKey(**{**KEY.__dict__, "kind": kind, "steps": 30, "strength": 0.5}).total_steps() == 15


def test_unknown_scheduler_is_a_clear_error(engine):
    from sdxl_bento.errors import InvalidRequest

    key = BatchKey(**{**KEY.__dict__, "scheduler": "dpm_fast", "width": 64, "height": 64})
    with pytest.raises(InvalidRequest, match="unknown scheduler 'dpm_fast'"):
        engine.generate([Work(key, "a cat", "", [1])])


def test_each_worker_takes_its_own_gpu(monkeypatch):
    """BentoML shows every worker all the GPUs; worker k (1-based) must take the k-th (checked without a GPU)."""
    import torch
    from bentoml import server_context

    from sdxl_bento.gpu.engine import pick_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for worker, device in [(1, 0), (2, 1), (3, 0)]:
        monkeypatch.setattr(server_context, "worker_index", worker)
        assert pick_device("auto") == ("cuda", torch.float16)
        assert chosen[-1] == device
    assert pick_device("cpu") == ("cpu", torch.float32)
