"""Content negotiation on the native generation routes: ``Accept`` (RFC 9110) and ``Prefer: respond-async``
(RFC 7240).

- ``/txt2img`` answers the image (its ``output_format``, or the one ``Accept`` prefers when the body names none),
  or JSON as ``/generate`` does when ``Accept`` prefers ``application/json``.
- ``/generate`` answers JSON, or, when ``Accept`` prefers ``image/png``, ``image/jpeg`` or ``image/webp``, the image
  bytes as ``/txt2img`` does (one image: several cannot be one body).
- Every other native generation route answers JSON. An ``Accept`` none of this satisfies is a ``406`` before any work.
- ``Prefer: respond-async`` on ``/generate``, ``/img2img``, ``/inpaint`` and ``/refine`` turns the request into a task
  of the matching task route: ``202 Accepted``, ``Location`` of its status, ``Preference-Applied: respond-async``.

The gateway decides here, before admission; the API method reads the decision from the request state.
"""

from __future__ import annotations

from typing import Any

from ..errors import NotAcceptable

JSON = "application/json"
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
ASYNC_ROUTES = {"/generate": "/jobs", "/img2img": "/img2img_jobs", "/inpaint": "/inpaint_jobs",
                "/refine": "/refine_jobs"}
"""Routes that ``Prefer: respond-async`` turns into a task, and the task route that runs it."""
STATE_KEY = "negotiated"


def parse_accept(header: str | None) -> list[tuple[str, float]]:
    """``Accept`` as (media range, q) pairs; an absent or empty header accepts anything."""
    if not header or not header.strip():
        return [("*/*", 1.0)]
    ranges = []
    for part in header.split(","):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        if not media:
            continue
        if "/" not in media:
            media = f"{media}/*" if media == "*" else media
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = max(0.0, min(1.0, float(value)))
                except ValueError:
                    q = 0.0
        ranges.append((media, q))
    return ranges or [("*/*", 1.0)]


def _quality(media: str, ranges: list[tuple[str, float]]) -> float:
    """The q of the most specific range that matches ``media`` (0: not acceptable)."""
    kind = media.split("/")[0]
    best, specificity = 0.0, -1
    for pattern, q in ranges:
        if pattern == media:
            rank = 2
        elif pattern == f"{kind}/*":
            rank = 1
        elif pattern == "*/*":
            rank = 0
        else:
            continue
        if rank > specificity:
            best, specificity = q, rank
    return best


def choose(offers: list[str], header: str | None) -> str | None:
    """The offer ``Accept`` likes best (ties: the route's own order); None when none is acceptable."""
    ranges = parse_accept(header)
    scored = [(_quality(media, ranges), -i, media) for i, media in enumerate(offers)]
    q, _, media = max(scored)
    return media if q > 0 else None


def prefers_async(header: str | None) -> bool:
    """``Prefer`` holds the ``respond-async`` preference (other preferences are ignored, as RFC 7240 says)."""
    if not header:
        return False
    return any(token.split(";")[0].split("=")[0].strip().lower() == "respond-async" for token in header.split(","))


def negotiate(path: str, headers: dict[str, str], requests: list[Any]) -> dict[str, Any]:
    """The answer's media type for a native generation route (and whether it runs as a task); ``NotAcceptable``
    when ``Accept`` allows nothing the route can answer."""
    accept = headers.get("accept")
    asynchronous = path in ASYNC_ROUTES and prefers_async(headers.get("prefer"))
    offers = [JSON]
    req = requests[0] if len(requests) == 1 else None
    if not asynchronous and req is not None and path in ("/txt2img", "/generate"):
        explicit = "output_format" in req.model_fields_set
        images = [f"image/{req.output_format.value}"] if explicit else \
            [f"image/{req.output_format.value}", *(m for m in IMAGE_TYPES if m != f"image/{req.output_format.value}")]
        if path == "/txt2img":
            offers = [*images, JSON]
        elif req.num_images == 1:
            offers = [JSON, *images]
    chosen = choose(offers, accept)
    if chosen is None:
        hint = " (several images are answered as JSON)" if path == "/generate" and req is not None and \
            req.num_images > 1 else ""
        raise NotAcceptable(f"{path} answers {', '.join(offers)}; the Accept header ({accept}) allows none of "
                            f"them{hint}", field="accept")
    return {"media_type": chosen, "format": IMAGE_TYPES.get(chosen), "async": asynchronous}


def decided(state: Any) -> dict[str, Any] | None:
    """In an API method: what the gateway negotiated for this request (None: nothing, the route's default)."""
    return getattr(state, STATE_KEY, None) if not isinstance(state, dict) else state.get(STATE_KEY)


def image_format(state: Any) -> str | None:
    """The image format negotiated for this request (``png``, ``jpeg``, ``webp``), or None: JSON or the default."""
    found = decided(state)
    return None if found is None else found.get("format")


def wants_json(state: Any) -> bool:
    found = decided(state)
    return found is not None and found.get("media_type") == JSON
