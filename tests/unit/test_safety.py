"""Content safety: the prompt policy (against obfuscation, and without the Scunthorpe problem), the
image check through real transformers/diffusers loaders on synthetic checkers built into tmp_path,
and SDXL's invisible watermark read back with the reference decoder."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from sdxl_bento.core.prompts import PolicyMatch, PromptPolicy, normalize
from sdxl_bento.core.safety import ImageGuard, Verdict
from sdxl_bento.core.watermark import WATERMARK_BITS, Watermarker
from sdxl_bento.errors import ContentFiltered, ServiceError
from sdxl_bento.gpu.checkers import ClassifierChecker, StableDiffusionSafetyCheckerAdapter, load_checker
from sdxl_bento.store.synth import build_synthetic_classifier, build_synthetic_sd_checker

POLICY = textwrap.dedent(r"""
    words:
      - nude
      - {id: crude-word, word: ass}
      - {id: explicit, word: "sex scene"}
    patterns:
      - '\bgor(e|y)\b'
      - {id: minor-age, pattern: '\b(1[0-7]|[1-9])[\s-]*(yo|years?[\s-]*old)\b'}
""")


@pytest.fixture
def policy(tmp_path) -> PromptPolicy:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return PromptPolicy.load(path)


# -- prompt policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, rule", [
    ("a nude woman on a beach", "word-1"),
    ("NUDE, oil painting", "word-1"),
    ("a nüde woman", "word-1"),                           # accent
    ("a nu\u0301de woman", "word-1"),                     # combining accent
    ("a nud3 woman", "word-1"),                           # leetspeak
    ("a nudе woman", "word-1"),                           # Cyrillic e
    ("a ΝUDE woman", "word-1"),                           # Greek capital Nu
    ("а ոude", None),                                     # Armenian: not a listed look-alike
    ("a nu\u200bde woman", "word-1"),                     # zero-width space
    ("a n\u200du\u2060d\ufeffe woman", "word-1"),         # zero-width joiner, word joiner, BOM
    ("a n.u.d.e woman", "word-1"),                        # separators between letters
    ("a n u d e woman", "word-1"),
    ("a n-u-d-e woman", "word-1"),
    ("a n . u . d . 3 woman", "word-1"),
    ("ａ ｎｕｄｅ ｗｏｍａｎ", "word-1"),                       # full width
    ("a 𝐧𝐮𝐝𝐞 woman", "word-1"),                          # mathematical bold
    ("nude_woman, masterpiece", "word-1"),                # booru-style underscores
    ("kick ass", "crude-word"),
    ("kick a$$", "crude-word"),
    ("kick 4ss", "crude-word"),
    ("kick a s s", "crude-word"),
    ("a sex scene", "explicit"),
    ("a sex_scene", "explicit"),
    ("a $3x   scene", "explicit"),
    ("very gory, blood", "pattern-1"),
    ("g0re", "pattern-1"),
    ("a 12 year old", "minor-age"),
    ("a 12-year-old", "minor-age"),
    ("12yo", "minor-age"),
])
def test_policy_catches_words_patterns_and_obfuscations(policy, prompt, rule):
    match = policy.check(prompt)
    assert (match.rule_id if match else None) == rule
    if rule:
        assert match == PolicyMatch(rule, "prompt")


@pytest.mark.parametrize("prompt", [
    "a class photo of the team", "a glass of water", "assassin in the rain", "a passage through grass",
    "Scunthorpe town hall", "the classic bass guitar", "a nudibranch under the sea", "gorgeous gorilla",
    "a 25 year old woman", "a 1024x1024 render, 4k, 35mm", "$5 bill on a table", "an essay on sextants",
    "colors: r, g, b", "a b testing dashboard", "a cat", "",
])
def test_innocent_prompts_pass(policy, prompt):
    assert policy.check(prompt) is None
    policy.enforce(prompt)


def test_refusal_names_the_rule_id_never_its_text(policy):
    with pytest.raises(ContentFiltered) as info:
        policy.enforce("a nude woman")
    exc = info.value
    assert isinstance(exc, ServiceError)
    assert (exc.status, exc.type) == (400, "content_filtered")
    body = exc.body()["error"]
    assert body["finish_reason"] == "content_filtered"
    assert body["rule"] == "word-1" and body["type"] == "content_filtered"
    assert "nude" not in json.dumps(exc.body()) and "nude" not in str(exc)

    with pytest.raises(ContentFiltered) as info:
        policy.enforce("kick a$$")
    assert info.value.body()["error"]["rule"] == "crude-word"
    assert r"\b" not in json.dumps(info.value.body())


def test_negative_prompt_is_not_checked_by_default(policy, tmp_path):
    assert policy.check("a cat on a sofa", negative_prompt="nude, gore, 12 year old") is None
    policy.enforce("a cat on a sofa", "no nudity, nude, gore")
    assert policy.check("gore", negative_prompt="cartoon").field == "prompt"

    path = tmp_path / "strict.yaml"
    path.write_text(POLICY + "check_negative_prompt: true\n")
    strict = PromptPolicy.load(path)
    assert strict.check("a cat", negative_prompt="nude") == PolicyMatch("word-1", "negative_prompt")


def test_policy_file_is_validated(tmp_path):
    def load(text: str) -> PromptPolicy:
        path = tmp_path / "p.yaml"
        path.write_text(textwrap.dedent(text))
        return PromptPolicy.load(path)

    assert load("").check("nude") is None  # an empty file: no rules
    with pytest.raises(ValueError, match="unknown keys"):
        load("word: [nude]\n")
    with pytest.raises(ValueError, match="broken"):
        load("patterns:\n  - {id: broken, pattern: '(unclosed'}\n")
    with pytest.raises(ValueError, match="entry 1"):
        load("words:\n  - {id: x, pattern: nude}\n")
    with pytest.raises(ValueError, match="non-empty"):
        load("words:\n  - ''\n")
    with pytest.raises(ValueError, match="word-2: a word is letters and digits"):
        load("words:\n  - nude\n  - a$$\n")  # would otherwise be the word "a"
    assert load("words:\n  - {id: 7, word: \"hell's  kitchen\"}\n").check("hells kitchen").rule_id == "7"
    assert load("words:\n  - hells kitchen\n").check("Hell\u2019s Kitchen").rule_id == "word-1"
    with pytest.raises(FileNotFoundError):
        PromptPolicy.load(tmp_path / "missing.yaml")


def test_normalize():
    assert normalize("Ñ\u200bÜDЕ") == "nude"
    assert normalize("ﬁne ①") == "fine 1"


# -- image check -----------------------------------------------------------------------------------

RED, BLUE, GREEN, GREY = (255, 0, 0), (0, 0, 255), (0, 255, 0), (128, 128, 128)


def flat(color, size=(96, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


def mostly_red() -> Image.Image:
    image = flat(RED, (64, 64))
    image.paste(BLUE, (0, 0, 32, 32))  # a quarter blue
    return image


def textured_red(size=256) -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = np.clip(np.array([220, 20, 20]) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return build_synthetic_classifier(tmp_path_factory.mktemp("nsfw-classifier"))


@pytest.fixture(scope="module")
def classifier(classifier_dir):
    return ClassifierChecker(classifier_dir)  # AutoModelForImageClassification / AutoImageProcessor from disk


def test_synthetic_classifier_loads_from_disk_and_flags_its_colour(classifier):
    red, blue, green, grey, mostly, textured = classifier.scores(
        [flat(RED), flat(BLUE), flat(GREEN), flat(GREY), mostly_red(), textured_red()])
    assert red > 0.99 and mostly > 0.5 and textured > 0.9
    assert max(blue, green, grey) < 0.01
    assert classifier.scores([]) == []


def test_classifier_label_lookup(classifier_dir):
    assert ClassifierChecker(classifier_dir, label="NSFW").label_index == 1
    assert ClassifierChecker(classifier_dir, label="normal").scores([flat(BLUE)])[0] > 0.99
    with pytest.raises(ValueError, match=r"no label 'porn'.*normal.*nsfw"):
        ClassifierChecker(classifier_dir, label="porn")
    assert isinstance(load_checker("classifier", classifier_dir), ClassifierChecker)
    with pytest.raises(ValueError, match="unknown safety checker kind"):
        load_checker("clip", classifier_dir)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        ClassifierChecker(classifier_dir / "missing")


def test_guard_blocks_flagged_images_only(classifier):
    red, blue = flat(RED), flat(BLUE)
    images, verdicts = ImageGuard(classifier).review([red, blue])
    assert images == [None, blue] and images[1] is blue
    assert [v.flagged for v in verdicts] == [True, False]
    assert verdicts[0].score > 0.99 and verdicts[1].score < 0.01


def test_guard_blurs_flagged_images(classifier):
    textured, green = textured_red(), flat(GREEN)
    images, verdicts = ImageGuard(classifier, action="blur").review([textured, green])
    assert [v.flagged for v in verdicts] == [True, False]
    blurred = images[0]
    assert blurred is not None and blurred.size == textured.size and blurred.mode == textured.mode
    assert np.asarray(blurred, dtype=float).var(axis=(0, 1)).max() < 0.02 * np.asarray(textured, dtype=float).var(
        axis=(0, 1)).min()
    assert images[1] is green


class FixedScores:
    def __init__(self, scores):
        self.values = scores
        self.calls = 0

    def scores(self, images):
        self.calls += 1
        return self.values[: len(images)]


def test_guard_threshold(classifier):
    images = [flat(GREY)] * 4
    checker = FixedScores([0.3, 0.6, 0.9, float("nan")])
    assert [v.flagged for v in ImageGuard(checker, threshold=0.5).review(images)[1]] == [False, True, True, True]
    assert [v.flagged for v in ImageGuard(checker, threshold=0.6).review(images)[1]] == [False, True, True, True]
    assert [v.flagged for v in ImageGuard(checker, threshold=0.7).review(images)[1]] == [False, False, True, True]
    assert ImageGuard(checker).review(images)[1][3] == Verdict(True, 1.0)  # not a number: fail closed

    score = classifier.scores([mostly_red()])[0]
    assert 0.5 < score < 0.99
    assert ImageGuard(classifier, threshold=0.5).review([mostly_red()])[0] == [None]
    assert ImageGuard(classifier, threshold=0.99).review([mostly_red()])[1][0].flagged is False


def test_guard_edge_cases():
    checker = FixedScores([0.1])
    assert ImageGuard(checker).review([]) == ([], []) and checker.calls == 0
    with pytest.raises(RuntimeError, match="1 scores for 2 images"):
        ImageGuard(checker).review([flat(GREY), flat(GREY)])
    with pytest.raises(ValueError):
        ImageGuard(checker, threshold=1.5)
    with pytest.raises(ValueError):
        ImageGuard(checker, action="hide")  # type: ignore[arg-type]


def test_synthetic_sd_safety_checker(tmp_path):
    folder = build_synthetic_sd_checker(tmp_path / "sd")
    checker = load_checker("sd-safety-checker", folder)
    assert isinstance(checker, StableDiffusionSafetyCheckerAdapter)
    images = [flat(RED), mostly_red(), flat(BLUE), flat(GREEN), flat(GREY)]
    scores = checker.scores(images)
    assert scores[0] > 0.99 and scores[1] > 0.5 and max(scores[2:]) < 0.01

    # The score agrees with diffusers' own decision (has_nsfw_concept).
    pixels = checker.processor(images=images, return_tensors="pt")["pixel_values"]
    _, has_nsfw = checker.model(pixels, [np.zeros((1, 1, 3)) for _ in images])
    assert [bool(f) for f in has_nsfw] == [s > 0.5 for s in scores]

    # A pipeline folder (safety_checker/ + feature_extractor/) loads too.
    pipeline = tmp_path / "pipeline"
    (pipeline / "feature_extractor").mkdir(parents=True)
    folder.rename(pipeline / "safety_checker")
    (pipeline / "safety_checker" / "preprocessor_config.json").rename(
        pipeline / "feature_extractor" / "preprocessor_config.json")
    assert StableDiffusionSafetyCheckerAdapter(pipeline).scores([flat(RED)])[0] > 0.99


# -- watermark -------------------------------------------------------------------------------------


def textured(size: int = 256) -> Image.Image:
    """Bluish noise in 2x2 cells: texture for dwtDct to hide bits in."""
    rng = np.random.default_rng(0)
    cells = np.clip(np.array([90, 110, 180]) + rng.normal(0, 40, (size // 2, size // 2, 3)), 0, 255)
    return Image.fromarray(cells.astype(np.uint8)).resize((size, size), Image.NEAREST)


def read_bits(image: Image.Image) -> list[int]:
    from imwatermark import WatermarkDecoder

    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return [int(b) for b in WatermarkDecoder("bits", len(WATERMARK_BITS)).decode(bgr, "dwtDct")]


def agreement(bits: list[int]) -> int:
    return sum(a == b for a, b in zip(bits, WATERMARK_BITS, strict=True))


def test_watermark_is_decodable_and_invisible():
    pytest.importorskip("imwatermark")
    original = textured()
    marked = Watermarker(True).apply([original])[0]
    assert marked.size == original.size and marked.mode == "RGB"
    # dwtDct reads a few of its 48 bits wrong on small images (chance: 24).
    assert agreement(read_bits(marked)) >= 46
    assert agreement(read_bits(original)) <= 40
    diff = np.abs(np.asarray(marked, dtype=int) - np.asarray(original, dtype=int))
    psnr = 10 * np.log10(255**2 / (diff.astype(float) ** 2).mean())
    assert diff.mean() < 1.0 and psnr > 40  # a few blocks move by up to ~27 in one channel


def test_watermark_matches_diffusers_reference():
    pytest.importorskip("imwatermark")
    import torch
    from diffusers.pipelines.stable_diffusion_xl import watermark as reference

    assert WATERMARK_BITS == reference.WATERMARK_BITS and len(WATERMARK_BITS) == 48
    original = textured()
    ours = np.asarray(Watermarker(True).apply([original])[0], dtype=int)
    tensor = torch.from_numpy(np.asarray(original, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    theirs = reference.StableDiffusionXLWatermarker().apply_watermark(tensor)
    theirs = ((theirs[0].permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1) * 255).round().astype(int)
    assert np.abs(ours - theirs).max() <= 1


def test_watermark_off_and_small_images():
    images = [textured(), flat(GREY)]
    assert all(a is b for a, b in zip(Watermarker(False).apply(images), images, strict=True))
    pytest.importorskip("imwatermark")
    small = flat(GREY, (64, 64))
    assert Watermarker(True).apply([small])[0] is small


def test_watermark_without_the_package_says_which(monkeypatch):
    monkeypatch.setitem(sys.modules, "imwatermark", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match="invisible-watermark"):
        Watermarker(True)
    assert Watermarker(False).apply([]) == []
