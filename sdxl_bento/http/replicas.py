"""Tasks across replicas: a task submitted to one replica can be polled, fetched and cancelled
through any other.

BentoML runs a task inside the process that accepted it and keeps its state there. Each replica
records, in the shared Redis, which replica (its internal URL, ``SDXL_BENTO_REPLICA_URL``) owns each
task it accepts; a replica asked about a task it does not know forwards the request to the owner and
relays the answer. It forwards no client credential (the gateway removed it): the caller is named in
headers signed with the replicas' shared secret (``signing``), and only to an owner URL of the form
``http(s)://<IP address>:<port>``, as replicas announce themselves (``SDXL_BENTO_REPLICA_URL``).
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

logger = logging.getLogger(__name__)

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


def replica_url(url: str) -> bool:
    """``http(s)://<IP address>:<port>`` and nothing more: what replicas announce (their pod address)."""
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        ipaddress.ip_address(parts.hostname or "")
        port = parts.port
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and port is not None and not parts.username
            and parts.path in ("", "/") and not parts.query and not parts.fragment)


class TaskDirectory:
    def __init__(self, redis_url: str, self_url: str, *, retention_s: int = 24 * 3600,
                 prefix: str = "sdxl-bento:task:") -> None:
        import redis

        self.self_url = self_url.rstrip("/")
        self.retention_s = retention_s
        self.prefix = prefix
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)

    def announce(self, task_id: str) -> None:
        """This replica owns the task (best effort: without Redis, tasks are still served here)."""
        try:
            self._redis.set(self.prefix + task_id, self.self_url, ex=self.retention_s)
        except Exception as exc:  # redis.RedisError, OSError
            logger.warning("task directory: could not record task %s (%s)", task_id, exc)

    def owner(self, task_id: str) -> str | None:
        """The URL of the replica that owns the task, when it is another one."""
        try:
            value = self._redis.get(self.prefix + task_id)
        except Exception as exc:
            logger.warning("task directory: lookup of %s failed (%s)", task_id, exc)
            return None
        url = value.decode() if value else None
        return url if url and url != self.self_url else None

    async def forward(self, owner: str, scope: dict[str, Any], receive: Any, send: Any, *,
                      headers: dict[str, str] | None = None, stream: bool = False) -> None:
        """Send the same request to the owner with ``headers`` (the signed caller) and relay its answer;
        503 when the owner cannot be reached or its URL is not a replica's. ``stream``: relay the answer as it
        comes, without a time limit (a task's Server-Sent Events)."""
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response

        request = Request(scope, receive)
        headers = {**{k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}, **(headers or {})}
        url = f"{owner}{scope['path']}"
        if not replica_url(owner):
            logger.error("task directory: owner %r of a task is not a replica URL; not forwarding", owner)
            response = JSONResponse({"error": {"type": "unavailable", "message": "the replica running this task "
                                                                                 "is unknown"}}, status_code=503,
                                    headers={"Retry-After": "5"})
            return await response(scope, receive, send)
        if stream:
            return await self._relay(request, url, headers, scope, receive, send)
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                answer = await client.request(request.method, url, params=request.query_params, headers=headers,
                                              content=await request.body())
        except httpx.HTTPError as exc:
            response: Response = JSONResponse(
                {"error": {"type": "unavailable", "message": f"the replica running this task is unreachable ({exc})"}},
                status_code=503, headers={"Retry-After": "5"})
        else:
            relay = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP | {"content-encoding"}}
            response = Response(answer.content, status_code=answer.status_code, headers=relay)
        await response(scope, receive, send)

    async def _relay(self, request: Any, url: str, headers: dict[str, str], scope: dict[str, Any], receive: Any,
                     send: Any) -> None:
        from starlette.responses import JSONResponse

        started = False
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client:
                async with client.stream(request.method, url, params=request.query_params, headers=headers) as answer:
                    relay = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()
                             if k.lower() not in _HOP_BY_HOP | {"content-encoding"}]
                    await send({"type": "http.response.start", "status": answer.status_code, "headers": relay})
                    started = True
                    async for chunk in answer.aiter_raw():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:
            if started:  # the owner went away mid-stream: end it; the client reconnects with Last-Event-ID
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            response = JSONResponse({"error": {"type": "unavailable",
                                               "message": f"the replica running this task is unreachable ({exc})"}},
                                    status_code=503, headers={"Retry-After": "5"})
            await response(scope, receive, send)
