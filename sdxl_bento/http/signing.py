"""HMAC signatures with the replicas' shared secret: image links, and requests forwarded between replicas.

- **Image links.** With keys, an image belongs to the key that made it. ``GET /images/{id}`` answers its
  owner's key (or an operator's) at any time, and anyone holding a *signed, expiring* link
  (``?exp=<unix time>&sig=<hmac>``) until it expires: the links in answers are signed, so that clients that
  fetch a URL without headers (OpenAI's ``url`` response format, a browser) still work, and a leaked link
  stops working after ``SDXL_BENTO_IMAGE_URL_TTL_S``. Ids alone are not enough.
- **Forwarded requests.** A replica asked about a task another replica owns forwards the request. It
  sends no client credential (the gateway has removed it): it names the caller in ``X-SDXL-Caller``,
  signed with a timestamp, over the method, path and query; the owner's gateway accepts that instead of
  a key for a minute. Whoever can write the task directory in Redis can point a forward elsewhere, but
  collects no key.

The secret is ``SDXL_BENTO_INTERNAL_SECRET``; without it one is created in the state folder (mode 0600)
and shared by that server's workers. Replicas must share one: set it (Kubernetes: from the Secret).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlencode

CALLER = "x-sdxl-caller"
TIMESTAMP = "x-sdxl-timestamp"
SIGNATURE = "x-sdxl-signature"
INTERNAL_HEADERS = (CALLER, TIMESTAMP, SIGNATURE)
FORWARD_WINDOW_S = 60.0


def state_secret(path: Path, make: Callable[[], str], setting: str) -> str:
    """A secret made once in the state folder (mode 0600) and shared by the server's workers: the first one
    writes ``make()``, the others read it (``setting`` names the variable that replaces the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another worker is writing it
            value = path.read_text().strip()
            if value:
                return value
            time.sleep(0.02)
        raise RuntimeError(f"{path} is empty: delete it, or set {setting}") from None
    value = make()
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


class Signer:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the internal secret must be at least 16 bytes")
        self._secret = secret

    def __repr__(self) -> str:
        return "Signer(<secret>)"

    @classmethod
    def load(cls, secret: str | None, state_dir: Path) -> "Signer":
        """The configured secret, or this server's own, created once in ``state_dir``."""
        if secret:
            return cls(secret.encode())
        return cls(state_secret(Path(state_dir) / "internal-secret", lambda: secrets.token_hex(32),
                                "SDXL_BENTO_INTERNAL_SECRET").encode())

    def _mac(self, *parts: str) -> str:
        return hmac.new(self._secret, "\n".join(parts).encode(), hashlib.sha256).hexdigest()[:32]

    # -- image links ------------------------------------------------------------------------------
    def image_query(self, image_id: str, ttl_s: float, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + ttl_s)
        return urlencode({"exp": expires, "sig": self._mac("image", image_id, str(expires))})

    def image_link_valid(self, image_id: str, expires: str | None, signature: str | None,
                         now: float | None = None) -> bool:
        if not expires or not signature or not expires.isdigit():
            return False
        if int(expires) < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(signature, self._mac("image", image_id, expires))

    # -- forwarded requests -----------------------------------------------------------------------
    def forward_headers(self, caller: str, method: str, path: str, query: str,
                        now: float | None = None) -> dict[str, str]:
        stamp = f"{time.time() if now is None else now:.3f}"
        return {CALLER: caller, TIMESTAMP: stamp, SIGNATURE: self._mac("forward", caller, stamp, method, path, query)}

    def forwarded_caller(self, headers: dict[str, str], method: str, path: str, query: str,
                         now: float | None = None) -> str | None:
        """The caller a forwarded request names, when its signature is valid and fresh; else None."""
        caller, stamp, signature = (headers.get(name) for name in INTERNAL_HEADERS)
        if caller is None or stamp is None or signature is None:
            return None
        try:
            age = (time.time() if now is None else now) - float(stamp)
        except ValueError:
            return None
        if not -5 <= age <= FORWARD_WINDOW_S:
            return None
        return caller if hmac.compare_digest(signature, self._mac("forward", caller, stamp, method, path, query)) \
            else None
