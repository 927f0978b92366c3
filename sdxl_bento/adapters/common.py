"""What the foreign-API adapters (``openai_compat``, ``a1111``) share.

Each foreign API answers its errors in its own JSON shape, so its BentoML method takes a
*lenient* input spec (``wire_model``: the same field names, every value accepted) and validates
the body itself; ``errors.answers_in`` turns the errors into that API's shape. Limits stay identical to
the native API because every adapter maps onto ``GenerateRequest`` and validates that, and the tier's
limits apply to that mapped request (``policy``).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from ..errors import ContentFiltered


def wire_model(model: type[BaseModel], name: str, also: Iterable[str] = ()) -> type[BaseModel]:
    """A copy of ``model`` for BentoML's ``input_spec``: same fields and descriptions (so /docs shows
    them), plus the names in ``also``; every value optional and unchecked, other fields dropped (BentoML
    passes only declared fields on). The real check is ``model``'s."""
    fields: dict[str, Any] = {
        field_name: (Optional[Any], Field(default=None, description=info.description))
        for field_name, info in model.model_fields.items()
    }
    fields.update({extra: (Optional[Any], Field(default=None)) for extra in also if extra not in fields})
    return create_model(name, __config__=ConfigDict(extra="ignore"), __doc__=model.__doc__, **fields)


def given(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields a client actually sent: JSON ``null`` counts as absent (its default applies)."""
    return {k: v for k, v in fields.items() if v is not None}


class ForeignRequest(BaseModel):
    """A foreign API's body: JSON ``null`` is an absent field (its default applies), as those APIs' clients
    send it."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        return given(data) if isinstance(data, dict) else data


def first_error(exc: ValidationError) -> tuple[str | None, str]:
    """The first problem of a pydantic error: (the field, or None for a check of the whole model; the message
    without pydantic's ``Value error,`` prefix)."""
    error = exc.errors(include_url=False)[0]
    return (str(error["loc"][0]) if error["loc"] else None), error["msg"].removeprefix("Value error, ")


def kept_images(images: list[Any]) -> list[Any]:
    """The images the safety check let through; ``ContentFiltered`` (400) when it withheld all of them (a
    foreign answer has no per-image flag)."""
    kept = [image for image in images if image.data]
    if images and not kept:
        raise ContentFiltered(f"{'the image was' if len(images) == 1 else f'all {len(images)} images were'} "
                              "withheld by the safety check")
    return kept


def caller_name(scope: dict[str, Any]) -> tuple[bool, str | None]:
    """(known, name): the gateway's principal for this request; name None for the open service."""
    principal = scope.get("state", {}).get("principal")
    if principal is None:
        return False, None
    return True, None if principal.anonymous else principal.name
