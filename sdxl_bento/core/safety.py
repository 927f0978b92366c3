"""The NSFW check of every image, after generation and before anything is stored, cached or returned.

A ``SafetyChecker`` gives each image a probability-like NSFW score; ``ImageGuard`` withholds (``block``) or heavily
blurs (``blur``) the flagged ones, image by image, so one flagged image never fails a batch. The checkers, models
that run on the GPU, are in ``gpu/checkers.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image


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
