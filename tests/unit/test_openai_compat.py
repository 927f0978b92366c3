"""The OpenAI Images API mapping: field for field, the native limits, errors in OpenAI's shape."""

import base64
import json

import pytest
from pydantic import ValidationError

from sdxl_bento.adapters import openai as oa
from sdxl_bento.core.cache import CachedImage
from sdxl_bento.errors import Overloaded, ServiceError
from sdxl_bento.http.gateway import TooManyRequests
from sdxl_bento.schemas import GenerateRequest


def mapped(**body) -> GenerateRequest:
    return oa.to_generate_request(oa.OpenAIImageRequest.model_validate(body))


def body(response) -> dict:
    return json.loads(response.body)


def test_defaults_and_fields_map_onto_generate_request():
    req = mapped(prompt="a lighthouse")
    assert (req.prompt, req.width, req.height, req.num_images, req.steps) == ("a lighthouse", 1024, 1024, 1, 30)
    assert req.output_format.value == "png" and req.seed is None and req.refine.value == "none"
    req = mapped(prompt="x", model="dall-e-3", n=3, size="1216x832", quality="hd", user="u-1",
                 response_format="b64_json", output_format="webp", output_compression=70, background="opaque",
                 moderation="auto", safety_identifier="s-1")
    assert (req.width, req.height, req.num_images, req.steps) == (1216, 832, 3, 50)
    assert req.output_format.value == "webp" and req.quality == 70


@pytest.mark.parametrize("quality, steps", sorted(oa.QUALITY_STEPS.items()))
def test_quality_sets_the_steps(quality, steps):
    assert mapped(prompt="x", quality=quality).steps == steps


def test_extensions_and_ignored_fields():
    req = mapped(prompt="x", seed=7, steps=4, negative_prompt="blur", guidance_scale=3.5,
                 background="auto", moderation="auto", partial_images=0, not_openai="ignored")
    assert (req.seed, req.steps, req.negative_prompt, req.guidance_scale) == (7, 4, "blur", 3.5)
    assert mapped(prompt="x", quality="hd", steps=12).steps == 12  # steps wins over quality
    assert mapped(prompt="x", n=None, size=None).num_images == 1  # JSON null: the default


@pytest.mark.parametrize("size", [*oa.SDXL_SIZES, "256x256", "512x512", "1792x1024", "auto", "1024X1024"])
def test_sizes(size):
    req = mapped(prompt="x", size=size)
    w, h = (1024, 1024) if size == "auto" else map(int, size.lower().split("x"))
    assert (req.width, req.height) == (w, h)


@pytest.mark.parametrize("fields", [
    {"size": "100x100"}, {"size": "250x256"}, {"size": "2048x2048"}, {"size": "4096x512"}, {"n": 2, "steps": 0},
    {"steps": 101}, {"guidance_scale": 21}, {"seed": -1}, {"seed": 2**32}, {"prompt": "x" * 501},
    {"prompt": "   "}, {"negative_prompt": "y" * 501},
])
def test_limits_are_those_of_generate_request(fields):
    """Whatever GenerateRequest refuses, the OpenAI route refuses, naming the OpenAI parameter."""
    request = oa.OpenAIImageRequest.model_validate({"prompt": "x", **fields})
    native = {"prompt": "x", **{k: v for k, v in fields.items() if k != "size"}}
    if "size" in fields:
        native["width"], native["height"] = request.dimensions
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate(native)
    with pytest.raises(ServiceError) as info:
        oa.to_generate_request(request)
    assert info.value.status == 400
    param = info.value.details["field"]
    assert param in fields or (param == "prompt" and "prompt" in fields)
    answer = oa.from_service_error(info.value)
    assert answer.status_code == 400 and body(answer)["error"]["param"] == param


def test_a_bad_size_names_the_size_and_the_sdxl_sizes():
    with pytest.raises(ServiceError) as info:
        mapped(prompt="x", size="2048x2048")
    err = body(oa.from_service_error(info.value))["error"]
    assert err["param"] == "size" and err["type"] == "invalid_request_error"
    assert err["message"].startswith("size 2048x2048 is not supported") and "the limit is" in err["message"]
    assert "1216x832" in err["message"]


@pytest.mark.parametrize("fields, param, phrase", [
    ({}, "prompt", "Missing required parameter: 'prompt'."),
    ({"prompt": "x", "size": "big"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "x", "n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": "x", "n": 9}, "n", "less than or equal to 8"),
    ({"prompt": "x", "response_format": "gif"}, "response_format", "'url' or 'b64_json'"),
    ({"prompt": "x", "quality": "ultra"}, "quality", "'standard'"),
    ({"prompt": "x", "stream": True}, "stream", "streaming is not supported"),
    ({"prompt": "x", "output_format": "gif"}, "output_format", "'png'"),
])
def test_invalid_bodies_answer_in_openai_shape(fields, param, phrase):
    with pytest.raises(ValidationError) as info:
        oa.OpenAIImageRequest.model_validate(fields)
    answer = oa.from_validation_error(info.value)
    err = body(answer)["error"]
    assert answer.status_code == 400 and set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and phrase in err["message"]


def test_service_errors_in_openai_shape():
    busy = oa.from_service_error(Overloaded("the queue is full", retry_after=7))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "7"
    assert body(busy)["error"] == {"message": "the queue is full", "type": "server_error", "param": None,
                                   "code": "overloaded"}
    limited = oa.from_service_error(TooManyRequests("slow down", retry_after=3, headers={"X-RateLimit-Limit": "5"}))
    assert limited.status_code == 429 and limited.headers["x-ratelimit-limit"] == "5"
    assert body(limited)["error"]["code"] == "rate_limit_exceeded"
    plain = oa.openai_error(404, "no such thing", code="not_found")
    assert body(plain) == {"error": {"message": "no such thing", "type": "invalid_request_error", "param": None,
                                     "code": "not_found"}}


def test_response_shape_b64_and_url():
    images = [CachedImage(id=f"id-{i}", seed=10 + i, media_type="image/png", width=256, height=256,
                          parameters="p", data=f"png{i}".encode()) for i in range(2)]
    out = oa.to_openai_response(images, "a cat", 1700000000, "b64_json", url_for=lambda i: f"http://h/images/{i}")
    assert out == {"created": 1700000000, "data": [
        {"b64_json": base64.b64encode(b"png0").decode(), "revised_prompt": "a cat"},
        {"b64_json": base64.b64encode(b"png1").decode(), "revised_prompt": "a cat"}]}
    out = oa.to_openai_response(images, "a cat", 1, "url", url_for=lambda i: f"http://h/images/{i}")
    assert [d["url"] for d in out["data"]] == ["http://h/images/id-0", "http://h/images/id-1"]


def test_absolute_urls_and_audit_record():
    assert oa.absolute_url("http://127.0.0.1:3000/", "/images/x") == "http://127.0.0.1:3000/images/x"
    assert oa.absolute_url("http://h/", "https://cdn.example/images/x") == "https://cdn.example/images/x"
    audit = {"parameters": {"steps": 30}}
    oa.record(audit, oa.OpenAIImageRequest(prompt="x", user="end-user-1", model="dall-e-3"))
    assert audit["parameters"]["user"] == "end-user-1" and audit["parameters"]["steps"] == 30
    assert audit["parameters"]["api"] == "openai"


def test_wire_model_accepts_anything_with_the_same_fields():
    wire = oa.OpenAIImageWire.model_validate({"prompt": 5, "n": "many", "unknown": 1})
    assert set(oa.OpenAIImageWire.model_fields) == set(oa.OpenAIImageRequest.model_fields)
    assert wire.n == "many" and not hasattr(wire, "unknown")


def test_images_withheld_by_the_safety_check():
    kept = CachedImage(id="a", seed=1, media_type="image/png", width=8, height=8, parameters="p", data=b"png")
    withheld = CachedImage(id="", seed=2, media_type="image/png", width=8, height=8, parameters="p", data=b"",
                           finish_reason="content_filtered")
    out = oa.to_openai_response([kept, withheld], "x", 1, "url", url_for=lambda i: f"http://h/images/{i}")
    assert out["data"] == [{"url": "http://h/images/a", "revised_prompt": "x"}]
    with pytest.raises(ServiceError) as info:
        oa.to_openai_response([withheld, withheld], "x", 1, "b64_json", url_for=str)
    err = body(oa.from_service_error(info.value))["error"]
    assert err["code"] == "content_policy_violation" and "all 2 images were withheld" in err["message"]
