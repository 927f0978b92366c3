"""The small apps mounted beside the API methods: stored images, the model list, the playground.

They reach the service instance through BentoML's ``get_current_service()``: its ``front`` (image store, keys,
signer) and ``runtime`` (the engine's checkpoints).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from ..core.images import parse_id
from ..core.policy import may_use
from ..errors import NotFound, ServiceError, to_response

Service = Callable[[], Any]


def _current() -> Any:
    from bentoml import get_current_service

    return get_current_service()


def images_app(service: Service = _current) -> Starlette:
    """``GET /images/{id}``: for its owner's key, an operator's, or a signed link that has not expired
    (``http/signing.py``); anyone else gets 404, as for an unknown id. Without keys, for everyone."""

    async def get_image(request: Request) -> Response:
        front = service().front
        try:
            image_id = parse_id(request.path_params["image_id"])
            info = front.images.info(image_id)
            principal = request.scope.get("state", {}).get("principal")
            allowed = front.keys is None or front.signer.image_link_valid(
                image_id, request.query_params.get("exp"), request.query_params.get("sig")) or (
                principal is not None and may_use(principal, info.owner))
            if not allowed:
                raise NotFound(f"no image with id {image_id}")
        except ServiceError as exc:
            return to_response(exc)
        return FileResponse(info.path, media_type=info.media_type,
                            headers={"Cache-Control": "private, max-age=86400, immutable"})

    async def get_manifest(request: Request) -> Response:
        """``GET /images/{id}/manifest``: its owner's key (or an operator's) only; a signed link opens the image,
        not the record of how it was made."""
        front = service().front
        try:
            image_id = parse_id(request.path_params["image_id"])
            info = front.images.info(image_id)
            principal = request.scope.get("state", {}).get("principal")
            if front.keys is not None and (principal is None or not may_use(principal, info.owner)):
                raise NotFound(f"no image with id {image_id}")
            manifest = front.images.manifest(image_id)
        except ServiceError as exc:
            return to_response(exc)
        return JSONResponse(manifest, headers={"Cache-Control": "private, no-store"})

    return Starlette(routes=[Route("/{image_id}", get_image, methods=["GET"]),
                             Route("/{image_id}/manifest", get_manifest, methods=["GET"])])


def models_app(loras: Callable[[], list[dict[str, Any]]], service: Service = _current) -> Starlette:
    """``GET /models/``: the checkpoints (loaded, pinned, synthetic), the LoRA adapters and the refiner."""

    async def list_models(request: Request) -> Response:
        runtime = getattr(service(), "runtime", None)
        checkpoints = runtime.engine.manager.available() if runtime is not None else []
        return JSONResponse({"checkpoints": checkpoints, "loras": loras(),
                             "refiner": runtime.refiner_tag if runtime is not None else None})

    return Starlette(routes=[Route("/", list_models, methods=["GET"])])


def playground() -> StaticFiles:
    """``/ui/``: the web playground (static files)."""
    return StaticFiles(directory=str(Path(__file__).resolve().parents[1] / "ui"), html=True)
