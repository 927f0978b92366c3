"""API keys and the keys file: which key is which principal, in which tier (the tiers: ``core/policy.py``).

Keys are stored only as SHA-256 hashes, so a leaked keys file gives no one access; the raw key is
shown once, by ``add_key``, and never appears in a repr, a log line or an error message.
Without a keys file the service runs open: everyone is ``OPEN_PRINCIPAL`` (``anonymous``), in ``OPEN_TIER``.
A running service follows its keys file through ``KeyFile``: a change is picked up within a second
(or at once on SIGHUP), so ``sdxl-bento keys add`` needs no restart.

Keys file, YAML (``.yaml``/``.yml``) or TOML (``.toml``), chosen by suffix::

    tiers:                  # optional: change fields of default tiers, or define new ones (every field needed)
      free: {requests_per_minute: 5}
    keys:
      - name: marketing     # shown in logs and the audit log; unique
        sha256: "<64 hex>"  # sha256 of the raw key, hex
        tier: standard
        overrides: {images_per_minute: 200}   # optional: any Tier field except name
        operator: true      # optional (default false): may read, cancel and retry every key's tasks and images
        webhook_secret: "whsec_..."   # signs this key's webhook deliveries (made by `keys add`; shown once)
        webhook: "https://hooks.example.com/sdxl"     # optional: default webhook of this key's requests
        webhook_events: [job.completed, job.failed]    # optional: its default events

The same in TOML: ``[tiers.free]`` tables and one ``[[keys]]`` table per key.
Anything wrong (unknown tier, field or top-level entry, a hash that is not 64 hex digits, a
duplicate name or hash, a bad value) is a ``ValueError`` naming the file, the key and the problem:
the service refuses to start rather than run with a half-understood file.

``add_key`` rewrites a YAML file through ``yaml.safe_dump`` (comments are not kept); to a TOML file
it appends one ``[[keys]]`` table as text (comments are kept), written by a small emitter and
parsed back before the file is replaced.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import signal
import stat
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..core.policy import DEFAULT_TIERS, OVERRIDABLE, Principal, Tier

logger = logging.getLogger(__name__)

KEY_PREFIX = "sk-sdxl-"
WEBHOOK_SECRET_PREFIX = "whsec_"
_RAW_KEY = re.compile(re.escape(KEY_PREFIX) + r"\S*")
_RAW_SECRET = re.compile(re.escape(WEBHOOK_SECRET_PREFIX) + r"\S*")
_KEY_FIELDS = {"name", "sha256", "tier", "overrides", "operator", "webhook_secret", "webhook", "webhook_events"}

class KeyStore:
    """Stored key hashes and the tiers they map to; built by ``load`` (or ``from_dict``)."""

    def __init__(self, tiers: Mapping[str, Tier], keys: Iterable[tuple[bytes, Principal]] = ()) -> None:
        self.tiers: dict[str, Tier] = dict(tiers)
        self._keys = list(keys)
        self._by_name = {principal.name: principal for _, principal in self._keys}

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        path = Path(path)
        fmt = _format(path)
        text, _ = _read(path)
        return cls.from_dict(_parse(text, fmt, path), source=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "keys file") -> KeyStore:
        try:
            return cls._build(data)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def _build(cls, data: Any) -> KeyStore:
        if not isinstance(data, Mapping):
            raise ValueError("the top level must be a mapping with 'tiers' and 'keys'")
        if unknown := set(data) - {"tiers", "keys"}:
            raise ValueError(f"unknown top-level entries {sorted(unknown)} (allowed: tiers, keys)")
        tiers = dict(DEFAULT_TIERS)
        tier_specs = data.get("tiers") or {}
        if not isinstance(tier_specs, Mapping):
            raise ValueError("'tiers' must be a mapping of tier name to fields")
        for name, spec in tier_specs.items():
            tiers[name] = _tier(name, spec, tiers.get(name))
        key_specs = data.get("keys") or []
        if not isinstance(key_specs, list):
            raise ValueError("'keys' must be a list")
        keys: list[tuple[bytes, Principal]] = []
        names: set[str] = set()
        hashes: dict[bytes, str] = {}
        for i, spec in enumerate(key_specs):
            digest, principal = _key(i, spec, tiers)
            if principal.name in names:
                raise ValueError(f"key {principal.name!r}: duplicate name")
            if digest in hashes:
                raise ValueError(f"key {principal.name!r}: same sha256 as key {hashes[digest]!r}")
            names.add(principal.name)
            hashes[digest] = principal.name
            keys.append((digest, principal))
        return cls(tiers, keys)

    @property
    def names(self) -> list[str]:
        return [principal.name for _, principal in self._keys]

    def __len__(self) -> int:
        return len(self._keys)

    def by_name(self, name: str) -> Principal | None:
        """The principal of the key called ``name`` (task and image owners are stored by name)."""
        return self._by_name.get(name)

    def __repr__(self) -> str:
        return f"KeyStore(keys={len(self._keys)}, tiers={len(self.tiers)})"

    def authenticate(self, raw_key: str | None) -> Principal | None:
        """The principal whose hash matches, or None.

        Every stored hash is compared, in constant time, with no early exit, so the time taken
        says nothing about which key (if any) matched.
        """
        if not raw_key:
            return None
        digest = hashlib.sha256(raw_key.encode("utf-8", "surrogatepass")).digest()
        found = None
        for stored, principal in self._keys:
            if hmac.compare_digest(digest, stored):
                found = principal
        return found


Stamp = tuple[int, int, int]
"""``(st_ino, st_mtime_ns, st_size)``: a new inode (an atomic replace) or an edit in place both change it."""


class KeyFile:
    """The live keys of a keys file: what ``KeyStore`` offers, following the file while the service runs.

    Why: keys are added (``sdxl-bento keys add``) and revoked on a running service, in every worker.
    The file is stat'ed at most once per ``check_every_s``, lazily by whichever call comes first (no
    thread), and reloaded when its ``(st_ino, st_mtime_ns, st_size)`` changed, or at once on SIGHUP
    (``install_sighup``). A file that no longer loads (mistyped, half-written, empty, gone) keeps the keys
    loaded before, with one error logged per change: a bad edit never locks everyone out.
    """

    def __init__(self, path: Path | str, *, check_every_s: float = 1.0) -> None:
        if not check_every_s >= 0:
            raise ValueError(f"check_every_s must be 0 or more, not {check_every_s!r}")
        self.path = Path(path)
        self.check_every_s = check_every_s
        fmt = _format(self.path)
        text, self._stamp = _read(self.path)  # the stamp of the text read: a later change is always seen
        self._store = KeyStore.from_dict(_parse(text, fmt, self.path), source=str(self.path))
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._pending = False  # SIGHUP asked for a reload
        self._sighup = False

    def __repr__(self) -> str:
        return f"KeyFile({str(self.path)!r}, keys={len(self._store)})"

    @property
    def store(self) -> KeyStore:
        """The current keys (checks the file first, when due)."""
        self._check()
        return self._store

    @property
    def tiers(self) -> dict[str, Tier]:
        return self.store.tiers

    @property
    def names(self) -> list[str]:
        return self.store.names

    def __len__(self) -> int:
        return len(self.store)

    def authenticate(self, raw_key: str | None) -> Principal | None:
        return self.store.authenticate(raw_key)

    def by_name(self, name: str) -> Principal | None:
        return self.store.by_name(name)

    def reload(self) -> bool:
        """Load the file now, changed or not; True when new keys are in use."""
        with self._lock:
            self._checked = time.monotonic()
            return self._load()

    def install_sighup(self) -> None:
        """Reload on SIGHUP too. Call from the main thread (``signal.signal`` requires it); a handler
        installed before still runs, after this one. Calling it again changes nothing."""
        if self._sighup:
            return
        previous = signal.getsignal(signal.SIGHUP)

        def on_sighup(signum: int, frame: Any) -> None:
            self._pending = True  # if the lock is taken (perhaps by the code this interrupted), the next use reloads
            self._check()
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGHUP, on_sighup)
        self._sighup = True

    def _check(self) -> None:
        if not self._pending and time.monotonic() - self._checked < self.check_every_s:
            return
        if not self._lock.acquire(blocking=False):
            return  # another thread is checking: answer with the keys in hand meanwhile
        try:
            forced, self._pending = self._pending, False
            self._checked = time.monotonic()
            if forced or _stat(self.path) != self._stamp:
                self._load()
        finally:
            self._lock.release()

    def _load(self) -> bool:
        """Under ``_lock``: swap in the file's keys, or keep the old ones and log why not."""
        try:
            text, self._stamp = _read(self.path)
        except ValueError as exc:
            self._stamp = _stat(self.path)  # logged once, not at every check
            return self._failed(exc)
        try:
            if not text.strip():
                raise ValueError(f"{self.path}: the file is empty")
            store = KeyStore.from_dict(_parse(text, _format(self.path), self.path), source=str(self.path))
        except ValueError as exc:
            return self._failed(exc)
        self._store = store
        logger.info("keys file %s reloaded: %d keys", self.path, len(store))
        return True

    def _failed(self, exc: ValueError) -> bool:
        logger.error("keys file not reloaded, still using the %d keys loaded before: %s", len(self._store),
                     _redact(str(exc)))
        return False


def _read(path: Path) -> tuple[str, Stamp]:
    """The file's text and the stamp of that very file (fstat on the open descriptor)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the keys file: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return text, (st.st_ino, st.st_mtime_ns, st.st_size)


def _stat(path: Path) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _redact(text: str) -> str:
    """A raw key that a parser's message quotes (pasted into the file by mistake) stays out of logs."""
    return _RAW_SECRET.sub(WEBHOOK_SECRET_PREFIX + "[redacted]", _RAW_KEY.sub(KEY_PREFIX + "[redacted]", text))


def _tier(name: Any, spec: Any, base: Tier | None) -> Tier:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tier name {name!r} must be a non-empty string")
    if not isinstance(spec, Mapping):
        raise ValueError(f"tier {name!r}: must be a mapping of fields")
    if unknown := set(spec) - OVERRIDABLE:
        raise ValueError(f"tier {name!r}: unknown fields {sorted(unknown)}")
    values = {} if base is None else asdict(base)
    if base is None and (missing := OVERRIDABLE - set(spec)):
        raise ValueError(f"tier {name!r} is new, so it needs every field; missing {sorted(missing)}")
    try:
        return Tier(**{**values, **spec, "name": name})
    except ValueError as exc:
        raise ValueError(f"tier {name!r}: {exc}") from None


_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def _key(index: int, spec: Any, tiers: Mapping[str, Tier]) -> tuple[bytes, Principal]:
    if not isinstance(spec, Mapping):
        raise ValueError(f"keys[{index}]: must be a mapping with name, sha256, tier")
    name = spec.get("name")
    try:
        _check_name(name)
    except ValueError as exc:
        raise ValueError(f"keys[{index}]: {exc}") from None
    where = f"key {name!r}"
    if unknown := set(spec) - _KEY_FIELDS:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)} (allowed: {', '.join(sorted(_KEY_FIELDS))})")
    sha = spec.get("sha256")
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        raise ValueError(f"{where}: sha256 must be 64 hex digits (a quoted string)")
    tier_name = spec.get("tier")
    if tier_name not in tiers:
        raise ValueError(f"{where}: unknown tier {tier_name!r} (known: {', '.join(sorted(tiers))})")
    overrides = spec.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{where}: overrides must be a mapping of tier fields")
    if unknown := set(overrides) - OVERRIDABLE:
        raise ValueError(f"{where}: unknown override fields {sorted(unknown)}")
    try:
        tier = replace(tiers[tier_name], **overrides)
    except ValueError as exc:
        raise ValueError(f"{where}: overrides: {exc}") from None
    operator = spec.get("operator", False)
    if not isinstance(operator, bool):
        raise ValueError(f"{where}: operator must be true or false")
    return bytes.fromhex(sha), Principal(name, tier, sha[:8].lower(), operator=operator, **_webhook_fields(where, spec))


def _webhook_fields(where: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A key's webhook secret and default webhook, checked as requests' are (the schema's validator)."""
    from pydantic import SecretStr, ValidationError

    from ..schemas import GenerateRequest

    out: dict[str, Any] = {}
    secret = spec.get("webhook_secret")
    if secret is not None:
        if not isinstance(secret, str) or not valid_webhook_secret(secret):
            raise ValueError(f"{where}: webhook_secret must be whsec_ and base64 of at least 24 bytes")
        out["webhook_secret"] = SecretStr(secret)
    if spec.get("webhook") is not None or spec.get("webhook_events") is not None:
        try:
            checked = GenerateRequest(prompt="-", webhook=spec.get("webhook"), webhook_events=spec.get("webhook_events"))
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            raise ValueError(f"{where}: {'.'.join(map(str, error['loc'])) or 'webhook'}: "
                             f"{error['msg'].removeprefix('Value error, ')}") from None
        out["webhook"] = checked.webhook
        out["webhook_events"] = None if checked.webhook_events is None else tuple(
            e.value for e in checked.webhook_events)
    return out


def valid_webhook_secret(secret: str) -> bool:
    import base64
    import binascii

    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        return False
    try:
        return len(base64.b64decode(secret[len(WEBHOOK_SECRET_PREFIX):] + "==", validate=False)) >= 24
    except (binascii.Error, ValueError):
        return False


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and base64 of 32 random bytes."""
    import base64

    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or len(name) > 100 or name != name.strip() or not name.isprintable():
        raise ValueError(f"key name {name!r} must be 1-100 printable characters, without surrounding spaces")


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".toml":
        return "toml"
    raise ValueError(f"{path}: keys file must end in .yaml, .yml or .toml")


def _parse(text: str, fmt: str, path: Path) -> Any:
    if fmt == "toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {_redact(str(exc))}") from None
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None


def _yaml_problem(exc: Exception) -> str:
    """What went wrong and where, without the quote of the line that ``str(exc)`` adds (it may hold a raw
    key pasted into the file, cut so that no prefix marks it)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        return type(exc).__name__
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(exc, "context", None)
    return _redact(f"{context + ': ' if context else ''}{problem}{where}")


def extract_key(headers: Mapping[str, str]) -> str | None:
    """The key from ``Authorization: Bearer KEY`` (scheme in any case) or else ``X-API-Key: KEY``.

    Header names are matched in any case, so Starlette's ``Headers`` and plain dicts both work.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    scheme, _, rest = (lowered.get("authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return rest.strip()
    return (lowered.get("x-api-key") or "").strip() or None


def add_key(path: Path, name: str, tier: str, *, operator: bool = False, webhook_secret: str | None = None) -> str:
    """Create a key, store its hash under ``name`` in the keys file, and return the raw key.

    The file is created (mode 0600) when missing and replaced atomically otherwise (keeping its
    mode), so a running service's ``KeyFile`` never reads it half-written. The key is returned once
    for the caller to show; it is stored nowhere. ``webhook_secret`` (``new_webhook_secret()``) is stored as it
    is: the server needs it to sign the key's webhook deliveries.
    """
    path = Path(path)
    fmt = _format(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    data = _parse(text, fmt, path) if text.strip() else {}
    store = KeyStore.from_dict(data, source=str(path))
    _check_name(name)
    if name in store.names:
        raise ValueError(f"{path}: a key named {name!r} already exists")
    if tier not in store.tiers:
        raise ValueError(f"{path}: unknown tier {tier!r} (known: {', '.join(sorted(store.tiers))})")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry: dict[str, Any] = {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(), "tier": tier}
    if operator:
        entry["operator"] = True
    if webhook_secret is not None:
        entry["webhook_secret"] = webhook_secret
    if fmt == "yaml":
        import yaml

        new_text = yaml.safe_dump({**data, "keys": [*(data.get("keys") or []), entry]},
                                  sort_keys=False, allow_unicode=True)
    else:
        table = "[[keys]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in entry.items())
        new_text = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text.strip() else "") + table
    try:
        written = KeyStore.from_dict(_parse(new_text, fmt, path))
    except ValueError as exc:
        raise ValueError(f"{path}: cannot add the key to this file ({exc}); add a [[keys]] table by hand") from None
    added = written.authenticate(key)
    secret_kept = webhook_secret is None or (added is not None and added.webhook_secret is not None
                                             and added.webhook_secret.get_secret_value() == webhook_secret)
    if added is None or added.operator != operator or written.names[-1] != name or not secret_kept:
        raise ValueError(f"{path}: the key could not be added to this file; add it by hand")
    _write_atomic(path, new_text)
    return key


def set_webhook_secret(path: Path, name: str) -> str:
    """Give the key ``name`` a new webhook secret (made here, returned once); the old one stops signing.
    YAML files only: a TOML file is edited by hand (``webhook_secret = "whsec_..."`` in the key's table)."""
    path = Path(path)
    if _format(path) != "yaml":
        raise ValueError(f"{path}: set webhook_secret in the key's [[keys]] table by hand (whsec_ and base64 of 32 "
                         "random bytes); this command rewrites YAML files only")
    import yaml

    data = _parse(path.read_text(encoding="utf-8"), "yaml", path)
    KeyStore.from_dict(data, source=str(path))
    entry = next((e for e in data.get("keys") or [] if isinstance(e, Mapping) and e.get("name") == name), None)
    if entry is None:
        raise ValueError(f"{path}: no key named {name!r}")
    secret = new_webhook_secret()
    entry["webhook_secret"] = secret
    new_text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    KeyStore.from_dict(_parse(new_text, "yaml", path), source=str(path))
    _write_atomic(path, new_text)
    return secret


def _toml_value(value: str | bool) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else _toml_string(value)


def _toml_string(value: str) -> str:
    """A TOML basic string: quote and backslash escaped, control characters as \\uXXXX."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _write_atomic(path: Path, text: str) -> None:
    target = path.resolve()
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o600
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["KeyFile", "KeyStore", "add_key", "extract_key", "new_webhook_secret", "set_webhook_secret"]
