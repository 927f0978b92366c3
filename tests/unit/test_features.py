"""Hires fix, tiling, variation seeds, clip skip, DDIM eta and "only masked" inpainting on the tiny synthetic SDXL
(real diffusers pipelines, random weights): each changes the image against the same request without it, and
does what it says, checked structurally (sizes, seams, the pixels outside a mask). Then the request side: the
work and parameters ``Generation`` makes of the native fields, and the tier policy of a hires pass."""

import numpy as np
import pytest
from PIL import Image

from sdxl_bento.core.generation import Generation, ModelInfo
from sdxl_bento.core.policy import DEFAULT_TIERS, Principal, police
from sdxl_bento.core.styles import StyleBook
from sdxl_bento.errors import Forbidden, InvalidRequest
from sdxl_bento.gpu import features
from sdxl_bento.jobs import BatchKey, Hires, Work
from sdxl_bento.schemas import GenerateRequest, HiresSpec

KEY = BatchKey(kind="txt2img", width=256, height=256, steps=3, guidance_scale=5.0, scheduler="euler")


def px(image):
    return np.asarray(image, dtype=np.int16)


def diff(a, b):
    return np.abs(px(a) - px(b)).mean()


def render(engine, key=KEY, seed=1, **work):
    ((image,),) = engine.generate([Work(key, "a lighthouse", "", [seed], **work)])
    return image


def with_(**fields):
    return BatchKey(**{**KEY.__dict__, **fields})


@pytest.fixture(scope="module")
def plain(engine):
    return render(engine)


@pytest.mark.parametrize("upscaler", ["latent", "latent-antialiased", "latent-bicubic", "latent-nearest-exact",
                                      "lanczos", "nearest"])
def test_hires_fix_makes_the_larger_image_in_two_passes(engine, plain, upscaler):
    hires = Hires(upscale_width=512, upscale_height=512, width=512, height=384, steps=4, strength=0.5,
                  upscaler=upscaler, scheduler="euler")
    seen = []
    ((image,),) = engine.generate([Work(with_(hires=hires), "a lighthouse", "", [1])],
                                  on_step=lambda done, total: seen.append((done, total)))
    assert image.size == (512, 384)  # enlarged, then centre-cropped to the target
    assert seen[-1] == (3 + 2, 3 + 2)  # both passes counted: 3 steps, then 4 x 0.5
    small = np.asarray(plain.resize((512, 512), Image.Resampling.LANCZOS).crop((0, 64, 512, 448)), dtype=np.int16)
    assert np.abs(px(image) - small).mean() > 1  # the second pass redid it, not a plain resize


def test_hires_prompt_and_sampler_change_the_second_pass(engine):
    hires = Hires(512, 512, 512, 512, 4, 0.6, "latent", "euler")
    base = render(engine, with_(hires=hires))
    assert diff(base, render(engine, with_(hires=hires), hires_prompt="a red lighthouse")) > 0.1
    assert diff(base, render(engine, with_(hires=Hires(512, 512, 512, 512, 4, 0.6, "latent", "ddim")))) > 0.5


def seam(image):
    """How much the wrap-around edges differ, against how much neighbouring columns and rows differ inside."""
    p = px(image)
    wrap = np.abs(p[:, 0] - p[:, -1]).mean() + np.abs(p[0] - p[-1]).mean()
    inner = np.abs(np.diff(p, axis=1)).mean() + np.abs(np.diff(p, axis=0)).mean()
    return wrap / inner


def test_tiling_changes_the_image_and_makes_its_edges_meet(engine, plain):
    tiled = render(engine, with_(tiling=True))
    assert diff(tiled, plain) > 1
    assert seam(tiled) < seam(plain)
    # the padding goes back to zeros for the next request
    assert diff(render(engine), plain) == 0


def test_circular_restores_every_padding_mode():
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Conv2d(3, 3, 3, padding=1,
                                                                                    padding_mode="reflect"))
    with features.circular(net, None) as changed:
        assert changed == 2 and [m.padding_mode for m in net] == ["circular", "circular"]
    assert [m.padding_mode for m in net] == ["zeros", "reflect"]


def test_variation_seeds_mix_the_noise(engine, plain):
    varied = render(engine, subseeds=[7], subseed_strength=0.3)
    assert diff(varied, plain) > 1
    assert diff(varied, render(engine, subseeds=[7], subseed_strength=0.3)) == 0  # deterministic
    assert diff(render(engine, subseeds=[7], subseed_strength=0.0), plain) == 0  # strength 0: the seed's own
    stronger = render(engine, subseeds=[7], subseed_strength=0.9)
    other = render(engine, seed=7)
    assert diff(stronger, other) < diff(varied, other)  # the closer to 1, the closer to the subseed's image


def test_slerp_ends():
    import torch

    a, b = torch.randn(4, 8, 8), torch.randn(4, 8, 8)
    assert torch.allclose(features.slerp(0.0, a, b), a, atol=1e-5)
    assert torch.allclose(features.slerp(1.0, a, b), b, atol=1e-5)


def test_clip_skip_changes_the_image_and_is_bounded_by_the_text_encoders(engine, plain):
    assert diff(render(engine, with_(clip_skip=2)), plain) > 0.5
    with pytest.raises(InvalidRequest, match="clip_skip: 3 is more than") as info:
        render(engine, with_(clip_skip=3))  # the tiny text encoders have 2 layers
    assert info.value.details["field"] == "clip_skip"


def test_ddim_eta_changes_the_image(engine):
    ddim = with_(scheduler="ddim")
    assert diff(render(engine, with_(scheduler="ddim", eta=0.5)), render(engine, ddim)) > 1
    with pytest.raises(InvalidRequest, match="DDIM"):
        render(engine, with_(eta=0.5))


def test_only_masked_inpainting_keeps_every_pixel_outside_the_mask(engine, plain):
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (96, 96, 160, 160))
    key = BatchKey(kind="inpaint", width=256, height=256, steps=4, guidance_scale=5.0, scheduler="euler",
                   strength=0.99)
    whole = render(engine, key, init_images=[plain], mask_images=[mask])
    masked = render(engine, BatchKey(**{**key.__dict__, "mask_padding": 16}), init_images=[plain], mask_images=[mask])
    outside = np.asarray(mask) == 0
    assert np.abs(px(masked) - px(plain))[outside].max() == 0
    assert np.abs(px(masked) - px(plain))[~outside].mean() > 5 and diff(masked, whole) > 1


# -- the request side ---------------------------------------------------------------------------------
def generation(styles=None):
    return Generation(None, None, ModelInfo("sdxl-base:v1", None, True), timeout=10, styles=styles)


def test_native_fields_become_the_batch_key_and_the_parameters(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text('name,prompt,negative_prompt\nnoir,"{prompt}, film noir",colour\n')
    gen = generation(StyleBook(path))
    req = gen.styled(GenerateRequest(prompt="a cat", width=256, height=256, steps=10, seed=5, tiling=True,
                                     clip_skip=2, subseed=40, subseed_strength=0.25, num_images=2, styles=["noir"],
                                     hires={"scale": 2, "steps": 6, "denoising_strength": 0.5, "prompt": "a big cat",
                                            "upscaler": "lanczos"}))
    assert (req.prompt, req.negative_prompt) == ("a cat, film noir", "colour")
    work = gen.work(req)
    assert work.key.hires == Hires(512, 512, 512, 512, 6, 0.5, "lanczos", "euler", has_negative=True)
    assert (work.key.tiling, work.key.clip_skip, work.subseeds, work.subseed_strength) == (True, 2, [40, 41], 0.25)
    assert work.hires_prompt == "a big cat" and work.key.total_steps() == 13
    params = gen.parameters(req, work.key, 5, 40)
    assert params["Size"] == "256x256" and params["Hires upscale"] == 2 and params["Hires steps"] == 6
    assert (params["Hires upscaler"], params["Denoising strength"], params["Hires prompt"]) == (
        "lanczos", 0.5, "a big cat")
    assert (params["Tiling"], params["Clip skip"], params["Styles"]) == ("True", 2, "noir")
    assert (params["Variation seed"], params["Variation seed strength"]) == (40, 0.25)
    with pytest.raises(InvalidRequest, match="styles: no style named 'pop'"):
        gen.styled(GenerateRequest(prompt="x", styles=["pop"]))


def test_hires_schema_limits():
    with pytest.raises(ValueError, match="hires: the hires size 3072x3072"):
        GenerateRequest(prompt="x", width=1536, height=1536, hires={"scale": 2})
    with pytest.raises(ValueError, match="hires: a hires pass and the refiner do not combine"):
        GenerateRequest(prompt="x", width=256, height=256, refine="ensemble", hires={})
    with pytest.raises(ValueError, match="eta applies to the DDIM sampler only"):
        GenerateRequest(prompt="x", eta=0.5)
    assert HiresSpec(width=1024, height=512).plan(512, 512) == (1024, 1024, 1024, 512)
    assert HiresSpec(scale=1.5).plan(832, 1216) == (1248, 1824, 1248, 1824)


def test_a_hires_pass_counts_its_pixels_and_steps_against_the_tier():
    free = Principal("f", DEFAULT_TIERS["free"], "k")  # 1024x1024, 40 steps
    police(free, GenerateRequest(prompt="x", width=512, height=512, steps=20, hires={"scale": 2, "steps": 20,
                                                                                    "denoising_strength": 0.5}))
    with pytest.raises(Forbidden, match="the hires pass's 1536x1536") as info:
        police(free, GenerateRequest(prompt="x", width=768, height=768, steps=20, hires={"scale": 2}))
    assert info.value.details["limit"] == "max_pixels"
    with pytest.raises(Forbidden, match=r"steps 30 \+ the hires pass's 21 = 51") as info:
        police(free, GenerateRequest(prompt="x", width=512, height=512, steps=30, hires={"denoising_strength": 0.7}))
    assert info.value.details["limit"] == "max_steps"
