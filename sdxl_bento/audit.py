"""The audit log: one JSON line per request, who asked for what and what came of it.

Each line is ``{"time": "<ISO-8601 UTC, ms>Z", **fields}``; the caller passes the fields:

``key_name``, ``tier``, ``endpoint``, ``prompt``, ``negative_prompt``, ``parameters`` (dict, seed
included), ``model``, ``outcome`` (``ok``, ``error``, ``rejected`` or ``cancelled``), ``reason``,
``status`` (HTTP), ``cache`` (``hit``, ``miss`` or null), ``queue_s``, ``gpu_s``, ``image_ids``,
``request_id``.

With ``prompts="hash"`` the prompt texts are replaced by their SHA-256 (``prompt_sha256``,
``negative_prompt_sha256``): requests can still be matched to each other without keeping the text.

Lines are written under a lock and flushed one by one, with no queue in between, so none is ever
dropped or interleaved. The file is rotated by size like ``RotatingFileHandler``: ``path``,
``path.1`` (newest) ... ``path.N``; a line is never split across files. A failing disk does not fail
the request: the error goes to the ``logging`` module and the service goes on. The file is created
with mode 0600, since prompts may be private. Several processes may share one file: each line is a
single append, and a rotation by one process is noticed by the others before their next line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Literal

logger = logging.getLogger(__name__)

_HASHED = ("prompt", "negative_prompt")


class AuditLog:
    """Appends audit lines to ``path`` (None: no file) and, with ``stdout``, to standard output.

    ``max_bytes=0`` turns rotation off; ``backups=0`` starts the file over when it is full.
    """

    def __init__(self, path: Path | None, *, max_bytes: int = 50 * 2**20, backups: int = 5, stdout: bool = False,
                 prompts: Literal["plain", "hash"] = "plain") -> None:
        if max_bytes < 0 or backups < 0:
            raise ValueError("max_bytes and backups must be 0 or more")
        if prompts not in ("plain", "hash"):
            raise ValueError(f"prompts must be 'plain' or 'hash', not {prompts!r}")
        self.path = None if path is None else Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.stdout = stdout
        self.prompts = prompts
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"AuditLog({self.path}, prompts={self.prompts!r})"

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, **fields: Any) -> None:
        """Write one line; never raises: a failure is logged and the request goes on."""
        try:
            line = self._line(fields)
        except Exception:
            logger.exception("audit log: a record could not be turned into JSON")
            return
        with self._lock:
            if self.path is not None:
                try:
                    self._write(line.encode("utf-8"))
                except Exception:
                    logger.exception("audit log %s: a line could not be written", self.path)
                    self._close()
            if self.stdout:
                try:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                except Exception:
                    logger.exception("audit log: a line could not be written to stdout")

    def close(self) -> None:
        """Close the file; a later ``record`` opens it again."""
        with self._lock:
            self._close()

    def _line(self, fields: dict[str, Any]) -> str:
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        entry: dict[str, Any] = {"time": now}
        for name, value in fields.items():
            if self.prompts == "hash" and name in _HASHED:
                entry[f"{name}_sha256"] = None if value is None else hashlib.sha256(str(value).encode()).hexdigest()
            else:
                entry[name] = value
        try:
            text = json.dumps(entry, ensure_ascii=False, separators=(",", ":"), default=str, allow_nan=False)
        except ValueError:  # NaN or infinity: not JSON, written as null
            text = json.dumps(_finite(entry), ensure_ascii=False, separators=(",", ":"), default=str)
        # Valid JSON either way; escaped so that tools splitting on Unicode line breaks see one line.
        return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"

    def _write(self, data: bytes) -> None:
        assert self.path is not None
        if self._file is not None and _replaced(self.path, self._file):
            self._close()  # another process rotated it
        if self._file is None:
            self._file = _open(self.path)
        size = os.fstat(self._file.fileno()).st_size
        if self.max_bytes and size and size + len(data) > self.max_bytes:
            self._rotate()
        view = memoryview(data)
        while view:  # unbuffered: one append per line, short writes retried
            view = view[self._file.write(view):]

    def _rotate(self) -> None:
        assert self.path is not None
        self._close()
        if self.backups:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            try:
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            except FileNotFoundError:  # another process rotated it first
                pass
        else:
            self.path.unlink(missing_ok=True)
        self._file = _open(self.path)

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                logger.exception("audit log %s: closing failed", self.path)
            self._file = None


def _open(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab", buffering=0)


def _replaced(path: Path, file: IO[bytes]) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return True
    mine = os.fstat(file.fileno())
    return (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


__all__ = ["AuditLog"]
