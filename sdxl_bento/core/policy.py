"""Who may run what: a tier's limits applied to the typed request that will run.

Every route first turns its body into native typed requests (the schemas, or an adapter's mapping), so
that a number sent as ``"100"``, ``1e2`` or ``100.0`` is the int 100 before anything looks at it. Then
``police(principal, request)`` refuses what the caller's tier does not allow (``Forbidden``, 403, naming
the limit) or says what the request costs and how it is queued. The gateway calls it before a task id
exists; ``Generation`` calls it again on the request that really runs (a retried task, a batch item), and
``check_size`` once a size is known only from an uploaded or stored image. One value is policed and run.

The tiers and the principal (who asks, as the gateway authenticated it) are defined here, since everything
after the gateway decides by them; the keys file that maps keys to them is ``http/auth.py``. Ownership lives
here too: with keys, a task or an image belongs to the key that made it, and only that
key (or an operator key) reads, cancels, retries or reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from pydantic import SecretStr

from ..errors import Forbidden
from ..schemas import GenerateRequest, Img2ImgRequest, RefineMode, RefineRequest


@dataclass(frozen=True)
class Tier:
    name: str
    priority: int
    """Higher goes first in the queue."""
    requests_per_minute: float
    images_per_minute: float
    burst_requests: int
    """Capacity of the request bucket."""
    burst_images: int
    """Capacity of the image bucket."""
    max_concurrent_jobs: int
    max_pixels: int
    """Largest width x height."""
    max_steps: int
    max_images: int
    """Most images in one request."""
    default_deadline_s: float
    refiner_allowed: bool
    safety_optional: bool
    """May this tier turn the NSFW check off."""

    def __post_init__(self) -> None:
        for name, kind in _TIER_TYPES.items():
            value = getattr(self, name)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, value := float(value))
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"{name} must be {kind.__name__}, not {value!r}")
            if kind in (int, float) and name != "priority" and not value > 0:
                raise ValueError(f"{name} must be above 0, not {value!r}")
        if not self.name:
            raise ValueError("a tier needs a name")


_TIER_TYPES: dict[str, type] = {f.name: get_type_hints(Tier)[f.name] for f in fields(Tier)}
OVERRIDABLE = frozenset(_TIER_TYPES) - {"name"}

DEFAULT_TIERS: dict[str, Tier] = {
    "free": Tier("free", priority=0, requests_per_minute=10, images_per_minute=20, burst_requests=5,
                 burst_images=10, max_concurrent_jobs=1, max_pixels=1024 * 1024, max_steps=40, max_images=2,
                 default_deadline_s=120, refiner_allowed=False, safety_optional=False),
    "standard": Tier("standard", priority=5, requests_per_minute=60, images_per_minute=120, burst_requests=20,
                     burst_images=40, max_concurrent_jobs=4, max_pixels=1536 * 1536, max_steps=60, max_images=4,
                     default_deadline_s=300, refiner_allowed=True, safety_optional=False),
    "premium": Tier("premium", priority=10, requests_per_minute=300, images_per_minute=600, burst_requests=60,
                    burst_images=120, max_concurrent_jobs=16, max_pixels=2048 * 2048, max_steps=100, max_images=8,
                    default_deadline_s=600, refiner_allowed=True, safety_optional=True),
}

OPEN_TIER = Tier("open", priority=5, requests_per_minute=1e9, images_per_minute=1e9, burst_requests=10**9,
                 burst_images=10**9, max_concurrent_jobs=10**9, max_pixels=2048 * 2048, max_steps=100,
                 max_images=8, default_deadline_s=300, refiner_allowed=True, safety_optional=True)
"""No keys file: every request limit at the API's own maximum, rates effectively unlimited (finite, so
token-bucket arithmetic stays plain)."""


@dataclass(frozen=True)
class Principal:
    """Who is asking: the key's name, never the key."""

    name: str
    tier: Tier
    """The key's tier with its overrides applied."""
    key_id: str
    """First 8 hex digits of the key's sha256, for logs."""
    operator: bool = False
    """May read, cancel and retry every key's tasks and images, not only its own."""
    anonymous: bool = False
    """No keys file: nobody is identified, so nothing is owned. A property of the caller, not of the tier's
    name: a keys file may well define a tier called ``open``."""
    webhook: str | None = None
    """The key's default webhook URL (the keys file's ``webhook``), for requests that name none."""
    webhook_events: tuple[str, ...] | None = None
    """The key's default ``webhook_events``; None: completed, failed and cancelled."""
    webhook_secret: SecretStr | None = field(default=None, repr=False, compare=False)
    """``whsec_...``: signs this key's webhook deliveries (Standard Webhooks); never in a repr or a log."""


OPEN_PRINCIPAL = Principal("anonymous", OPEN_TIER, "", anonymous=True)
"""Everyone, when the service runs without a keys file."""


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
    it is decoded, after being scaled into ``max_pixels``. A hires pass counts its pixels (the size it upscales
    to) and the steps it runs (its steps x denoising strength) on top of the first pass's.
    """
    tier = principal.tier
    if uses_refiner(req) and not tier.refiner_allowed:
        raise _deny(tier, f"the {tier.name} tier may not use the refiner", "refiner_allowed", False)
    if not req.safety_check and not tier.safety_optional:
        raise _deny(tier, f"the {tier.name} tier may not turn off the safety check", "safety_optional", False)
    width, height = _size(req)
    if width is not None and height is not None:
        check_size(tier, width, height)
    hires = getattr(req, "hires", None)
    if hires is not None:  # a hires pass counts its pixels (the size it works at) and the steps it runs
        up_w, up_h, _, _ = hires.plan(req.width, req.height)
        if up_w * up_h > tier.max_pixels:
            raise _deny(tier, f"the hires pass's {up_w}x{up_h} ({up_w * up_h} pixels) is above the {tier.name} "
                              f"tier's limit of {tier.max_pixels} pixels", "max_pixels", tier.max_pixels)
        steps = req.steps + hires.run_steps(req.steps)
        if steps > tier.max_steps:
            raise _deny(tier, f"steps {req.steps} + the hires pass's {steps - req.steps} = {steps} is above the "
                              f"{tier.name} tier's limit of {tier.max_steps}", "max_steps", tier.max_steps)
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
