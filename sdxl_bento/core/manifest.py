"""Reproducibility: each image's manifest, and replay.

A manifest is everything needed to make an image again: the request's parameters (this image's own seed, one
image), the checkpoint and refiner tags with the sha256 of their weights, the LoRAs with theirs, the scheduler's
class and full configuration, the versions that ran (torch, diffusers, transformers, CUDA, the GPU's name or
``cpu``), the device and dtype, the acceleration in use (compilation, CUDA graphs, the VAE decode, an
approximation) and what happened after the GPU (watermark, safety). It is written beside the image, in its sidecar
(so it goes when the image goes), and read by the image's owner: ``GET /images/{id}/manifest``.

``POST /replay`` runs a manifest's request again (never from the result cache) and compares: identical pixels, or
the largest and mean absolute difference per channel value, and which manifest fields differ. A different GPU,
driver or library version explains a difference; a different seed or parameter would be a bug.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

from ..errors import InvalidRequest, Unavailable
from ..schemas import LIFECYCLE_FIELDS, GenerateRequest, Img2ImgRequest, InpaintRequest, RefineRequest

VERSION = 1
KINDS = {"txt2img": "generate", "refine": "refine", "img2img": "img2img", "inpaint": "inpaint"}
"""A manifest's kind -> the request model (an attribute of ``schemas.Requests``) that replays it."""
NOT_COMPARED = ("image", "created")
"""Manifest fields that differ for every image and say nothing about how it was made."""


def pixels_sha256(image: Any) -> str:
    """sha256 of the RGB pixels (what ``compare`` compares): equal hashes, identical pixels."""
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def build(req: Any, key: Any, seed: int, index: int, environment: dict[str, Any], *, fmt: str, data: bytes,
          pixels: str | None, width: int, height: int, postprocess: dict[str, Any],
          batch_images: int = 1) -> dict[str, Any]:
    """The manifest of the ``index``-th image of ``req`` (made with ``seed``), without its id (the store adds it).
    ``batch_images``: how many images the pipeline call that made it held. Each image has its own generator, so its
    noise never depends on its batch mates, but on some devices the arithmetic does, in the last bit; a replay runs
    alone, and a difference there is named by this field."""
    params = req.model_dump(mode="json", exclude={"return_base64", "image", "mask", "caller", *LIFECYCLE_FIELDS})
    params["seed"] = seed
    if "num_images" in params:
        params["num_images"] = 1
    source: dict[str, Any] = {}
    if isinstance(req, Img2ImgRequest):
        if req.image is not None:
            source["image_sha256"] = hashlib.sha256(req.image.encode()).hexdigest()
            source["uploaded"] = True
        if isinstance(req, InpaintRequest):
            source["mask_sha256"] = hashlib.sha256(req.mask.encode()).hexdigest()
            params["mask_sha256"] = source["mask_sha256"]
    return {
        "manifest_version": VERSION,
        "image": {"format": fmt, "width": width, "height": height, "sha256": hashlib.sha256(data).hexdigest(),
                  "pixels_sha256": pixels, "index": index},
        "kind": key.kind,
        "request": params,
        "seed": seed,
        "batch_key": {"width": key.width, "height": key.height, "steps": key.steps,
                      "total_steps": key.total_steps(), "guidance_scale": key.guidance_scale, "refine": key.refine,
                      "high_noise_frac": key.high_noise_frac, "strength": key.strength, "batch_images": batch_images},
        "source": source or None,
        **environment,
        "postprocess": postprocess,
    }


def request_from(manifest: dict[str, Any], requests: Any = None) -> Any:
    """The typed request a manifest replays (``requests``: ``schemas.Requests``, the operator's limits). Uploads
    are not kept (only their sha256 is), so an image-to-image manifest replays only from a stored source, and an
    inpainting one (whose mask is always an upload) does not: ``Unavailable`` (422) says so."""
    if not isinstance(manifest, dict) or manifest.get("manifest_version") != VERSION:
        raise InvalidRequest(f"manifest: not a manifest of version {VERSION} (GET /images/{{id}}/manifest gives one)",
                             field="manifest")
    kind, params = manifest.get("kind"), manifest.get("request")
    if not isinstance(kind, str) or kind not in KINDS or not isinstance(params, dict):
        raise InvalidRequest("manifest: kind and request are missing or unknown", field="manifest")
    if kind == "inpaint":
        raise Unavailable("an inpainting manifest cannot be replayed: its mask was uploaded and is not kept (only its "
                          "sha256 is)", field="manifest")
    if kind == "img2img" and params.get("image_id") is None:
        raise Unavailable("this manifest's source image was uploaded and is not kept (only its sha256 is): only "
                          "image-to-image from a stored image replays", field="manifest")
    model = getattr(requests, KINDS[kind]) if requests is not None else {
        "generate": GenerateRequest, "refine": RefineRequest, "img2img": Img2ImgRequest}[KINDS[kind]]
    return model.model_validate(params)


def compare(original: bytes | None, replay: bytes, original_pixels: str | None = None) -> dict[str, Any]:
    """Pixel identity of two encoded images (or, without the original's bytes, of its pixel hash), with the
    largest and mean absolute difference of their channel values when both are at hand."""
    import numpy as np
    from PIL import Image

    new = Image.open(io.BytesIO(replay)).convert("RGB")
    if original is None:
        identical = None if original_pixels is None else pixels_sha256(new) == original_pixels
        return {"identical": identical, "max_abs_diff": 0 if identical else None,
                "mean_abs_diff": 0.0 if identical else None,
                "compared": "pixel sha256" if original_pixels else "nothing (the original image is not available)"}
    old = Image.open(io.BytesIO(original)).convert("RGB")
    if old.size != new.size:
        return {"identical": False, "max_abs_diff": None, "mean_abs_diff": None,
                "compared": f"sizes differ: {old.size} and {new.size}"}
    diff = np.abs(np.asarray(old, dtype=np.int16) - np.asarray(new, dtype=np.int16))
    return {"identical": bool(diff.max() == 0), "max_abs_diff": int(diff.max()),
            "mean_abs_diff": round(float(diff.mean()), 6), "compared": "pixels"}


def differences(original: Any, replay: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest fields whose values differ (dotted paths), but for the image's own facts."""
    left = dict(_flatten({k: v for k, v in original.items() if k not in NOT_COMPARED} if isinstance(original, dict)
                         else {}))
    right = dict(_flatten({k: v for k, v in replay.items() if k not in NOT_COMPARED}))
    return [{"field": name, "original": left.get(name), "replay": right.get(name)}
            for name in sorted(left.keys() | right.keys()) if left.get(name) != right.get(name)]


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        out: list[tuple[str, Any]] = []
        for key, inner in value.items():
            out.extend(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return [(prefix, value)]
