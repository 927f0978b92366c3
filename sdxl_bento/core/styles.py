"""Prompt styles: an operator's named prompt fragments, applied by name (``styles: [...]``).

The file is AUTOMATIC1111's ``styles.csv`` as it is (columns ``name``, ``prompt``, ``negative_prompt``), or
YAML/JSON: a list of ``{name, prompt, negative_prompt}`` or a mapping of name to ``{prompt, negative_prompt}``.
A style's text with ``{prompt}`` puts the request's prompt in that place; without it the style is appended
after a comma, as A1111 does. Styles apply in the order named, to the prompt and the negative prompt alike.
The file is re-read when it changes (checked at most once a second), so styles can be edited while serving.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge(style_text: str, prompt: str) -> str:
    """One style's text applied to a prompt: in place of ``{prompt}``, else after it with a comma."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def parse(text: str, suffix: str) -> list[Style]:
    """The styles of a file's text (``suffix``: ``.csv``, ``.yaml``/``.yml`` or ``.json``)."""
    if suffix == ".csv":
        rows: Any = list(csv.DictReader(io.StringIO(text), skipinitialspace=True))
    elif suffix == ".json":
        rows = json.loads(text)
    else:
        import yaml

        rows = yaml.safe_load(text) or []
    if isinstance(rows, dict):
        rows = [{"name": name, **(value if isinstance(value, dict) else {"prompt": value})}
                for name, value in rows.items()]
    if not isinstance(rows, list):
        raise ValueError("a styles file holds a list of styles (name, prompt, negative_prompt)")
    styles: dict[str, Style] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not str(row.get("name") or "").strip():
            raise ValueError(f"style {i + 1} has no name")
        name = str(row["name"]).strip()
        styles[name] = Style(name, str(row.get("prompt") or ""), str(row.get("negative_prompt") or ""))
    return list(styles.values())


class StyleBook:
    """The operator's styles, from ``path`` (None: no styles). A file that cannot be read or parsed keeps the
    styles read before, and says why in the log."""

    def __init__(self, path: Path | None, *, check_every_s: float = 1.0) -> None:
        self.path = path
        self.check_every_s = check_every_s
        self._styles: dict[str, Style] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if path is not None:
            self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now - self._checked < self.check_every_s:
            return
        self._checked = now
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            styles = parse(self.path.read_text(encoding="utf-8-sig"), self.path.suffix.lower())
        except (OSError, ValueError) as exc:
            logger.error("styles file %s: %s (keeping the %d styles read before)", self.path, exc, len(self._styles))
            return
        self._styles = {style.name: style for style in styles}
        self._stamp = stamp
        logger.info("styles file %s: %d styles", self.path, len(styles))

    def styles(self) -> list[Style]:
        with self._lock:
            self._reload()
            return list(self._styles.values())

    def apply(self, names: list[str], prompt: str, negative_prompt: str) -> tuple[str, str]:
        """The prompt and negative prompt with the named styles applied; an unknown name is a 400."""
        if not names:
            return prompt, negative_prompt
        with self._lock:
            self._reload()
            known = dict(self._styles)
        for name in names:
            style = known.get(name)
            if style is None:
                listed = ", ".join(sorted(known)) or "none (the operator has no styles file)"
                raise InvalidRequest(f"styles: no style named {name!r}; available: {listed}", field="styles")
            prompt = merge(style.prompt, prompt) if style.prompt else prompt
            negative_prompt = merge(style.negative_prompt, negative_prompt) if style.negative_prompt \
                else negative_prompt
        return prompt, negative_prompt
