"""routes: each generation route's body as the typed native requests it runs, errors in the route's shape."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from sdxl_bento.adapters import a1111
from sdxl_bento.adapters import openai as openai_compat
from sdxl_bento.errors import InvalidRequest, native_error
from sdxl_bento.http import routes
from sdxl_bento.schemas import BatchRequest, GenerateRequest, Img2ImgRequest, InpaintRequest, RefineRequest

TABLE = routes.table(
    {"/txt2img": GenerateRequest, "/generate": GenerateRequest, "/refine": RefineRequest, "/img2img": Img2ImgRequest,
     "/inpaint": InpaintRequest}, {"/jobs": GenerateRequest, "/img2img_jobs": Img2ImgRequest,
                                   "/inpaint_jobs": InpaintRequest}, batch=BatchRequest,
    foreign={"/v1/images/generations": routes.Route("/v1/images/generations", openai_compat.parse_body,
                                                    openai_compat.error_response),
             "/sdapi/v1/txt2img": routes.Route("/sdapi/v1/txt2img", a1111.parse_body, a1111.from_error)},
    mounted={"/sdapi/v1": a1111.from_error, "/models": native_error, "/images": native_error})


def parse(path: str, body):
    return TABLE.generation[path].parse(body)


def test_native_bodies_become_typed_requests():
    (req,) = parse("/generate", {"prompt": "x", "steps": "12", "width": 512.0, "num_images": "2"})
    assert (req.steps, req.width, req.num_images) == (12, 512, 2)
    with pytest.raises(ValidationError):
        parse("/generate", {"prompt": "x", "steps": 0})
    with pytest.raises(ValidationError):
        parse("/generate", {"prompt": "x", "caller": {"name": "boss", "deadline_s": 1}})  # only the gateway stamps
    with pytest.raises(ValidationError):
        parse("/generate", ["not", "an", "object"])


def test_batch_items_and_foreign_bodies():
    items = parse("/generate_batch", {"requests": [{"prompt": "a", "steps": "5"}, {"prompt": "b"}]})
    assert [i.steps for i in items] == [5, 30]
    with pytest.raises(InvalidRequest, match="requests.0.caller: set by the server"):
        parse("/generate_batch", {"requests": [{"prompt": "a", "caller": {"name": "boss", "deadline_s": 600}}]})
    (oa,) = parse("/v1/images/generations", {"prompt": "x", "size": "512x768", "n": "3", "quality": "hd"})
    assert (oa.width, oa.height, oa.num_images, oa.steps) == (512, 768, 3, 50)
    (a1,) = parse("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": "2", "n_iter": 2.0, "steps": "20",
                                        "refiner_checkpoint": "r"})
    assert (a1.num_images, a1.steps, a1.refine.value) == (4, 20, "ensemble")
    with pytest.raises(InvalidRequest):
        parse("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 9})


def test_task_routes_and_templates():
    assert TABLE.generation["/jobs/submit"].task and TABLE.generation["/img2img_jobs/submit"].task
    assert TABLE.is_protected("/jobs/status") and TABLE.is_protected("/sdapi/v1/options")
    assert TABLE.is_protected("/images/123") and not TABLE.is_protected("/metrics")
    assert not TABLE.is_protected("/jobsx")
    assert TABLE.template("/sdapi/v1/anything/at/all") == "/sdapi/v1/{path}"
    assert TABLE.template("/jobs/status") == "/jobs/status"
    assert TABLE.template("/jobs/../../etc") == "other"


def test_errors_come_in_each_api_shape():
    try:
        parse("/generate", {"prompt": "x", "steps": 0})
    except ValidationError as exc:
        native = json.loads(TABLE.shape("/generate")(exc).body)
        openai = json.loads(TABLE.shape("/v1/images/generations")(exc).body)
        a1111 = json.loads(TABLE.shape("/sdapi/v1/txt2img")(exc).body)
    assert native["error"]["type"] == "invalid_request" and native["error"]["message"].startswith("steps: ")
    assert openai["error"]["type"] == "invalid_request_error"
    assert a1111["error"] == "HTTPException"
