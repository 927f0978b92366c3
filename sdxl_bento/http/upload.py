"""Routes that take an image file (``POST /verify``): the gateway reads the upload itself, once.

A file comes three ways: the bytes as the body (``Content-Type: image/png``, ``image/jpeg``, ``image/webp`` or
``application/octet-stream``), a ``multipart/form-data`` form with one file field ``image`` (``curl -F``), or
JSON ``{"image": "<base64>"}`` like ``/img2img``. Other types: 415. The file may be as large as the upload limit
(``SDXL_BENTO_MAX_UPLOAD_BYTES``; beyond it 413, judged on ``Content-Length`` before anything is read and on the
bytes as they arrive); a JSON body may be as large as the body limit.

One value: what the gateway read is the ``Upload`` the API method runs. BentoML gets an empty JSON body and the
method takes the upload from the request state, so no second parser (BentoML's multipart reader keeps the last
of repeated fields, and fetches URLs given in place of a file) ever sees the body. A form with another field, or
with ``image`` twice, is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..core.uploads import base64_bytes
from ..errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

RAW_TYPES = ("image/png", "image/jpeg", "image/webp", "application/octet-stream")
FORM_OVERHEAD = 64 * 1024
"""What a multipart form may add to the file (boundaries, part headers)."""
STATE_KEY = "upload"
"""Where the gateway leaves the ``Upload`` in the request state."""


@dataclass(frozen=True)
class Upload:
    data: bytes = field(repr=False)
    declared_type: str
    """The content type the client gave (the file's own format is read from its bytes)."""
    filename: str | None = None


async def read_upload(headers: dict[str, str], receive: Any, *, max_bytes: int, max_json_bytes: int,
                      name: str = "image") -> Upload:
    """The uploaded file, or ``PayloadTooLarge`` / ``UnsupportedMediaType`` / ``InvalidRequest``."""
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json":
        body = await read_body(headers, receive, max_json_bytes)
        try:
            params = json.loads(body) if body else None
        except ValueError:
            raise InvalidRequest("the request body is not valid JSON") from None
        if not isinstance(params, dict) or set(params) != {name}:
            raise InvalidRequest(f'send {{"{name}": "<base64>"}}, the image file itself, or a multipart form '
                                 f"with one file field {name!r}", field=name)
        data = base64_bytes(params[name], max_bytes=max_bytes, field=name)
        upload = Upload(data=data, declared_type=media_type)
    elif media_type == "multipart/form-data":
        upload = await _form(headers, await read_body(headers, receive, max_bytes + FORM_OVERHEAD), name)
    elif media_type in RAW_TYPES:
        upload = Upload(data=await read_body(headers, receive, max_bytes), declared_type=media_type)
    else:
        raise UnsupportedMediaType(
            f"send the image as the body ({', '.join(RAW_TYPES)}), as multipart/form-data with a file field "
            f"{name!r}, or as JSON {{\"{name}\": \"<base64>\"}}; not {media_type or 'no content type'}")
    if len(upload.data) > max_bytes:
        raise PayloadTooLarge(f"the image is {len(upload.data)} bytes; the limit is {max_bytes}")
    if not upload.data:
        raise InvalidRequest(f"{name}: the image is empty", field=name)
    return upload


async def read_body(headers: dict[str, str], receive: Any, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it is declared or read past ``limit`` bytes."""
    declared = headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _form(headers: dict[str, str], body: bytes, name: str) -> Upload:
    """The one file field of a multipart form (Starlette's parser, over the body already read and bounded)."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
             "headers": [(b"content-type", headers.get("content-type", "").encode("latin-1"))]}
    try:
        form = await Request(scope, replay).form(max_files=1, max_fields=0)
    except MultiPartException as exc:
        raise InvalidRequest(f"the form: {exc.message} (send one file field {name!r} and nothing else)",
                             field=name) from None
    try:
        keys = list(form.keys())
        if keys != [name] or not isinstance(form[name], UploadFile):
            raise InvalidRequest(f"the form must hold one file field {name!r} and nothing else, not "
                                 f"{', '.join(map(repr, keys)) or 'no field'}", field=name)
        file = form[name]
        return Upload(data=await file.read(), declared_type="multipart/form-data", filename=file.filename)
    finally:
        await form.close()
