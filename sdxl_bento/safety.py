"""Content safety: a prompt policy before generation, an NSFW check on every image after it, and
the invisible SDXL watermark.

Prompt policy. Operators supply a YAML file of words and regular expressions (no file: no policy;
none ships with the package). Matching is done on normalised copies of the prompt, because a list
of words is useless if "nüde", "nud3", "n.u.d.e", a zero-width space or a Cyrillic "е" get past it.
Words match whole words only, so "ass" does not refuse "class" (the Scunthorpe problem). Only the
positive prompt is checked by default: a negative prompt names what the user does *not* want
("nudity, gore"), so checking it would refuse the most careful requests; ``check_negative_prompt:
true`` turns it on. A refusal names the rule's id, never its text: the list is the operator's, and
echoing it would teach clients how to word around it.

Image check. A ``SafetyChecker`` gives each image a probability-like NSFW score; ``ImageGuard``
withholds (``block``) or heavily blurs (``blur``) the flagged ones, image by image, so one flagged
image never fails a batch. Two real checkers load from a folder (a Bento model store entry's path):
diffusers' ``StableDiffusionSafetyChecker`` and any transformers image classifier. Synthetic ones,
built from configs with hand-set weights (no download), flag one colour, so tests and offline use
run the real loading and scoring code.

Watermark. SDXL's reference invisible watermark (``invisible-watermark``, dwtDct, Stability's
48 bits), applied exactly as diffusers and Stability's reference code apply it.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from .errors import ContentFiltered

if TYPE_CHECKING:
    import torch
    from PIL import Image

# -- prompt policy ---------------------------------------------------------------------------------


Field = Literal["prompt", "negative_prompt"]


@dataclass(frozen=True)
class PolicyMatch:
    rule_id: str
    """The entry's ``id``, or ``word-N`` / ``pattern-N`` (1-based position): never the rule's text."""
    field: Field


@dataclass(frozen=True)
class Rule:
    id: str
    kind: Literal["word", "pattern"]
    text: str


# Look-alikes from other scripts, mapped to the Latin letter they imitate. Capitals are mapped
# before case folding (Greek "Η" looks like "H", its lower case "η" like "n").
_UPPER_LOOKALIKES = str.maketrans({
    "А": "A", "В": "B", "Е": "E", "Ѕ": "S", "І": "I", "Ј": "J", "К": "K", "М": "M", "Н": "H", "О": "O",
    "Р": "P", "С": "C", "Т": "T", "Х": "X", "У": "Y", "Ү": "Y",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
})
_LOWER_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ѕ": "s", "і": "i", "ј": "j", "к": "k", "м": "m", "н": "h", "о": "o",
    "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "l",
    "ү": "y", "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ı": "i", "ɡ": "g", "ℓ": "l",
})
_APOSTROPHES = str.maketrans("", "", "'\u2018\u2019\u02bc")
# Leetspeak. "1" stands for "i" or "l", so it yields two views.
_LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
_LEET_I = str.maketrans({**_LEET, "1": "i"})
_LEET_L = str.maketrans({**_LEET, "1": "l"})

_NOT_ALNUM = r"(?:[^\w@$]|_)"  # a separator: neither letter, digit, nor a leet symbol
_CHAR = r"(?:[^\W_]|[@$])"  # one letter, digit or leet symbol
# Three or more single characters with short separators between them: "n.u.d.e", "n u d e", "s-3-x".
_SPACED = re.compile(rf"(?<![^\W_])(?<![@$]){_CHAR}(?:{_NOT_ALNUM}{{1,5}}{_CHAR}){{2,}}(?![^\W_])(?![@$])")
_TOKEN = re.compile(r"(?:[^\W_]|[@$])+")
_SEPARATORS = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """NFKC, no format characters (zero-width, bidi) nor apostrophes ("hell's" = "hells"),
    look-alikes to Latin, case folded, no accents."""
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    text = text.translate(_UPPER_LOOKALIKES).casefold()
    text = "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.category(c).startswith("M"))
    return unicodedata.normalize("NFC", text.translate(_LOWER_LOOKALIKES))


def _collapse(text: str, keep_first: bool = False, keep_last: bool = False) -> str:
    """Join spaced-out letters. The first or last may be a word of its own ("a n u d e"), so the
    views also try them kept apart."""

    def join(m: re.Match[str]) -> str:
        run = m.group()
        if not any(c.isalpha() for c in run):
            return run
        chars = re.sub(_NOT_ALNUM, "", run)
        head, tail = (chars[:1] + " ", chars[1:]) if keep_first else ("", chars)
        tail, end = (tail[:-1], " " + tail[-1]) if keep_last else (tail, "")
        return head + tail + end if len(tail) >= 2 else run

    return _SPACED.sub(join, text)


def _deleet(text: str, table: dict[int, str]) -> str:
    # Only inside tokens that hold a letter: "s3x" -> "sex", while "1024" and "$5" stay as they are.
    return _TOKEN.sub(lambda m: m.group().translate(table) if any(c.isalpha() for c in m.group()) else m.group(),
                      text)


_SPLITS = ((False, False), (True, False), (False, True), (True, True))


def views(text: str) -> list[str]:
    """The normalised copies of ``text`` rules are matched against: as written (digits kept, for
    patterns such as ages), with spaced-out letters joined, and with leetspeak read as letters."""
    base = normalize(text)
    out = [base]
    for table in (None, _LEET_I, _LEET_L):
        for variant in (base, *(_collapse(base, first, last) for first, last in _SPLITS)):
            view = _deleet(variant, table) if table else variant
            if view not in out:
                out.append(view)
    return out


_WORD = re.compile(r"[^\W_]+(?:[\s\-_.]+[^\W_]+)*")


def _word_tokens(rule: Rule) -> list[str]:
    word = normalize(rule.text).strip()
    if not _WORD.fullmatch(word):
        # "a$$" would otherwise become the word "a". Leetspeak in prompts is already read as letters.
        raise ValueError(f"policy rule {rule.id}: a word is letters and digits (spaces or hyphens between "
                         "words); use a pattern for anything else")
    return [t for t in _SEPARATORS.split(word) if t]


class PromptPolicy:
    """Words (whole-word, separators between a phrase's words are free) and patterns (``re``, case
    insensitive, searched in the normalised text: write them in lower-case ASCII)."""

    def __init__(self, rules: Sequence[Rule] = (), *, check_negative_prompt: bool = False) -> None:
        self.rules = tuple(rules)
        self.check_negative_prompt = check_negative_prompt
        self._word_ids: dict[str, str] = {}
        self._patterns: list[tuple[str, re.Pattern[str]]] = []
        alternatives: list[str] = []
        for rule in self.rules:
            if rule.kind == "word":
                tokens = _word_tokens(rule)
                key = " ".join(tokens)
                if key not in self._word_ids:
                    self._word_ids[key] = rule.id
                    alternatives.append(r"[\W_]+".join(map(re.escape, tokens)))
            else:
                try:
                    self._patterns.append((rule.id, re.compile(rule.text, re.IGNORECASE)))
                except re.error as exc:
                    raise ValueError(f"policy rule {rule.id}: not a valid regular expression ({exc})") from exc
        alternatives.sort(key=len, reverse=True)
        self._words = (re.compile(r"(?<![^\W_])(?:" + "|".join(alternatives) + r")(?![^\W_])")
                       if alternatives else None)

    @classmethod
    def load(cls, path: str | Path) -> PromptPolicy:
        """Read a policy file. Strict: a typo in a key must not silently disable a rule."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt policy file {path} does not exist")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with 'words' and/or 'patterns'")
        unknown = set(data) - {"words", "patterns", "check_negative_prompt"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected words, patterns, check_negative_prompt")
        rules = [*_parse_entries(path, data, "words", "word"), *_parse_entries(path, data, "patterns", "pattern")]
        check_negative = data.get("check_negative_prompt", False)
        if not isinstance(check_negative, bool):
            raise ValueError(f"{path}: check_negative_prompt must be true or false")
        return cls(rules, check_negative_prompt=check_negative)

    def check(self, prompt: str, negative_prompt: str = "") -> PolicyMatch | None:
        """The first rule the prompt matches (and the negative prompt, only if so configured)."""
        fields: list[tuple[Field, str]] = [("prompt", prompt)]
        if self.check_negative_prompt and negative_prompt:
            fields.append(("negative_prompt", negative_prompt))
        for name, text in fields:
            rule_id = self._match(text)
            if rule_id is not None:
                return PolicyMatch(rule_id, name)
        return None

    def enforce(self, prompt: str, negative_prompt: str = "") -> None:
        """Raise ``ContentFiltered`` (400) naming the rule's id when the prompt matches."""
        match = self.check(prompt, negative_prompt)
        if match is not None:
            raise ContentFiltered(f"the {match.field.replace('_', ' ')} is not allowed by this server's content "
                                  f"policy (rule {match.rule_id})",
                                  finish_reason="content_filtered", rule=match.rule_id, field=match.field)

    def _match(self, text: str) -> str | None:
        if not text or not self.rules:
            return None
        for view in views(text):
            if self._words is not None and (m := self._words.search(view)):
                return self._word_ids[" ".join(t for t in _SEPARATORS.split(m.group()) if t)]
            for rule_id, pattern in self._patterns:
                if pattern.search(view):
                    return rule_id
        return None


def _parse_entries(path: Path, data: dict[str, Any], section: str, key: Literal["word", "pattern"]) -> list[Rule]:
    entries = data.get(section) or []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: '{section}' must be a list")
    rules = []
    for n, entry in enumerate(entries, start=1):
        where = f"{path}: {section} entry {n}"
        if isinstance(entry, dict):
            extra = set(entry) - {"id", key}
            if extra or key not in entry:
                raise ValueError(f"{where}: expected a string or {{id: NAME, {key}: ...}}, got keys {sorted(entry)}")
            rule_id, text = entry.get("id"), entry[key]
            if rule_id is not None and (not isinstance(rule_id, (str, int)) or not str(rule_id).strip()):
                raise ValueError(f"{where}: 'id' must be a non-empty name")
        else:
            rule_id, text = None, entry
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: the {key} must be a non-empty string")
        rules.append(Rule(str(rule_id).strip() if rule_id is not None else f"{key}-{n}", key, text))
    return rules


# -- image check -----------------------------------------------------------------------------------


@runtime_checkable
class SafetyChecker(Protocol):
    def scores(self, images: list[Image.Image]) -> list[float]:
        """A probability-like NSFW score per image, 0..1."""
        ...


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    score: float


class ImageGuard:
    """Scores every image; ``block`` replaces a flagged image by None (the caller withholds it and
    reports ``finish_reason: content_filtered`` for it), ``blur`` by a heavily blurred copy. An
    image is flagged when its score is at least ``threshold``, or is not a number (fail closed). A
    checker that raises fails the call: unchecked images are never released."""

    def __init__(self, checker: SafetyChecker, threshold: float = 0.5,
                 action: Literal["block", "blur"] = "block") -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in 0..1, got {threshold}")
        if action not in ("block", "blur"):
            raise ValueError(f"action must be 'block' or 'blur', got {action!r}")
        self.checker, self.threshold, self.action = checker, threshold, action

    def review(self, images: Sequence[Image.Image]) -> tuple[list[Image.Image | None], list[Verdict]]:
        images = list(images)
        if not images:
            return [], []
        scores = list(self.checker.scores(images))
        if len(scores) != len(images):
            raise RuntimeError(f"the safety checker returned {len(scores)} scores for {len(images)} images")
        out: list[Image.Image | None] = []
        verdicts = []
        for image, raw in zip(images, scores, strict=True):
            score = float(raw)
            if not math.isfinite(score):
                score, flagged = 1.0, True
            else:
                flagged = score >= self.threshold
            verdicts.append(Verdict(flagged, score))
            if not flagged:
                out.append(image)
            elif self.action == "blur":
                out.append(blur(image))
            else:
                out.append(None)
        return out, verdicts


def blur(image: Image.Image) -> Image.Image:
    """A Gaussian blur of radius 1/8 of the shorter side: shapes and colours, no detail."""
    from PIL import ImageFilter

    return image.filter(ImageFilter.GaussianBlur(max(2.0, min(image.size) / 8)))


# How a diffusers safety checker's cosine margin becomes a score: sigmoid(margin * scale). The
# checker's own decision (margin > 0) is score > 0.5; each 0.02 of cosine is one logit.
SD_SCORE_SCALE = 50.0


def _dtype(device: str | torch.device, dtype: torch.dtype | None) -> torch.dtype:
    import torch

    if dtype is not None:
        return dtype
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: {path} is not a folder (a Bento model store entry's path is expected)")
    return path


class StableDiffusionSafetyCheckerAdapter:
    """diffusers' ``StableDiffusionSafetyChecker`` (CompVis) with its ``CLIPImageProcessor``.

    ``path`` is a folder holding both (config.json and preprocessor_config.json), or a pipeline
    folder with ``safety_checker/`` and ``feature_extractor/``. The score follows the checker's own
    rule: per concept, cosine(image, concept) - concept threshold (+0.01 once a "special care"
    concept matched); the maximum margin m gives ``sigmoid(SD_SCORE_SCALE * m)``, so an image the
    checker calls NSFW (``has_nsfw_concept``: some margin > 0) scores above 0.5.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        path = _folder(path, "safety checker")
        model_dir, processor_dir = path, path
        if (path / "safety_checker").is_dir():
            model_dir, processor_dir = path / "safety_checker", path / "feature_extractor"
        self.device = device
        self.dtype = _dtype(device, dtype)
        self.processor = CLIPImageProcessor.from_pretrained(processor_dir, local_files_only=True)
        self.model = StableDiffusionSafetyChecker.from_pretrained(model_dir, dtype=self.dtype, local_files_only=True)
        self.model.to(device).eval()

    def margins(self, images: list[Image.Image]):
        """Per image, the largest concept margin (> 0: the checker flags it)."""
        import torch

        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        m = self.model
        with torch.inference_mode():
            pooled = m.vision_model(pixels.to(self.device, self.dtype))[1]
            embeds = torch.nn.functional.normalize(m.visual_projection(pooled).float(), dim=-1)
            special = embeds @ torch.nn.functional.normalize(m.special_care_embeds.float(), dim=-1).T
            concept = embeds @ torch.nn.functional.normalize(m.concept_embeds.float(), dim=-1).T
            special_care = (special - m.special_care_embeds_weights.float() > 0).any(dim=1, keepdim=True)
            margin = concept - m.concept_embeds_weights.float() + 0.01 * special_care
            return margin.max(dim=1).values.cpu()

    def scores(self, images: list[Image.Image]) -> list[float]:
        if not images:
            return []
        import torch

        return torch.sigmoid(self.margins(images) * SD_SCORE_SCALE).tolist()


class ClassifierChecker:
    """Any transformers image classifier (e.g. Falconsai/nsfw_image_detection); the score is the
    softmax probability of the label named ``label`` (case-insensitive, from ``config.id2label``)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", label: str = "nsfw",
                 dtype: torch.dtype | None = None) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        path = _folder(path, "image classifier")
        self.device = device
        self.dtype = _dtype(device, dtype)
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForImageClassification.from_pretrained(path, dtype=self.dtype, local_files_only=True)
        self.model.to(device).eval()
        labels = {int(i): str(name) for i, name in (self.model.config.id2label or {}).items()}
        found = [i for i, name in labels.items() if name.casefold() == label.casefold()]
        if not found:
            raise ValueError(f"the image classifier at {path} has no label {label!r}; its labels are "
                             f"{sorted(labels.values())}")
        self.label_index = found[0]

    def scores(self, images: list[Image.Image]) -> list[float]:
        if not images:
            return []
        import torch

        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            logits = self.model(pixel_values=pixels.to(self.device, self.dtype)).logits
        return torch.softmax(logits.float(), dim=-1)[:, self.label_index].cpu().tolist()


CheckerKind = Literal["sd-safety-checker", "classifier"]


def load_checker(kind: CheckerKind, path: str | Path, device: str | torch.device = "cpu",
                 **options: Any) -> SafetyChecker:
    """``options``: ``label`` (classifier) and ``dtype``."""
    if kind == "sd-safety-checker":
        return StableDiffusionSafetyCheckerAdapter(path, device, **options)
    if kind == "classifier":
        return ClassifierChecker(path, device, **options)
    raise ValueError(f"unknown safety checker kind {kind!r}: use 'sd-safety-checker' or 'classifier'")


# -- synthetic checkers ----------------------------------------------------------------------------
#
# Both read the mean colour through the real architecture: the patch embedding averages each
# channel (pixels normalised to -1..1) into features [c, -c, g, -g] (g a constant, zero-mean so that
# LayerNorm only rescales), everything else passes it through, and the head compares its direction
# with the flag colour's. The constant g makes near-grey images read as grey rather than as their
# faint tint. A flat flag-colour image reads cosine |f| / sqrt(|f|^2 + g^2) (0.96 for pure red);
# the decision boundary is cosine 0.8, so dark red (128, 0, 0), orange or pink do not count.

_HIDDEN, _IMAGE, _PATCH, _GREY_WEIGHT, _MIN_COSINE, _GAIN = 8, 32, 8, 0.5, 0.8, 40.0


def _flag_direction(flag_color: tuple[int, int, int]):
    import torch

    f = torch.tensor([c / 127.5 - 1.0 for c in flag_color])
    if f.norm() < 0.1:
        raise ValueError(f"flag_color {flag_color} is too close to mid-grey to tell apart")
    direction = torch.cat([f, -f, torch.zeros(_HIDDEN - 6)])
    return direction / direction.norm()


def _set_patch_embedding(conv, bias_holder=None) -> None:
    import torch

    with torch.no_grad():
        conv.weight.zero_()
        area = conv.kernel_size[0] * conv.kernel_size[1]
        for ch in range(3):
            conv.weight[ch, ch] = 1.0 / area
            conv.weight[ch + 3, ch] = -1.0 / area
        grey = torch.zeros(conv.out_channels)
        grey[6], grey[7] = _GREY_WEIGHT, -_GREY_WEIGHT
        (bias_holder if bias_holder is not None else conv.bias).copy_(grey)


def _zero_parameters(model) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)


def _processor_kwargs() -> dict[str, Any]:
    return {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def build_synthetic_classifier(path: str | Path, flag_color: tuple[int, int, int] = (255, 0, 0)) -> Path:
    """A tiny transformers image classifier (BEiT, mean pooling; labels normal/nsfw) whose "nsfw"
    probability is sigmoid(40 * (cosine(mean colour, flag_color) - 0.8)): images dominated by
    ``flag_color`` score near 1, others near 0. Saved with its image processor for
    ``ClassifierChecker(path)``."""
    import torch
    from transformers import BeitConfig, BeitForImageClassification, ViTImageProcessor

    config = BeitConfig(
        hidden_size=_HIDDEN, num_hidden_layers=1, num_attention_heads=1, intermediate_size=_HIDDEN,
        image_size=_IMAGE, patch_size=_PATCH, use_mean_pooling=True, use_absolute_position_embeddings=False,
        use_relative_position_bias=False, use_shared_relative_position_bias=False,
        id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1},
    )
    model = BeitForImageClassification(config).eval()
    _zero_parameters(model)  # every layer is the identity (layer scale 0); pooling = LayerNorm(mean patch)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    _set_patch_embedding(conv)
    with torch.no_grad():
        # LayerNorm's output has norm sqrt(hidden): the nsfw logit is GAIN * (cosine - MIN_COSINE).
        model.classifier.weight[1] = _GAIN / math.sqrt(_HIDDEN) * _flag_direction(flag_color)
        model.classifier.bias[1] = -_GAIN * _MIN_COSINE
    path = Path(path)
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": _IMAGE, "width": _IMAGE}, **_processor_kwargs()).save_pretrained(path)
    return path


def build_synthetic_sd_checker(path: str | Path, flag_color: tuple[int, int, int] = (255, 0, 0)) -> Path:
    """A tiny diffusers ``StableDiffusionSafetyChecker`` (+ ``CLIPImageProcessor``) with one concept,
    the flag colour, at threshold 0.8; the other 16 concepts and the 3 special-care ones never fire.
    The CLS token gathers the patches through one attention layer (zero queries and keys: uniform
    attention; identity values)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    vision = {"hidden_size": _HIDDEN, "intermediate_size": _HIDDEN, "num_hidden_layers": 1, "num_attention_heads": 1,
              "image_size": _IMAGE, "patch_size": _PATCH, "projection_dim": _HIDDEN}
    text = {"hidden_size": _HIDDEN, "intermediate_size": _HIDDEN, "num_hidden_layers": 1, "num_attention_heads": 1,
            "vocab_size": 64, "max_position_embeddings": 8, "projection_dim": _HIDDEN,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    model = StableDiffusionSafetyChecker(CLIPConfig(text_config=text, vision_config=vision, projection_dim=_HIDDEN))
    model.eval()
    _zero_parameters(model)
    emb = next(m for m in model.modules() if hasattr(m, "patch_embedding") and hasattr(m, "position_embedding"))
    positions = torch.zeros(_HIDDEN)
    _set_patch_embedding(emb.patch_embedding, positions)  # CLIP's patch conv has no bias: positions carry g
    eye = torch.eye(_HIDDEN)
    with torch.no_grad():
        emb.position_embedding.weight[1:] = positions  # position 0 is the CLS token: stays 0
        for module in model.modules():
            if hasattr(module, "v_proj") and hasattr(module, "out_proj"):
                module.v_proj.weight.copy_(eye)
                module.out_proj.weight.copy_(eye)
        model.visual_projection.weight.copy_(eye)
        model.concept_embeds[0] = _flag_direction(flag_color)
        model.concept_embeds_weights.fill_(1.0)  # zero embeddings: cosine 0, never above 1
        model.concept_embeds_weights[0] = _MIN_COSINE
        model.special_care_embeds_weights.fill_(1.0)
    path = Path(path)
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": _IMAGE}, crop_size={"height": _IMAGE, "width": _IMAGE},
                       **_processor_kwargs()).save_pretrained(path)
    return path


# -- invisible watermark ---------------------------------------------------------------------------

# Stability AI's SDXL watermark (generative-models' streamlit_helpers.py; diffusers' WATERMARK_MESSAGE).
WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110
WATERMARK_BITS = [int(bit) for bit in bin(WATERMARK_MESSAGE)[2:]]
_MIN_SIDE = 256  # the encoder cannot embed 48 bits in less; diffusers skips such images too


class Watermarker:
    """SDXL's invisible watermark on PIL images (``apply`` is a no-op when disabled).

    Encoded as the reference code does (diffusers' ``StableDiffusionXLWatermarker``: BGR float
    pixels 0..255, dwtDct), then rounded to 8 bits. Images under 256 px on a side are left as they
    are. dwtDct is weak by design: it survives neither resizing nor heavy JPEG, and on small images
    a few of the 48 bits may read wrong, so detectors compare bit agreement against a threshold.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._encoder = None
        if enabled:
            try:
                from imwatermark import WatermarkEncoder
            except ImportError as exc:
                raise RuntimeError(
                    "the invisible watermark needs the 'invisible-watermark' package (with "
                    "'opencv-python-headless'): pip install invisible-watermark opencv-python-headless, "
                    "or turn the watermark off") from exc
            self._encoder = WatermarkEncoder()
            self._encoder.set_watermark("bits", WATERMARK_BITS)

    def apply(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        if not self.enabled:
            return list(images)
        return [self._mark(image) for image in images]

    def _mark(self, image: Image.Image) -> Image.Image:
        import numpy as np
        from PIL import Image

        if min(image.size) < _MIN_SIDE:
            return image
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
        bgr = np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1]
        encoded = self._encoder.encode(np.ascontiguousarray(bgr), "dwtDct")
        rgb = np.clip(np.rint(encoded[:, :, ::-1]), 0, 255).astype(np.uint8)
        out = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
        if alpha is not None:
            out.putalpha(alpha)
        out.info.update(image.info)
        return out
