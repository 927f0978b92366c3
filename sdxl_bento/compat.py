"""What the foreign-API adapters (``openai_compat``, ``a1111``) share.

Each foreign API answers its errors in its own JSON shape, so its BentoML method takes a
*lenient* input spec (``wire_model``: the same field names, every value accepted) and validates
the body itself; ``answers_in`` turns the errors into that API's shape. Limits stay identical to
the native API because every adapter maps onto ``GenerateRequest`` and validates that, and the tier's
limits apply to that mapped request (``policy``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .errors import ServiceError


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


def answers_in(shape: Callable[[Exception], Any]):
    """Decorator for a BentoML API method taking ``ctx``: a ``pydantic.ValidationError`` or
    ``ServiceError`` becomes ``shape(exc)`` (a Starlette response). BentoML copies
    ``ctx.response.status_code`` onto the answer, so the status is set there too."""

    def decorate(func):
        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await func(*args, **kwargs)
            except (ValidationError, ServiceError) as exc:
                response = shape(exc)
                kwargs["ctx"].response.status_code = response.status_code
                return response

        return wrapper

    return decorate
