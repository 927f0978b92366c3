"""The image store (plain files, by random UUID) and image encoding with infotext.

Each image carries its generation parameters in the AUTOMATIC1111 ``parameters`` convention: a
PNG text chunk, or EXIF UserComment for JPEG and WebP, so the usual tools can read them back.
Ids are parsed as UUIDs before any path is built, so no path outside the store can be read.

The store folder may be shared by several processes and replicas (an NFS volume), so it holds
only plain files written by atomic rename: ``<id>.<fmt>`` and its sidecar ``<id>.json`` (owner,
created, size, format). The sidecar is written first and deleted last, so an image never exists
without it; an image without one predates sidecars (owner None, created = its mtime). The image's
mtime is set to its created time, so the sweep orders and ages images by one ``stat`` each.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from ..errors import InvalidRequest, NotFound

logger = logging.getLogger(__name__)

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """The ``parameters`` text: prompt, negative prompt, then ``Key: value`` pairs (A1111 layout)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    pairs = []
    for key, value in params.items():
        text = str(value)
        if any(c in text for c in ",:\n\""):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        pairs.append(f"{key}: {text}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def encode(image: Image.Image, fmt: str, quality: int = 90, parameters: str | None = None) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_text("parameters", parameters)
        # zlib's run-length strategy: the same size as the default at 2.5x the speed (BENCHMARKS.md)
        image.save(buffer, format="PNG", pnginfo=info, compress_type=zlib.Z_RLE)
    elif fmt in ("jpeg", "webp"):
        exif = Image.Exif()
        if parameters:
            exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        image.convert("RGB").save(buffer, format=fmt.upper(), quality=quality, exif=exif.tobytes())
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buffer.getvalue()


def read_parameters(data: bytes) -> str | None:
    """The embedded ``parameters`` text of an encoded image, or None."""
    image = Image.open(io.BytesIO(data))
    if image.format == "PNG":
        return image.info.get("parameters")
    raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(raw, bytes) and raw.startswith(b"UNICODE\0"):
        return raw[8:].decode("utf-16-be")
    return raw if isinstance(raw, str) else None


def parse_id(image_id: str) -> str:
    """The canonical form of an image id; anything that is not a UUID is refused."""
    try:
        return str(uuid.UUID(str(image_id)))
    except ValueError:
        raise InvalidRequest(f"{image_id!r} is not a valid image id (a UUID)") from None


STALE_TMP_S = 3600.0
"""A temporary file (or a sidecar without its image) older than this is a crashed writer's leftover."""

_NAME = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.(png|jpeg|webp|json)")


@dataclass(frozen=True)
class StoredImage:
    path: Path
    media_type: str
    owner: str | None
    """The name of the API key that made it; None when made without keys or before sidecars existed."""
    created: float


@dataclass(frozen=True)
class SweepStats:
    expired: int = 0
    """Images deleted for their age."""
    evicted: int = 0
    """Images deleted, oldest first, to bring the store under its byte bound."""
    freed_bytes: int = 0
    stale_files: int = 0
    """Leftover temporary files and sidecars without an image, deleted."""
    remaining: int = 0
    remaining_bytes: int = 0
    """Bytes of the images left (sidecars, a few hundred bytes each, are not counted)."""

    @property
    def deleted(self) -> int:
        return self.expired + self.evicted


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, fmt: str, owner: str | None = None, manifest: dict[str, Any] | None = None) -> str:
        """Write the sidecar, then the image, each atomically (temporary file, then rename); return the new id.
        ``manifest`` (``core/manifest.py``) is kept in the sidecar, so it goes when the image goes."""
        if fmt not in MEDIA_TYPES:
            raise ValueError(f"unknown image format {fmt!r}")
        image_id, created = str(uuid.uuid4()), time.time()
        meta = {"owner": owner, "created": created, "bytes": len(data), "format": fmt}
        if manifest is not None:
            meta["manifest"] = manifest
        self._write(f"{image_id}.json", json.dumps(meta).encode())
        self._write(f"{image_id}.{fmt}", data, mtime=created)
        return image_id

    def find(self, image_id: str) -> tuple[Path, str]:
        """(path, media type) of a stored image; NotFound when absent. Reads no sidecar."""
        path, fmt = self._locate(parse_id(image_id))
        return path, MEDIA_TYPES[fmt]

    def info(self, image_id: str) -> StoredImage:
        """The stored image with its owner; NotFound when absent, or when its sidecar is unreadable
        (fail closed: an unreadable owner must not read as "no owner")."""
        canonical = parse_id(image_id)
        path, fmt = self._locate(canonical)
        try:
            meta = json.loads((self.root / f"{canonical}.json").read_bytes())
            owner, created = meta["owner"], float(meta["created"])
            if owner is not None and not isinstance(owner, str):
                raise TypeError("owner is not a string")
        except FileNotFoundError:
            try:  # made before sidecars; or deleted just now, image first
                owner, created = None, path.stat().st_mtime
            except FileNotFoundError:
                raise NotFound(f"no image with id {canonical}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("image %s: unreadable sidecar (%s)", canonical, exc)
            raise NotFound(f"no image with id {canonical}") from None
        return StoredImage(path=path, media_type=MEDIA_TYPES[fmt], owner=owner, created=created)

    def manifest(self, image_id: str) -> dict[str, Any]:
        """The image's manifest with its id and time; NotFound when the image has none (made before manifests, or
        copied in from another replica's cache)."""
        canonical = parse_id(image_id)
        self._locate(canonical)
        try:
            meta = json.loads((self.root / f"{canonical}.json").read_bytes())
        except (OSError, ValueError):
            meta = {}
        manifest = meta.get("manifest") if isinstance(meta, dict) else None
        if not isinstance(manifest, dict):
            raise NotFound(f"image {canonical} has no manifest")
        image = {**manifest.get("image", {}), "id": canonical}
        created = meta.get("created")
        if isinstance(created, (int, float)):
            from datetime import datetime, timezone

            created = datetime.fromtimestamp(created, timezone.utc).isoformat()
        return {**manifest, "image": image, "created": created}

    def load(self, image_id: str) -> Image.Image:
        path, _ = self.find(image_id)
        with Image.open(path) as image:
            return image.convert("RGB")

    def sweep(self, *, max_age_s: float, max_bytes: int, now: float | None = None) -> SweepStats:
        """Delete images older than ``max_age_s``, then the oldest until at most ``max_bytes`` remain,
        and leftovers (temporary files, sidecars without an image) older than an hour.

        One ``scandir`` pass and one ``stat`` per image. Safe beside writers and other sweepers: a file
        gone before its turn counts as gone, not as deleted by this sweep; a fresh sidecar whose image
        is still being written is left alone."""
        now = time.time() if now is None else now
        images: list[tuple[float, int, str, str]] = []  # (mtime, size, image name, id)
        sidecars: dict[str, str] = {}  # id -> sidecar name
        stale = 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") and name.endswith(".tmp"):
                    stale += self._unlink_if_older(entry, now - STALE_TMP_S)
                    continue
                match = _NAME.fullmatch(name)
                if match is None:
                    continue
                if match[2] == "json":
                    sidecars[match[1]] = name
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    images.append((st.st_mtime, st.st_size, name, match[1]))

        for image_id in sidecars.keys() - {image_id for *_, image_id in images}:
            stale += self._unlink_if_older(self.root / sidecars[image_id], now - STALE_TMP_S)

        images.sort()
        total = sum(size for _, size, _, _ in images)
        expired = evicted = freed = gone = 0
        for mtime, size, name, image_id in images:
            too_old = mtime < now - max_age_s
            if not too_old and total <= max_bytes:
                break
            total -= size  # gone either way, by this sweep or another
            if self._delete(name, image_id):
                freed += size
                expired += too_old
                evicted += not too_old
            gone += 1
        return SweepStats(expired=expired, evicted=evicted, freed_bytes=freed, stale_files=stale,
                          remaining=len(images) - gone, remaining_bytes=total)

    def _locate(self, canonical: str) -> tuple[Path, str]:
        for fmt in MEDIA_TYPES:
            path = self.root / f"{canonical}.{fmt}"
            if path.is_file():
                return path, fmt
        raise NotFound(f"no image with id {canonical}")

    def _write(self, name: str, data: bytes, mtime: float | None = None) -> None:
        tmp = self.root / f".{name}.tmp"
        tmp.write_bytes(data)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        os.replace(tmp, self.root / name)

    def _delete(self, name: str, image_id: str) -> bool:
        """Delete an image, then its sidecar; False when another process deleted the image first."""
        try:
            os.unlink(self.root / name)
        except FileNotFoundError:
            return False
        try:
            os.unlink(self.root / f"{image_id}.json")
        except FileNotFoundError:
            pass
        return True

    @staticmethod
    def _unlink_if_older(entry: os.DirEntry[str] | Path, cutoff: float) -> int:
        try:
            if entry.stat().st_mtime < cutoff:
                os.unlink(entry)
                return 1
        except FileNotFoundError:
            pass
        return 0
