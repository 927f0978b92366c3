"""The BentoML Python client, with one upstream bug worked around.

``bentoml.SyncHTTPClient.<task>.submit()`` (BentoML 1.4.30 and later) sends the request, then
raises ``AttributeError: '_opened_files'`` because that list is never created. ``Client`` creates
it; everything else is BentoML's own client.
"""

from __future__ import annotations

from typing import Any

import bentoml


class Client(bentoml.SyncHTTPClient):
    def __init__(self, url: str, *, timeout: float = 300, **kwargs: Any) -> None:
        super().__init__(url, timeout=timeout, **kwargs)
        if not hasattr(self, "_opened_files"):
            self._opened_files: list[Any] = []
