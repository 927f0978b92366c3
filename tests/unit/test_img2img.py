"""Image to image and inpainting on the tiny SDXL. Its VAE has random weights, so decode(encode(x)) is far from x:
closeness to the input is measured on the latents the VAE decodes, against the input's own latents."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_bento.errors import InvalidRequest
from sdxl_bento.gpu.engine import BatchKey, Work, prepare_image, prepare_mask

SIZE = 64
SEED = 4


def key(kind="img2img", strength=0.5, **kw):
    return BatchKey(kind=kind, width=SIZE, height=SIZE, steps=10, guidance_scale=5.0, scheduler="euler",
                    strength=strength, **kw)


def source(shift=0):
    x = np.zeros((SIZE, SIZE, 3), np.uint8)
    x[..., 0] = (np.arange(SIZE)[None, :] * 4 + shift) % 256
    x[..., 1] = np.arange(SIZE)[:, None] * 4
    x[::8, :, 2] = 255
    return Image.fromarray(x)


def left_half_mask():
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, : SIZE // 2] = 255
    return Image.fromarray(mask)


def px(image):
    return np.asarray(image, dtype=np.int16)


@contextmanager
def decoded_latents(loaded):
    """Collects the latents each pipeline call hands to the (shared) VAE decoder."""
    vae, seen = loaded.pipe.vae, []
    decode = vae.decode

    def spy(latents, *args, **kwargs):
        seen.append(latents.detach().clone())
        return decode(latents, *args, **kwargs)

    vae.decode = spy
    try:
        yield seen
    finally:
        del vae.decode


def input_latents(loaded, image, seed=SEED):
    """The latents the pipelines start from: the VAE's sample for ``image`` with the image's generator."""
    pipe = loaded.img2img()
    with torch.no_grad():
        dist = loaded.pipe.vae.encode(pipe.image_processor.preprocess(image)).latent_dist
    return dist.sample(generator=torch.Generator().manual_seed(seed))


def test_prepare_image_and_mask():
    rgba = Image.new("RGBA", (80, 48), (10, 20, 30, 0))
    image = prepare_image(rgba, 64, 32)
    assert image.mode == "RGB" and image.size == (64, 32)
    assert image.getpixel((5, 5)) == (255, 255, 255)  # transparent: white, not the hidden colour
    gray = prepare_image(Image.new("L", (64, 64), 7), 64, 64)
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (7, 7, 7)
    same = Image.new("RGB", (64, 64))
    assert prepare_image(same, 64, 64) is same
    mask = prepare_mask(Image.new("RGB", (32, 32), (255, 255, 255)), 64, 48)
    assert mask.mode == "L" and mask.size == (64, 48) and mask.getpixel((10, 10)) == 255
    with pytest.raises(ValueError):
        prepare_image(same, 0, 64)


def test_img2img_and_inpaint_pipelines_reuse_the_base_modules(engine):
    loaded = engine.manager.ensure("")
    for derived in (loaded.img2img(), loaded.inpaint()):
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            assert getattr(derived, name) is getattr(loaded.pipe, name), name
    assert loaded.img2img() is loaded.img2img()


def test_img2img_follows_the_input_more_the_lower_the_strength(engine):
    loaded = engine.manager.ensure("")
    start = input_latents(loaded, source())
    images, distances = {}, {}
    with decoded_latents(loaded) as seen:
        for strength in (0.2, 0.5, 0.9):
            (images[strength],), = engine.generate([Work(key(strength=strength), "a cat", "", [SEED],
                                                         init_images=[source()])])
            distances[strength] = float((seen[-1] - start).norm() / start.norm())
    assert distances[0.2] < distances[0.5] < distances[0.9]
    assert distances[0.2] < 0.5 * distances[0.5]
    assert images[0.2].size == (SIZE, SIZE)
    assert np.abs(px(images[0.2]) - px(source())).mean() > 1
    assert np.abs(px(images[0.2]) - px(images[0.9])).mean() > 1


def test_img2img_progress_counts_the_steps_strength_leaves(engine):
    seen = []
    engine.generate([Work(key(strength=0.3), "a cat", "", [1], init_images=[source()])],
                    on_step=lambda done, total: seen.append((done, total)))
    assert key(strength=0.3).total_steps() == 3 and seen[-2:] == [(3, 3), (3, 3)]


def test_img2img_batched_equals_one_by_one(engine):
    k = key(strength=0.6)
    works = [Work(k, "a cat", "", [1, 2], init_images=[source(0), source(40)]),
             Work(k, "a dog", "", [3], init_images=[source(80)])]
    batched = [img for images in engine.generate(works) for img in images]
    singles = [engine.generate([Work(k, w.prompt, "", [s], init_images=[img])])[0][0]
               for w in works for s, img in zip(w.seeds, w.init_images)]
    for got, want in zip(batched, singles):
        assert np.abs(px(got) - px(want)).max() <= 1


def test_inpaint_repaints_the_white_of_the_mask_only(engine):
    loaded = engine.manager.ensure("")
    start = input_latents(loaded, source())
    half = SIZE // 16  # latent columns under the mask's white half (latents are 8x smaller)
    with decoded_latents(loaded) as seen:
        (painted,), = engine.generate([Work(key("inpaint", strength=1.0), "a cat", "", [SEED],
                                            init_images=[source()], mask_images=[left_half_mask()])])
        (kept,), = engine.generate([Work(key("inpaint", strength=1.0), "a cat", "", [SEED],
                                         init_images=[source()], mask_images=[Image.new("L", (SIZE, SIZE), 0)])])
    painted_latents, kept_latents = seen
    assert painted.size == (SIZE, SIZE)
    # Outside the mask the latents are the input's own, exactly; inside they are new.
    assert torch.allclose(painted_latents[..., half:], start[..., half:], atol=1e-5)
    assert (painted_latents[..., :half] - start[..., :half]).abs().mean() > 0.5
    # An all-black mask keeps everything: the image is the input as the VAE renders it.
    assert torch.allclose(kept_latents, start, atol=1e-5)
    with torch.no_grad():
        rendered = loaded.img2img().image_processor.postprocess(loaded.pipe.vae.decode(start).sample)[0]
    assert np.abs(px(kept) - px(rendered)).max() <= 1
    # In pixels, the repainted half moved further from that rendering than the kept half.
    change = np.abs(px(painted) - px(rendered)).mean(axis=(0, 2))
    assert change[: SIZE // 2].mean() > 1.2 * change[SIZE // 2:].mean()


def test_inpaint_batched_equals_one_by_one(engine):
    k = key("inpaint", strength=0.8)
    masks = [left_half_mask(), left_half_mask().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    works = [Work(k, "a cat", "", [1, 2], init_images=[source(0), source(40)], mask_images=masks)]
    batched = engine.generate(works)[0]
    singles = [engine.generate([Work(k, "a cat", "", [s], init_images=[img], mask_images=[m])])[0][0]
               for s, img, m in zip([1, 2], works[0].init_images, masks)]
    for got, want in zip(batched, singles):
        assert np.abs(px(got) - px(want)).max() <= 1


def test_inputs_of_another_size_and_mode_are_prepared(engine):
    odd = Image.new("RGBA", (90, 50), (200, 10, 10, 255))
    (image,), = engine.generate([Work(key("inpaint"), "a cat", "", [1], init_images=[odd],
                                      mask_images=[Image.new("1", (30, 30), 1)])])
    assert image.size == (SIZE, SIZE)


def test_bad_img2img_and_inpaint_work(engine):
    with pytest.raises(ValueError, match="one init image per seed"):
        engine.generate([Work(key(), "a cat", "", [1, 2], init_images=[source()])])
    with pytest.raises(ValueError, match="one mask image per seed"):
        engine.generate([Work(key("inpaint"), "a cat", "", [1], init_images=[source()])])
    with pytest.raises(InvalidRequest, match="no refiner pass"):
        engine.generate([Work(key(refine="ensemble"), "a cat", "", [1], init_images=[source()])])
    with pytest.raises(InvalidRequest, match="leaves no denoising step"):
        engine.generate([Work(key(strength=0.05), "a cat", "", [1], init_images=[source()])])
