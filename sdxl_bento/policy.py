"""Who may run what: a tier's limits applied to the typed request that will run.

Every route first turns its body into native typed requests (the schemas, or an adapter's mapping), so
that a number sent as ``"100"``, ``1e2`` or ``100.0`` is the int 100 before anything looks at it. Then
``police(principal, request)`` refuses what the caller's tier does not allow (``Forbidden``, 403, naming
the limit) or says what the request costs and how it is queued. The gateway calls it before a task id
exists; ``Generation`` calls it again on the request that really runs (a retried task, a batch item), and
``check_size`` once a size is known only from an uploaded or stored image. One value is policed and run.

Ownership lives here too: with keys, a task or an image belongs to the key that made it, and only that
key (or an operator key) reads, cancels, retries or reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .auth import Principal, Tier
from .errors import Forbidden
from .schemas import GenerateRequest, Img2ImgRequest, RefineMode, RefineRequest


@dataclass(frozen=True)
class Admission:
    """What a policed request costs and how it is queued."""

    images: int
    """Images it makes: what the tier's image bucket is charged."""
    priority: int
    """Higher goes first in the queue (the tier's)."""
    deadline_s: float
    """Seconds it may take: the tier's default, or the client's shorter ``X-Request-Deadline``."""


def police(principal: Principal, req: Any, *, deadline_s: float | None = None) -> Admission:
    """``Forbidden`` when the request asks for more than the principal's tier allows; else its admission.

    Image-to-image requests without width and height take the image's size: checked by ``check_size`` once
    it is decoded, after being scaled into ``max_pixels``.
    """
    tier = principal.tier
    if uses_refiner(req) and not tier.refiner_allowed:
        raise _deny(tier, f"the {tier.name} tier may not use the refiner", "refiner_allowed", False)
    if not req.safety_check and not tier.safety_optional:
        raise _deny(tier, f"the {tier.name} tier may not turn off the safety check", "safety_optional", False)
    width, height = _size(req)
    if width is not None and height is not None:
        check_size(tier, width, height)
    if req.steps > tier.max_steps:
        raise _deny(tier, f"steps {req.steps} is above the {tier.name} tier's limit of {tier.max_steps}",
                    "max_steps", tier.max_steps)
    images = images_of(req)
    if images > tier.max_images:
        raise _deny(tier, f"num_images {images} is above the {tier.name} tier's limit of {tier.max_images}",
                    "max_images", tier.max_images)
    deadline = tier.default_deadline_s if deadline_s is None else min(tier.default_deadline_s, deadline_s)
    return Admission(images=images, priority=tier.priority, deadline_s=deadline)


def check_size(tier: Tier, width: int, height: int) -> None:
    """The pixel limit; also for a size known only once an image is loaded (refine, image-to-image)."""
    if width * height > tier.max_pixels:
        raise _deny(tier, f"{width}x{height} ({width * height} pixels) is above the {tier.name} tier's limit "
                          f"of {tier.max_pixels} pixels", "max_pixels", tier.max_pixels)


def max_pixels(tier: Tier, service_limit: int) -> int:
    """The largest size an image-to-image request without width and height is scaled into."""
    return min(tier.max_pixels, service_limit)


def _deny(tier: Tier, message: str, limit: str, allowed: Any) -> Forbidden:
    return Forbidden(message, tier=tier.name, limit=limit, allowed=allowed)


def images_of(req: Any) -> int:
    return 1 if isinstance(req, RefineRequest) else req.num_images


def uses_refiner(req: Any) -> bool:
    if isinstance(req, RefineRequest):
        return True
    return isinstance(req, GenerateRequest) and req.refine != RefineMode.none


def _size(req: Any) -> tuple[int | None, int | None]:
    if isinstance(req, (GenerateRequest, Img2ImgRequest)):
        return req.width, req.height
    return None, None  # refine: the stored image's size


def may_use(principal: Principal, owner: str | None) -> bool:
    """May ``principal`` read, cancel, retry or reuse what ``owner`` made (a task, an image)?

    Without keys everything is everyone's. With keys: its owner, or an operator key; what has no owner
    (made before owners were recorded, or while the service ran without keys) only an operator.
    """
    if principal.anonymous:
        return True
    return principal.operator or (owner is not None and owner == principal.name)


def owner_of(principal: Principal) -> str | None:
    """The owner recorded for what ``principal`` makes: its key's name, or None without keys."""
    return None if principal.anonymous else principal.name
