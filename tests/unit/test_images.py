import uuid

import pytest
from PIL import Image

from sdxl_bento.errors import InvalidRequest, NotFound
from sdxl_bento.images import ImageStore, encode, infotext, read_parameters


def test_infotext_follows_the_a1111_layout():
    text = infotext("a cat, photo", "blurry", {"Steps": 30, "Sampler": "Euler a", "Seed": 42, "Model": "sdxl-base:v1"})
    assert text == 'a cat, photo\nNegative prompt: blurry\nSteps: 30, Sampler: Euler a, Seed: 42, Model: "sdxl-base:v1"'


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_parameters_are_embedded_and_read_back(fmt, magic):
    image = Image.new("RGB", (64, 48), (200, 10, 10))
    text = infotext("ünïcode prompt", "", {"Seed": 7})
    data = encode(image, fmt, 90, text)
    assert data.startswith(magic)
    assert read_parameters(data) == text


def test_store_saves_and_finds_by_uuid_only(tmp_path):
    store = ImageStore(tmp_path / "images")
    image_id = store.save(b"\x89PNG fake", "png")
    path, media_type = store.find(image_id)
    assert path.read_bytes() == b"\x89PNG fake" and media_type == "image/png"
    assert store.find(image_id.upper())[0] == path
    for bad in ("../../etc/passwd", "..", "", "x" * 36, f"{image_id}/../..", "/etc/passwd"):
        with pytest.raises(InvalidRequest):
            store.find(bad)
    with pytest.raises(NotFound):
        store.find(str(uuid.uuid4()))
    assert not list((tmp_path / "images").glob(".*.tmp"))
