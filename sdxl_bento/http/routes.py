"""The route table: every path the gateway guards, and how each generation route's body becomes typed
native requests.

The gateway reads no field of a body itself. For a generation route it calls the route's ``parse``, which
validates the body with the same models the API method uses (a foreign API's adapter maps its body onto
``GenerateRequest`` as its method does), and answers a refusal in that route's API shape (``shape``).
``service.py`` builds the table once, from the adapters' parsers; the lists of generation, task and guarded
routes derive from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, create_model

from ..errors import InvalidRequest, native_error

Shape = Callable[[Exception], Any]
"""An error (``ServiceError`` or pydantic ``ValidationError``) -> a Starlette response."""


@dataclass(frozen=True)
class Route:
    path: str
    parse: Callable[[Any], list[Any]]
    """The JSON body -> the typed native requests it runs (raises ``ValidationError`` or ``ServiceError``)."""
    shape: Shape = native_error
    task: bool = False
    """Submits a BentoML task (``/<task>/submit``)."""
    batch: bool = False
    """Its items are stamped with their caller (BentoML's adaptive batching merges several callers' items)."""
    upload: int | None = None
    """Takes an image file of at most this many bytes instead of a JSON request (``upload.py``): ``parse`` gets
    the ``Upload`` the gateway read."""
    form: bool = False
    """It takes ``multipart/form-data`` (OpenAI's image edits): the gateway parses the form into a JSON object
    (``read_form``: files in base64), polices that, and hands the API method the JSON."""
    negotiates: bool = False
    """A native route: ``Accept`` and ``Prefer`` are negotiated (``negotiation.py``) and a webhook may be asked for."""
    parse_for: Callable[[Any, Any], list[Any]] | None = None
    """Instead of ``parse``, when the typed requests depend on the caller too: (body, principal) -> requests."""


async def read_form(body: bytes, content_type: str, *, max_files: int = 4, max_fields: int = 64) -> dict[str, Any]:
    """A multipart form as a JSON object: a field sent once is its value (a file: its bytes in base64), one
    sent several times or named ``name[]`` a list. A malformed form is an ``InvalidRequest``."""
    import base64

    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode("latin-1"))]}
    try:
        form = await Request(scope, receive).form(max_files=max_files, max_fields=max_fields)
    except (MultiPartException, AssertionError, ValueError) as exc:
        raise InvalidRequest(f"the multipart form could not be read: {exc}") from None
    out: dict[str, Any] = {}
    lists: set[str] = set()
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            value = base64.b64encode(await value.read()).decode("ascii")
        name = key[:-2] if key.endswith("[]") else key
        if key.endswith("[]") or name in out:
            if name not in lists:
                out[name] = [] if name not in out else [out[name]]
                lists.add(name)
            out[name].append(value)
        else:
            out[name] = value
    await form.close()
    return out


def single(model: type[BaseModel]) -> Callable[[Any], list[Any]]:
    return lambda body: [model.model_validate(body)]


def upload(path: str, max_bytes: int) -> Route:
    """A route that takes an image file (raw, multipart or base64 JSON; ``upload.py``)."""
    return Route(path, lambda file: [file], upload=max_bytes)


def batch_items(model: type[BaseModel]) -> Callable[[Any], list[Any]]:
    """``{"requests": [...]}`` as the items it runs; a caller's stamp (``caller``) is not the client's to send."""
    body = create_model("BatchBody", __config__=ConfigDict(extra="forbid"), requests=(list[model], ...))

    def parse(raw: Any) -> list[Any]:
        items = body.model_validate(raw).requests
        for i, item in enumerate(items):
            if getattr(item, "caller", None) is not None:
                raise InvalidRequest(f"requests.{i}.caller: set by the server, not by the client",
                                     field=f"requests.{i}.caller")
        return items

    return parse


@dataclass(frozen=True)
class RouteTable:
    generation: dict[str, Route]
    """POST routes whose body the gateway reads and polices, by path: those that generate (or submit work that
    generates), and those that take an image file (``Route.upload``)."""
    task_prefixes: tuple[str, ...]
    """BentoML task routes: ``<prefix>/submit``, ``/status``, ``/get``, ``/cancel``, ``/retry``."""
    mounted: dict[str, Shape] = field(default_factory=dict)
    """Mounted apps under the gateway's guard (path prefix -> error shape)."""
    open_reads: tuple[str, ...] = ()
    """Prefixes where a key is checked when sent but not required (signed image links)."""
    public: tuple[str, ...] = ("/", "/livez", "/healthz", "/readyz", "/metrics", "/docs", "/docs.json",
                               "/schema.json", "/ui")
    """Unguarded paths (BentoML's own; the playground under ``/ui``), for metric labels."""

    @property
    def protected(self) -> tuple[str, ...]:
        return (*self.generation, *self.task_prefixes, *self.mounted)

    def is_protected(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self.protected)

    def shape(self, path: str) -> Shape:
        route = self.generation.get(path)
        if route is not None:
            return route.shape
        return next((shape for prefix, shape in self.mounted.items() if path.startswith(prefix)), native_error)

    def template(self, path: str) -> str:
        """A bounded label for metrics and the audit log: the route, never what a client put in the path."""
        if path in self.generation:
            return path
        for prefix in self.task_prefixes:
            action = path.removeprefix(prefix + "/")
            if path.startswith(prefix + "/") and action in ("submit", "status", "get", "cancel", "retry", "events",
                                                             "webhooks"):
                return path
        for prefix in (*self.mounted, "/ui"):
            if path == prefix or path.startswith(prefix + "/"):
                return f"{prefix}/{{path}}"
        return path if path in self.public else "other"


def table(native: dict[str, type[BaseModel]], tasks: dict[str, type[BaseModel]], *, batch: type[BaseModel],
          foreign: dict[str, Route], mounted: dict[str, Shape], uploads: tuple[Route, ...] = ()) -> RouteTable:
    """The service's routes: ``native`` single-request routes and ``tasks`` prefixes by their input model, the
    batch route, the ``foreign`` APIs' generation routes (their adapters' parsers and error shapes), and the
    ``mounted`` apps the gateway guards (a signed link can also open ``/images``)."""
    generation = {path: Route(path, single(model), negotiates=True) for path, model in native.items()}
    for prefix, model in tasks.items():
        generation[prefix] = Route(prefix, single(model), negotiates=True)  # BentoML also serves a task as a call
        generation[f"{prefix}/submit"] = Route(f"{prefix}/submit", single(model), task=True, negotiates=True)
    generation["/generate_batch"] = Route("/generate_batch", batch_items(batch), batch=True, negotiates=True)
    generation.update(foreign)
    generation.update({route.path: route for route in uploads})
    return RouteTable(generation=generation, task_prefixes=tuple(tasks), mounted=mounted, open_reads=("/images",))
