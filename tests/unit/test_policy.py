"""policy: a tier's limits on the typed request that runs, and who may use what."""

from __future__ import annotations

import pytest

from sdxl_bento.core.policy import (
    DEFAULT_TIERS,
    OPEN_PRINCIPAL,
    Principal,
    check_size,
    max_pixels,
    may_use,
    owner_of,
    police,
)
from sdxl_bento.errors import Forbidden
from sdxl_bento.schemas import GenerateRequest, Img2ImgRequest, RefineRequest

FREE = Principal("alice", DEFAULT_TIERS["free"], "abcd1234")
PREMIUM = Principal("boss", DEFAULT_TIERS["premium"], "dcba4321")
OPERATOR = Principal("ops", DEFAULT_TIERS["standard"], "00000000", operator=True)


def generate(**fields) -> GenerateRequest:
    return GenerateRequest.model_validate({"prompt": "a fox", **fields})


@pytest.mark.parametrize("steps", [100, "100", 1e2, 100.0, "1e2"])
def test_numbers_in_any_spelling_are_policed_as_the_number_that_runs(steps):
    try:
        req = generate(steps=steps)
    except Exception:  # pydantic refuses "1e2" for an int: refused is fine too, it never runs
        return
    assert req.steps == 100
    with pytest.raises(Forbidden) as info:
        police(FREE, req)
    assert info.value.details["limit"] == "max_steps" and "steps 100" in info.value.message


def test_each_limit_names_itself():
    cases = [({"width": "1536", "height": 1024.0}, "max_pixels"), ({"num_images": "4"}, "max_images"),
             ({"refine": "ensemble"}, "refiner_allowed"), ({"safety_check": False}, "safety_optional")]
    for fields, limit in cases:
        with pytest.raises(Forbidden) as info:
            police(FREE, generate(**fields))
        assert info.value.details["limit"] == limit and info.value.details["tier"] == "free"


OK = {"width": 1024, "height": 1024, "steps": 40, "num_images": 2}


@pytest.mark.parametrize("changes, message, limit", [
    ({"width": 1024, "height": 1032}, "1024x1032 (1056768 pixels) is above the free tier's limit of 1048576 pixels",
     "max_pixels"),
    ({"steps": 80}, "steps 80 is above the free tier's limit of 40", "max_steps"),
    ({"num_images": 3}, "num_images 3 is above the free tier's limit of 2", "max_images"),
    ({"refine": "ensemble"}, "the free tier may not use the refiner", "refiner_allowed"),
    ({"safety_check": False}, "the free tier may not turn off the safety check", "safety_optional"),
])
def test_the_default_free_tier_names_the_limit(changes, message, limit):
    free = Principal("alice", DEFAULT_TIERS["free"], "")
    police(free, generate(**OK))
    with pytest.raises(Forbidden) as err:
        police(free, generate(**{**OK, **changes}))
    assert err.value.status == 403 and err.value.message == message
    assert err.value.body()["error"]["limit"] == limit and err.value.body()["error"]["tier"] == "free"


def test_open_and_premium_allow_everything_the_api_does():
    for principal in (OPEN_PRINCIPAL, PREMIUM):
        police(principal, generate(width=1536, height=1536, steps=100, num_images=8, refine="ensemble",
                                   safety_check=False))


def test_admission_says_cost_priority_and_deadline():
    admission = police(PREMIUM, generate(num_images=3))
    assert (admission.images, admission.priority, admission.deadline_s) == (3, 10, 600)
    assert police(PREMIUM, generate(), deadline_s=5).deadline_s == 5
    assert police(PREMIUM, generate(), deadline_s=10_000).deadline_s == 600  # only shorter deadlines are honoured


def test_refine_needs_the_refiner_and_image_to_image_sizes_are_checked_when_known():
    with pytest.raises(Forbidden):
        police(FREE, RefineRequest(prompt="x", image_id="7f1f5c55-9d7b-4b0e-9b0a-3d3c7e5e2a10"))
    sized = Img2ImgRequest(prompt="x", image_id="7f1f5c55-9d7b-4b0e-9b0a-3d3c7e5e2a10", width=1536, height=1536)
    with pytest.raises(Forbidden):
        police(FREE, sized)
    police(FREE, Img2ImgRequest(prompt="x", image_id="7f1f5c55-9d7b-4b0e-9b0a-3d3c7e5e2a10"))  # size from the image
    with pytest.raises(Forbidden):
        check_size(FREE.tier, 1536, 1024)
    assert max_pixels(FREE.tier, 1536 * 1536) == 1024 * 1024


def test_owners():
    assert may_use(OPEN_PRINCIPAL, "anyone") and may_use(OPEN_PRINCIPAL, None)
    assert may_use(FREE, "alice") and not may_use(FREE, "bob") and not may_use(FREE, None)
    assert may_use(OPERATOR, "alice") and may_use(OPERATOR, None)
    assert owner_of(FREE) == "alice" and owner_of(OPEN_PRINCIPAL) is None
