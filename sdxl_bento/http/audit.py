"""The audit log: one JSON line per request, who asked for what and what came of it.

Each line is ``{"time": "<ISO-8601 UTC, ms>Z", **fields}``; the caller passes the fields:

``key_name``, ``tier``, ``endpoint``, ``prompt``, ``negative_prompt``, ``parameters`` (dict, seed
included), ``items`` (``/generate_batch``: one dict per request, with its ``prompt``,
``negative_prompt`` and ``parameters``), ``model``, ``outcome`` (``ok``, ``error``, ``rejected`` or
``cancelled``), ``reason``, ``message`` (the error's), ``status`` (HTTP), ``cache`` (``hit``, ``miss``
or null), ``queue_s``, ``gpu_s``, ``image_ids``, ``seeds``, ``finish_reasons``, ``task_id``,
``request_id``, ``duration_s``.

What reaches the file is decided here, by allow-list, not by each caller: a field not in ``FIELDS`` is
dropped, and so is a parameter not in ``PARAMETERS`` (uploads such as ``image``, ``mask`` or
``init_images`` never are); strings are capped (``…[truncated, N chars]``), lists and nesting too, so
a 16 MB body cannot become a 16 MB line. ``request_id`` comes from the client: printable characters
only, at most 128.

With ``prompts="hash"`` the prompt texts are replaced by their SHA-256 (``prompt_sha256``,
``negative_prompt_sha256``), in ``items`` too: requests can still be matched to each other without
keeping the text.

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
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Literal

logger = logging.getLogger(__name__)

FIELDS = frozenset({
    "key_name", "tier", "endpoint", "prompt", "negative_prompt", "parameters", "items", "model", "outcome",
    "reason", "message", "status", "cache", "queue_s", "gpu_s", "image_ids", "seeds", "finish_reasons", "task_id",
    "request_id", "duration_s"})
"""The fields a line may carry (besides ``time``, which is the log's own)."""

PARAMETERS = frozenset({
    # ours (schemas.py), and what generation adds
    "width", "height", "steps", "guidance_scale", "seed", "seeds", "scheduler", "num_images", "refine",
    "high_noise_frac", "refiner_strength", "strength", "model", "loras", "output_format", "quality",
    "safety_check", "approximation", "image_id", "return_base64",
    # OpenAI's (openai_compat.py), and what its ``record`` adds
    "n", "size", "response_format", "style", "user", "output_compression", "stream", "api", "requested_model",
    # AUTOMATIC1111's (a1111.py)
    "sampler", "sampler_name", "sampler_index", "batch_size", "n_iter", "cfg_scale", "refiner_checkpoint",
    "refiner_switch_at", "send_images", "denoising_strength",
    # issue 16: the A1111 features as native fields (``hires`` without its prompts), the newer OpenAI ones
    "hires", "tiling", "clip_skip", "eta", "subseed", "subseed_strength", "styles", "resize_mode", "mask_blur", "mask_invert",
    "inpaint_fill", "mask_padding", "background", "moderation", "safety_identifier",
    # issue 17: which events a webhook asked for (never its URL: receivers put their tokens in it)
    "webhook_events"})
"""Generation parameters worth keeping: settings, never content (prompts, uploads, scripts)."""

ITEM_FIELDS = frozenset({"prompt", "negative_prompt", "parameters", "outcome", "reason", "seeds", "image_ids",
                         "finish_reasons"})
"""The fields of one ``items`` entry."""

_PROMPTS = ("prompt", "negative_prompt")
MAX_PROMPT = 10_000
"""The schemas' own bound on a prompt: beyond it the request was refused anyway."""
MAX_STRING = 200
MAX_MESSAGE = 1_000
MAX_REQUEST_ID = 128
MAX_LIST = 256
_MAX_DEPTH = 4


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
            if name not in FIELDS:
                continue
            if name in _PROMPTS:
                self._prompt(entry, name, value)
            elif name == "parameters":
                entry[name] = _parameters(value)
            elif name == "items":
                entry[name] = self._items(value)
            elif name == "request_id":
                entry[name] = _request_id(value)
            else:
                entry[name] = _scrub(value, MAX_MESSAGE if name in ("message", "reason") else MAX_STRING)
        text = json.dumps(entry, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        # A lone surrogate (JSON allows "\\ud800") is not UTF-8: written as its JSON escape, as are the
        # Unicode line breaks, so that tools splitting on them still see one line.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"

    def _prompt(self, entry: dict[str, Any], name: str, value: Any) -> None:
        text = None if value is None else value if isinstance(value, str) else str(value)
        if self.prompts == "hash":
            entry[f"{name}_sha256"] = None if text is None else hashlib.sha256(
                text.encode("utf-8", "surrogatepass")).hexdigest()
        else:
            entry[name] = None if text is None else _cap(text, MAX_PROMPT)

    def _items(self, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            return None
        out: list[Any] = []
        for item in value[:MAX_LIST]:
            entry: dict[str, Any] = {}
            for name, field in (item.items() if isinstance(item, Mapping) else ()):
                if name not in ITEM_FIELDS:
                    continue
                if name in _PROMPTS:
                    self._prompt(entry, name, field)
                elif name == "parameters":
                    entry[name] = _parameters(field)
                else:
                    entry[name] = _scrub(field, MAX_MESSAGE if name == "reason" else MAX_STRING)
            out.append(entry)
        if len(value) > MAX_LIST:
            out.append(_more(len(value)))
        return out

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


def _parameters(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, Mapping):
        return None
    return {name: _scrub(_without_prompts(v) if name == "hires" else v, MAX_STRING) for name, v in value.items()
            if name in PARAMETERS}


def _without_prompts(value: Any) -> Any:
    """A nested setting that carries prompts of its own (the hires pass's): its settings only."""
    return {k: v for k, v in value.items() if k not in _PROMPTS} if isinstance(value, Mapping) else None


def _scrub(value: Any, cap: int, depth: int = 0) -> Any:
    """``value`` as plain JSON: strings capped, lists and nesting bounded, NaN and infinity as null,
    anything else as its (capped) ``str``."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _cap(value, cap)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if depth >= _MAX_DEPTH and isinstance(value, (Mapping, list, tuple)):
        return "…[truncated, nested too deep]"
    if isinstance(value, Mapping):
        items = list(value.items())
        out = {_cap(str(k), MAX_STRING): _scrub(v, cap, depth + 1) for k, v in items[:MAX_LIST]}
        if len(items) > MAX_LIST:
            out["…"] = _more(len(items))
        return out
    if isinstance(value, (list, tuple)):
        out_list = [_scrub(v, cap, depth + 1) for v in value[:MAX_LIST]]
        return out_list + [_more(len(value))] if len(value) > MAX_LIST else out_list
    return _cap(str(value), cap)


def _request_id(value: Any) -> str | None:
    """The client's id, printable characters only (no forged lines or escape codes), at most 128."""
    if value is None:
        return None
    out = []
    for c in str(value):
        if len(out) == MAX_REQUEST_ID:
            break
        if c.isprintable():
            out.append(c)
    return "".join(out)


def _cap(text: str, cap: int) -> str:
    return text[:cap] + f"…[truncated, {len(text)} chars]" if len(text) > cap else text[:]


def _more(count: int) -> str:
    return f"…[truncated, {count} items]"


__all__ = ["FIELDS", "ITEM_FIELDS", "PARAMETERS", "AuditLog"]
