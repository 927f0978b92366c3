"""The NSFW checkers: models that score images (``core.safety.ImageGuard`` decides what a score means).

Two real checkers load from a folder (a Bento model store entry's path): diffusers' ``StableDiffusionSafetyChecker``
and any transformers image classifier. Synthetic ones (``store/synth.py``) are built from configs with hand-set
weights, so tests and offline use run this loading and scoring code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..core.safety import SafetyChecker

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
