"""AUTOMATIC1111's settings (``/sdapi/v1/options``, ``override_settings``) as far as they mean something here.

A1111 keeps one global settings object that every generation reads. Here each API key has its own (the open
service: one for everyone), kept in ``a1111-options.json`` in the state folder, so one key's
``POST /options {"sd_model_checkpoint": ...}`` changes that key's default checkpoint and never another key's,
and survives restarts as A1111's ``config.json`` does. ``override_settings`` in a request applies the same
options to that request only.

Each option is one of:

- *honoured*: read and set, with its value checked (``sd_model_checkpoint``, ``CLIP_stop_at_last_layers``,
  ``samples_format``, ``jpeg_quality``, ``eta_ddim``); each maps onto a request field;
- *fixed*: this service's fact, which A1111 lets you change (``sd_vae`` is the checkpoint's own VAE,
  ``randn_source`` is the CPU, ``eta_noise_seed_delta`` 0, ...): its value is accepted, any other is refused
  (400, naming the option), since it would change the image in a way this service does not do;
- *read-only*: reported, never set (``sd_checkpoint_hash``, ``sd_checkpoint_name``): A1111 ignores such a change
  without an error, and so does this (``X-Ignored-Options`` names what was ignored).

An option A1111 does not have is refused as A1111 refuses it (its ``KeyError``), in its error shape, but with
400 rather than A1111's 500.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import InvalidRequest, NotFound


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    kind: str
    """``honoured``, ``fixed`` or ``readonly``."""
    field: str | None = None
    """The native request field it sets (honoured options)."""
    check: Callable[[Any], Any] | None = None
    """Honoured options: the value as the field takes it, or ValueError with the reason."""
    doc: str = ""


def _int_between(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"a whole number in {low}..{high}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"a whole number in {low}..{high}") from None
        if number != int(number) or not low <= number <= high:
            raise ValueError(f"a whole number in {low}..{high}")
        return int(number)
    return check


def _float_between(low: float, high: float) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"a number in {low}..{high}") from None
        if isinstance(value, bool) or not low <= number <= high:
            raise ValueError(f"a number in {low}..{high}")
        return number
    return check


def _format(value: Any) -> str:
    text = str(value).strip().lower()
    if text in ("png", "webp"):
        return text
    if text in ("jpg", "jpeg"):
        return "jpeg"
    raise ValueError("png, jpg or webp")


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("sd_model_checkpoint", None, "honoured", "model", None,
           "the checkpoint (a title from /sd-models); default: the server's"),
    Option("CLIP_stop_at_last_layers", 1, "honoured", "clip_skip", _int_between(1, 12), "clip skip"),
    Option("samples_format", "png", "honoured", "output_format", _format, "png, jpg or webp"),
    Option("jpeg_quality", 80, "honoured", "quality", _int_between(1, 100), "JPEG and WebP quality"),
    Option("eta_ddim", 0.0, "honoured", "eta", _float_between(0, 1), "DDIM's eta"),
    Option("sd_vae", "Automatic", "fixed", doc="the checkpoint's own VAE (Automatic or None: the same here)"),
    Option("eta_ancestral", 1.0, "fixed", doc="ancestral samplers add their full noise (eta 1)"),
    Option("eta_noise_seed_delta", 0, "fixed", doc="seeds are used as given"),
    Option("randn_source", "CPU", "fixed", doc="starting noise is drawn on the CPU (the same image on any GPU)"),
    Option("img2img_fix_steps", False, "fixed", doc="img2img runs steps x denoising strength"),
    Option("sdxl_clip_l_skip", True, "fixed", doc="clip skip applies to both text encoders"),
    Option("s_min_uncond", 0.0, "fixed", doc="the negative prompt applies at every step"),
    Option("enable_pnginfo", True, "fixed", doc="every image carries its parameters"),
    Option("samples_save", False, "fixed", doc="images are kept in the image store (GET /images/{id})"),
    Option("grid_save", False, "fixed", doc="no grids are made"),
    Option("sd_checkpoint_hash", None, "readonly", doc="sha256 of the current checkpoint"),
    Option("sd_checkpoint_name", None, "readonly", doc="the current checkpoint's name"),
)}
FIXED_ALIASES = {"sd_vae": {"automatic", "none"}}
"""Fixed options whose value is accepted in any of these spellings (case-insensitive)."""


def checkpoint_name(title: str) -> str:
    """A checkpoint as A1111 tools name it (``name.safetensors [hash]``, ``name``, ``name:version``) -> a tag."""
    name = re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", str(title)).strip()
    return re.sub(r"\.(safetensors|ckpt)$", "", name)


def _same(option: Option, value: Any) -> bool:
    if option.name in FIXED_ALIASES:
        return str(value).strip().lower() in FIXED_ALIASES[option.name]
    if isinstance(option.default, bool) or isinstance(value, bool):
        return value is option.default or value == option.default
    if isinstance(option.default, (int, float)):
        try:
            return float(value) == float(option.default)
        except (TypeError, ValueError):
            return False
    return str(value).strip().lower() == str(option.default).lower()


def unknown(name: str) -> InvalidRequest:
    return InvalidRequest(f"unknown option {name!r} (this service has: {', '.join(OPTIONS)})", field=name,
                          a1111_error="KeyError", a1111_errors=repr(name))


def validate(changes: dict[str, Any], *, where: str = "", resolve: Callable[[str], str] | None = None,
             strict_readonly: bool = False) -> tuple[dict[str, Any], list[str]]:
    """(the honoured options' values as their request fields take them, keyed by option; the read-only options
    that were ignored). Unknown options, values that cannot be honoured and fixed options asked to change are
    ``InvalidRequest`` naming ``where`` + the option. ``resolve`` turns a checkpoint name into the tag that
    will run (an unknown one is refused as A1111 refuses it)."""
    values: dict[str, Any] = {}
    ignored: list[str] = []
    for name, value in changes.items():
        option = OPTIONS.get(name)
        if option is None:
            error = unknown(name)
            error.message = f"{where}{name}: {error.message}"
            error.details["field"] = f"{where}{name}"
            raise error
        label = f"{where}{name}"
        if option.kind == "readonly":
            if strict_readonly:
                raise InvalidRequest(f"{label} is read-only ({option.doc})", field=label)
            ignored.append(name)
        elif option.kind == "fixed":
            if not _same(option, value):
                raise InvalidRequest(f"{label} cannot be {value!r} here: {option.doc} (only {option.default!r})",
                                     field=label)
        elif option.name == "sd_model_checkpoint":
            if value in (None, ""):
                values[name] = None
                continue
            tag = checkpoint_name(value)
            if resolve is not None:
                try:
                    tag = resolve(tag)
                except InvalidRequest as exc:
                    raise NotFound(f"model {str(value)!r} not found ({label}): "
                                   f"{exc.message.split('; ', 1)[-1]}", field=label,
                                   a1111_error="RuntimeError", a1111_errors=f"model {str(value)!r} not found") from None
            values[name] = tag
        else:
            assert option.check is not None
            try:
                values[name] = option.check(value)
            except ValueError as exc:
                raise InvalidRequest(f"{label} must be {exc}, not {value!r}", field=label) from None
    return values, ignored


def fields(values: dict[str, Any]) -> dict[str, Any]:
    """Honoured option values as native request fields."""
    return {OPTIONS[name].field: value for name, value in values.items() if OPTIONS[name].field is not None}


class OptionsStore:
    """Each owner's honoured options (the API key's name; ``""`` for the open service), in one JSON file that
    the workers of a server share: read when it changed, written whole by atomic rename under a lock file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] = {}
        self._stamp: tuple[int, int] | None = None

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = {}
            self._data = {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}
            self._stamp = stamp
        return self._data

    def get(self, owner: str | None) -> dict[str, Any]:
        """The owner's honoured options (only those it set)."""
        with self._lock:
            return dict(self._read().get(owner or "", {}))

    def update(self, owner: str | None, values: dict[str, Any]) -> dict[str, Any]:
        """Set honoured options for ``owner`` (a None value goes back to the default); returns them all."""
        with self._exclusive():
            data = {k: dict(v) for k, v in self._read().items()}
            mine = data.setdefault(owner or "", {})
            for name, value in values.items():
                if value is None:
                    mine.pop(name, None)
                else:
                    mine[name] = value
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
            self._stamp = None
            return dict(self._read().get(owner or "", {}))
