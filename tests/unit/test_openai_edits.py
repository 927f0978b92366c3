"""OpenAI image edits onto /img2img and /inpaint (transparent-is-edit masks), the newer Images parameters,
``GET /v1/models``, and the gateway's reading of a multipart form into the JSON the API method takes."""

import asyncio
import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from starlette.testclient import TestClient

from sdxl_bento.adapters import openai as oa
from sdxl_bento.errors import InvalidRequest, ServiceError
from sdxl_bento.http.routes import read_form


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


SOURCE = b64(Image.new("RGB", (320, 256), (10, 120, 200)))


def edit(**body):
    return oa.to_image_request(oa.OpenAIEditRequest.model_validate({"prompt": "a door", "image": SOURCE, **body}))


def decoded_mask(req) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(req.mask))))


def test_an_edit_without_a_mask_is_img2img_of_the_whole_image():
    req = edit()
    assert type(req).__name__ == "Img2ImgRequest" and (req.width, req.height) == (None, None)  # size auto: its own
    sized = edit(size="256x256", n=2, quality="low", output_format="webp", output_compression=50, strength=0.3)
    assert (sized.width, sized.height, sized.num_images, sized.steps) == (256, 256, 2, 20)
    assert (sized.output_format.value, sized.quality, sized.strength) == ("webp", 50, 0.3)
    opaque = Image.new("RGBA", (64, 64), (1, 2, 3, 255))  # alpha, but nothing transparent: the whole image
    assert type(edit(image=b64(opaque))).__name__ == "Img2ImgRequest"


def test_the_masks_transparent_pixels_are_the_area_to_edit():
    mask = Image.new("RGBA", (320, 256), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (100, 50, 200, 150))
    req = edit(mask=b64(mask))
    assert type(req).__name__ == "InpaintRequest"
    white = decoded_mask(req) == 255
    assert white[60, 150] and not white[0, 0] and white.sum() == 100 * 100


def test_an_image_with_transparent_pixels_and_no_mask_edits_those_pixels():
    image = Image.new("RGBA", (64, 64), (200, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, 32, 64))
    req = edit(image=b64(image))
    assert type(req).__name__ == "InpaintRequest" and decoded_mask(req)[:, :32].min() == 255


@pytest.mark.parametrize("body, param", [
    ({"mask": b64(Image.new("RGB", (320, 256)))}, "mask"),           # no alpha channel
    ({"mask": b64(Image.new("RGBA", (64, 64)))}, "mask"),            # another size
    ({"image": [SOURCE, SOURCE]}, "image"),
    ({"image": "not base64 at all"}, "image"),
    ({"size": "100x100"}, "size"),
    ({"strength": 0}, "strength"),
    ({"n": 9}, "n"),
])
def test_edits_refused_name_the_parameter(body, param):
    with pytest.raises((ServiceError, ValidationError)) as info:
        edit(**body)
    answer = json.loads(oa.error_response(info.value).body)
    assert answer["error"]["param"] == param, answer


@pytest.mark.parametrize("body, param", [
    ({"background": "transparent"}, "background"), ({"moderation": "low"}, "moderation"),
    ({"style": "vivid"}, "style"), ({"output_format": "gif"}, "output_format"), ({"quality": "max"}, "quality"),
    ({"partial_images": 2}, "partial_images"), ({"complexity": "high"}, "complexity"), ({"frame_count": 4},
                                                                                       "frame_count"),
])
def test_newer_parameters_that_do_not_map_are_refused(body, param):
    with pytest.raises(ValidationError) as info:
        oa.OpenAIImageRequest.model_validate({"prompt": "x", **body})
    assert json.loads(oa.error_response(info.value).body)["error"]["param"] == param
    with pytest.raises(ValidationError):
        oa.OpenAIEditRequest.model_validate({"prompt": "x", "image": SOURCE, "input_fidelity": "high"})


def test_model_names_a_checkpoint_when_it_is_one():
    resolve = {"photo": "photo:v2"}.__getitem__

    def resolver(name):
        try:
            return resolve(name)
        except KeyError:
            raise InvalidRequest("unknown") from None

    req = oa.OpenAIImageRequest.model_validate({"prompt": "x", "model": "photo", "size": "256x256"})
    assert oa.to_generate_request(req, resolve=resolver).model == "photo:v2"
    other = oa.OpenAIImageRequest.model_validate({"prompt": "x", "model": "dall-e-3", "size": "256x256"})
    assert oa.to_generate_request(other, resolve=resolver).model is None


def test_v1_models_and_openai_404s():
    rows = [{"tag": "sdxl-base:v1"}, {"tag": "photo:v2"}]
    service = SimpleNamespace(runtime=SimpleNamespace(engine=SimpleNamespace(manager=SimpleNamespace(
        available=lambda: rows))))
    with TestClient(oa.openai_app(service=lambda: service)) as client:
        listed = client.get("/models").json()
        assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["sdxl-base:v1", "photo:v2"]
        assert all(m["object"] == "model" and m["owned_by"] == "sdxl-bento" for m in listed["data"])
        assert client.get("/models/photo").json()["id"] == "photo:v2"
        missing = client.get("/models/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        other = client.get("/files")
        assert other.status_code == 404 and "Invalid URL" in other.json()["error"]["message"]


def test_read_form_turns_files_into_base64_and_repeats_into_lists():
    boundary = "XyZ"
    parts = [("prompt", None, b"a door"), ("n", None, b"2"), ("image[]", "a.png", b"\x89PNG-a"),
             ("image[]", "b.png", b"\x89PNG-b"), ("mask", "m.png", b"MASK")]
    chunks = []
    for name, filename, data in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        if filename:
            head += f'; filename="{filename}"\r\nContent-Type: image/png'
        chunks.append(head.encode() + b"\r\n\r\n" + data + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    form = asyncio.run(read_form(body, f"multipart/form-data; boundary={boundary}"))
    assert form["prompt"] == "a door" and form["n"] == "2"
    assert [base64.b64decode(i) for i in form["image"]] == [b"\x89PNG-a", b"\x89PNG-b"]
    assert base64.b64decode(form["mask"]) == b"MASK"
    with pytest.raises(InvalidRequest, match="multipart"):
        asyncio.run(read_form(b"garbage", "multipart/form-data"))
