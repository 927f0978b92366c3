"""Prompt styles (the operator's file, applied by name) and the PIL operations on uploads (resize modes, mask
blur and inversion, the "fill" start of inpainting, OpenAI's transparent-is-edit masks)."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_bento.core import imageops
from sdxl_bento.core.styles import StyleBook, merge, parse
from sdxl_bento.errors import InvalidRequest


# -- styles ---------------------------------------------------------------------------------------------
def test_merge_puts_the_prompt_in_place_of_the_placeholder_or_appends():
    assert merge("{prompt}, film noir", "a cat") == "a cat, film noir"
    assert merge("oil painting of {prompt}", "a cat") == "oil painting of a cat"
    assert merge("grainy", "a cat") == "a cat, grainy"
    assert merge("grainy", "") == "grainy"


def test_a1111_styles_csv_and_yaml(tmp_path: Path):
    csv_styles = parse('name,prompt,negative_prompt\n"noir","{prompt}, film noir","colour, bright"\nempty,,\n', ".csv")
    assert [(s.name, s.prompt, s.negative_prompt) for s in csv_styles] == [
        ("noir", "{prompt}, film noir", "colour, bright"), ("empty", "", "")]
    yaml_styles = parse("- {name: a, prompt: x}\n- {name: b, negative_prompt: y}\n", ".yaml")
    assert [(s.name, s.prompt, s.negative_prompt) for s in yaml_styles] == [("a", "x", ""), ("b", "", "y")]
    assert parse('{"c": {"prompt": "z"}}', ".json")[0].prompt == "z"
    with pytest.raises(ValueError, match="no name"):
        parse("- {prompt: x}\n", ".yaml")


def test_styles_apply_in_order_to_both_prompts_and_reload(tmp_path: Path):
    path = tmp_path / "styles.csv"
    path.write_text('name,prompt,negative_prompt\nnoir,"{prompt}, film noir",colour\nfilm,grainy,blur\n')
    book = StyleBook(path, check_every_s=0)
    assert book.apply(["noir", "film"], "a cat", "dog") == ("a cat, film noir, grainy", "dog, colour, blur")
    assert book.apply([], "a cat", "") == ("a cat", "")
    with pytest.raises(InvalidRequest, match="no style named 'pop'; available: film, noir") as info:
        book.apply(["pop"], "a cat", "")
    assert info.value.details["field"] == "styles"
    path.write_text("name,prompt,negative_prompt\npop,bright colours,\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert [s.name for s in book.styles()] == ["pop"]
    path.write_text("prompt\nno name column\n")  # a bad edit keeps the styles read before
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert [s.name for s in book.styles()] == ["pop"]
    assert StyleBook(None).styles() == []


# -- image operations -----------------------------------------------------------------------------------
def gradient(width=200, height=100) -> Image.Image:
    x = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    return Image.fromarray(np.stack([x, x[::-1], np.full_like(x, 80)], axis=-1))


def test_resize_modes():
    image = gradient(200, 100)
    assert imageops.resize(image, 128, 128, "stretch").size == (128, 128)
    crop = np.asarray(imageops.resize(image, 128, 128, "crop"))
    assert crop.shape == (128, 128, 3)
    assert crop[:, 0, 0].mean() > 30 and crop[:, -1, 0].mean() < 225  # the sides were cut off
    fill = np.asarray(imageops.resize(image, 128, 128, "fill"))
    assert fill.shape == (128, 128, 3)
    # fit inside (128x64 in the middle), the strips above and below are the edge rows stretched
    assert np.abs(fill[0].astype(int) - fill[32].astype(int)).mean() < 12
    assert np.abs(fill[-1].astype(int) - fill[95].astype(int)).mean() < 12
    with pytest.raises(ValueError):
        imageops.resize(image, 64, 64, "zoom")


def test_mask_blur_and_inversion():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    sharp = np.asarray(imageops.prepare_mask(mask, 64, 64))
    assert set(np.unique(sharp)) == {0, 255}
    blurred = np.asarray(imageops.prepare_mask(mask, 64, 64, blur=4))
    assert 0 < blurred[16, 14] < 255 and blurred[32, 32] > 240
    inverted = np.asarray(imageops.prepare_mask(mask, 64, 64, invert=True))
    assert inverted[0, 0] == 255 and inverted[32, 32] == 0
    transparent = Image.new("RGBA", (64, 64), (255, 255, 255, 0))  # transparent white is not "repaint"
    assert np.asarray(imageops.prepare_mask(transparent, 64, 64)).max() == 0


def test_fill_paints_the_masked_area_from_its_surroundings_and_keeps_the_rest():
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    image.paste((255, 255, 255), (24, 24, 40, 40))  # a white square to be filled
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    filled = np.asarray(imageops.fill_masked(image, mask)).astype(int)
    assert np.abs(filled[32, 32] - [200, 40, 40]).max() < 10  # the surrounding red, not the white
    assert (filled[:20] == [200, 40, 40]).all()  # outside the mask: untouched


def test_transparent_pixels_are_the_area_to_edit():
    image = Image.new("RGBA", (32, 32), (10, 20, 30, 255))
    image.paste((0, 0, 0, 0), (8, 8, 16, 16))
    mask = np.asarray(imageops.transparent_to_mask(image))
    assert mask[10, 10] == 255 and mask[0, 0] == 0 and mask.sum() == 64 * 255
    assert imageops.transparent_to_mask(Image.new("RGB", (8, 8))) is None
