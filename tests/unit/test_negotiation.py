"""Accept and Prefer on the native generation routes."""

from __future__ import annotations

import pytest

from sdxl_bento.errors import NotAcceptable
from sdxl_bento.http.negotiation import choose, negotiate, prefers_async
from sdxl_bento.schemas import GenerateRequest


def req(**fields):
    return GenerateRequest(prompt="a cat", **fields)


@pytest.mark.parametrize("accept, chosen", [
    (None, "application/json"), ("*/*", "application/json"), ("application/json", "application/json"),
    ("image/webp", "image/webp"), ("image/*", "image/png"), ("image/jpeg;q=0.5, application/json;q=0.4", "image/jpeg"),
    ("application/json;q=0.2, image/png", "image/png"), ("text/html, image/*;q=0.1", "image/png"),
])
def test_generate(accept, chosen):
    assert negotiate("/generate", {"accept": accept} if accept else {}, [req()])["media_type"] == chosen


def test_txt2img_answers_its_image_unless_json_is_preferred():
    assert negotiate("/txt2img", {}, [req()])["format"] == "png"
    assert negotiate("/txt2img", {"accept": "application/json"}, [req()])["media_type"] == "application/json"
    assert negotiate("/txt2img", {"accept": "image/jpeg"}, [req()])["format"] == "jpeg"
    # the body names its format: Accept may not ask for another
    assert negotiate("/txt2img", {"accept": "image/*"}, [req(output_format="webp")])["format"] == "webp"
    with pytest.raises(NotAcceptable):
        negotiate("/txt2img", {"accept": "image/jpeg"}, [req(output_format="png")])


@pytest.mark.parametrize("path, accept, body", [
    ("/generate", "text/html", {}), ("/generate", "image/png", {"num_images": 2}), ("/img2img", "image/png", None),
    ("/jobs/submit", "image/webp", {}), ("/generate", "application/json;q=0", {}),
])
def test_406(path, accept, body):
    with pytest.raises(NotAcceptable) as caught:
        negotiate(path, {"accept": accept}, [req(**(body or {}))])
    assert caught.value.status == 406


def test_prefer_respond_async():
    assert prefers_async("respond-async") and prefers_async("wait=10, respond-async") and prefers_async(
        "Respond-Async; foo=bar")
    assert not prefers_async("return=minimal") and not prefers_async(None)
    decided = negotiate("/generate", {"prefer": "respond-async", "accept": "application/json"}, [req()])
    assert decided["async"] and decided["media_type"] == "application/json"
    with pytest.raises(NotAcceptable):  # an async answer is JSON
        negotiate("/generate", {"prefer": "respond-async", "accept": "image/png"}, [req()])
    assert not negotiate("/txt2img", {"prefer": "respond-async"}, [req()])["async"]  # not an async route


def test_choose_ties_keep_the_routes_order():
    assert choose(["application/json", "image/png"], "*/*") == "application/json"
    assert choose(["image/png", "application/json"], "*/*") == "image/png"
    assert choose(["application/json"], "image/png") is None
