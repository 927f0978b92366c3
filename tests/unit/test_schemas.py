import pytest
from pydantic import ValidationError

from sdxl_bento import schemas
from sdxl_bento.schemas import GenerateRequest, RefineRequest


def errors(**fields):
    with pytest.raises(ValidationError) as info:
        GenerateRequest(**fields)
    return str(info.value)


def test_defaults_and_seed_is_always_chosen():
    req = GenerateRequest(prompt="a lighthouse")
    assert (req.width, req.height, req.steps, req.num_images) == (1024, 1024, 30, 1)
    seeds = req.seeds(3)
    assert len(seeds) == 3 and seeds[1] == (seeds[0] + 1) % 2**32
    assert GenerateRequest(prompt="x", seed=2**32 - 1).seeds(2) == [2**32 - 1, 0]


@pytest.mark.parametrize("fields, message", [
    ({"prompt": ""}, "at least 1 character"),
    ({"prompt": "   "}, "prompt must not be blank"),
    ({"prompt": "x" * 501}, "prompt is 501 characters; the limit is 500"),
    ({"prompt": "x", "negative_prompt": "y" * 501}, "negative_prompt is 501 characters"),
    ({"prompt": "x", "width": 250}, "multiple of 8"),
    ({"prompt": "x", "width": 128}, "greater than or equal to 256"),
    ({"prompt": "x", "height": 2056}, "less than or equal to 2048"),
    ({"prompt": "x", "width": 2048, "height": 2048}, "the limit is 2359296 pixels"),
    ({"prompt": "x", "steps": 0}, "greater than or equal to 1"),
    ({"prompt": "x", "steps": 101}, "less than or equal to 100"),
    ({"prompt": "x", "guidance_scale": 21}, "less than or equal to 20"),
    ({"prompt": "x", "num_images": 9}, "less than or equal to 8"),
    ({"prompt": "x", "seed": -1}, "greater than or equal to 0"),
    ({"prompt": "x", "seed": 2**32}, "less than or equal to 4294967295"),
    ({"prompt": "x", "scheduler": "dpm_fast"}, "euler"),
    ({"prompt": "x", "refine": "both"}, "ensemble"),
    ({"prompt": "x", "high_noise_frac": 1.0}, "less than or equal to 0.99"),
    ({"prompt": "x", "output_format": "gif"}, "png"),
    ({"prompt": "x", "quality": 0}, "greater than or equal to 1"),
    ({"prompt": "x", "colour": "red"}, "Extra inputs are not permitted"),
])
def test_every_limit_has_a_readable_message(fields, message):
    assert message in errors(**fields)


def test_limits_are_configurable_without_changing_the_shared_models():
    bound = schemas.Requests.with_limits(schemas.Limits(max_prompt_chars=10, max_pixels=512 * 512))
    with pytest.raises(ValidationError, match="the limit is 10"):
        bound.generate(prompt="x" * 11)
    with pytest.raises(ValidationError, match="the limit is 262144 pixels"):
        bound.generate(prompt="x", width=512, height=520)
    assert isinstance(bound.generate(prompt="x" * 10, width=512, height=512), GenerateRequest)
    assert isinstance(bound.inpaint.model_validate({"prompt": "x", "image": "a", "mask": "b"}), schemas.Img2ImgRequest)
    assert bound.generate.__name__ == "GenerateRequest"  # the same name in the OpenAPI document
    GenerateRequest(prompt="x" * 11, width=512, height=520)  # the shared model keeps the defaults


def test_refine_request_needs_a_uuid():
    with pytest.raises(ValidationError, match="UUID"):
        RefineRequest(prompt="x", image_id="../../etc/passwd")
    RefineRequest(prompt="x", image_id="6f1c1f8e-2a55-4d65-9d62-8f2b7f7f6a10")
