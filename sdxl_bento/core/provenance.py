"""Provenance: C2PA Content Credentials on every image the service makes, and a reading of any image's.

The invisible watermark (``watermark.py``) says "an SDXL model made this" to anyone who looks, but carries no
signer and no detail, and a resize removes it. A C2PA manifest is signed with the operator's certificate and
hard-binds the file's bytes: which service made the image, as which action (created by a trained model, or an
edit of an earlier image of this service, which it names as its ingredient), with which model (tag and the
sha256 of its weights) and a sha256 of the image's ``parameters`` text. The prompt is in the manifest only when
the operator opts in (it stays in the ``parameters`` text beside it, as before).

The manifest goes beside the pixels (a PNG ``caBX`` chunk, JPEG APP11 segments, a WebP ``C2PA`` chunk): the
pixels and the ``parameters`` text are left as they are, so the same seed still gives the same pixels and any
tool that read the text still reads it. Every c2pa object is made per call (a signer costs well under a
millisecond, BENCHMARKS.md), so the encode threads share no native handle. Reading never reaches the network
(no remote manifests, no OCSP): an uploaded file must not make the server fetch anything.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, Field

from .. import __version__

logger = logging.getLogger(__name__)

AGENT = {"name": "sdxl-bento", "version": __version__}
IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
TRAINED = IPTC + "trainedAlgorithmicMedia"
"""Made by a trained model: every image of this service, and every edit of one of its images."""
COMPOSITE = IPTC + "compositeWithTrainedAlgorithmicMedia"
"""A trained model's work on a foreign image (image to image or inpainting of an upload not made here)."""
GENERATION_LABEL = "org.sdxl-bento.generation"
"""This service's own assertion: mode, models and their weights' sha256, the parameters' sha256."""
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
_OFFLINE = {"remote_manifest_fetch": False, "ocsp_fetch": False}
_ACTIONS = ("c2pa.actions", "c2pa.actions.v2")


# -- what the operator configures -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """Who signs: the signing certificate's subject and serial number, and its issuers. A manifest that validates
    under these issuers alone, with this serial number, was signed with this certificate."""

    subject: str
    serial: int
    issuers_pem: str = field(repr=False)
    """The certificates after the first in the chain file: the anchors under which a manifest of ours is trusted."""

    @classmethod
    def load(cls, cert_path: Path) -> Identity:
        return cls.of(_certificates(cert_path))

    @classmethod
    def of(cls, certs: list[Any]) -> Identity:
        from cryptography.hazmat.primitives import serialization

        pem = serialization.Encoding.PEM
        return cls(subject=certs[0].subject.rfc4514_string(), serial=certs[0].serial_number,
                   issuers_pem="".join(c.public_bytes(pem).decode() for c in certs[1:]))


def _certificates(cert_path: Path) -> list[Any]:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
    except ValueError as exc:
        raise ValueError(f"SDXL_BENTO_C2PA_CERT ({cert_path}): not PEM certificates ({exc})") from None


@dataclass(frozen=True)
class Credentials:
    """The operator's signing certificate (first), its chain, and the private key of the first certificate."""

    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    alg: str
    """``es256`` (EC P-256) or ``ed25519``, from the key."""
    identity: Identity

    @property
    def subject(self) -> str:
        return self.identity.subject

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> Credentials:
        """Read and check the PEM files (``ValueError`` naming what is wrong); the key is kept as PKCS#8."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519

        certs = _certificates(cert_path)
        try:
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"SDXL_BENTO_C2PA_KEY ({key_path}): not an unencrypted PEM private key ({exc})") from None
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            alg = "es256"
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            alg = "ed25519"
        else:
            raise ValueError(f"SDXL_BENTO_C2PA_KEY ({key_path}): an EC P-256 (ES256) or Ed25519 key is needed, "
                             f"not {type(key).__name__}")
        leaf = certs[0]
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise ValueError(f"SDXL_BENTO_C2PA_KEY does not belong to the first certificate of SDXL_BENTO_C2PA_CERT "
                             f"({leaf.subject.rfc4514_string()}); the signing certificate comes first, then its chain")
        now = dt.datetime.now(dt.timezone.utc)
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise ValueError(f"the signing certificate {leaf.subject.rfc4514_string()} is valid from "
                             f"{leaf.not_valid_before_utc:%Y-%m-%d} to {leaf.not_valid_after_utc:%Y-%m-%d}, not now")
        pem = serialization.Encoding.PEM
        return cls(chain_pem=b"".join(c.public_bytes(pem) for c in certs),
                   key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
                   alg=alg, identity=Identity.of(certs))


# -- what one image's manifest says ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    tag: str
    weights_sha256: str | None
    """sha256 over the model's weight files (``store.modelstore.weights_sha256``); None when unknown."""


@dataclass(frozen=True)
class Source:
    """The image an edit started from, as it was given (bytes); ``ours`` when this service made it."""

    data: bytes = field(repr=False)
    media_type: str
    ours: bool
    image_id: str | None = None


@dataclass(frozen=True)
class Claim:
    mode: str
    """``txt2img``, ``img2img``, ``inpaint`` or ``refine``."""
    model: Model
    parameters: str = field(repr=False)
    """The image's ``parameters`` text: its sha256 goes into the manifest."""
    prompt: str = field(default="", repr=False)
    negative_prompt: str = field(default="", repr=False)
    refiner: Model | None = None
    loras: tuple[tuple[str, float, str | None], ...] = ()
    """(name, weight, sha256) of each LoRA adapter."""
    source: Source | None = None


def parameters_sha256(parameters: str) -> str:
    return hashlib.sha256(parameters.encode("utf-8")).hexdigest()


def manifest_definition(claim: Claim, media_type: str, *, include_prompt: bool = False) -> dict[str, Any]:
    """The manifest of one image (before signing): an action and this service's generation assertion."""
    edit = claim.source is not None and claim.source.ours
    foreign = claim.source is not None and not claim.source.ours
    description = {"txt2img": "text to image", "img2img": "image to image", "inpaint": "inpainting",
                   "refine": "refined with the SDXL refiner"}.get(claim.mode, claim.mode)
    action: dict[str, Any] = {
        "action": "c2pa.edited" if edit else "c2pa.created",
        "digitalSourceType": COMPOSITE if foreign else TRAINED,
        "softwareAgent": dict(AGENT),
        "description": f"{description} with {claim.model.tag}",
    }
    generation: dict[str, Any] = {
        "mode": claim.mode,
        "model": {"tag": claim.model.tag, "weights_sha256": claim.model.weights_sha256},
        "parameters_sha256": parameters_sha256(claim.parameters),
    }
    if claim.refiner is not None:
        generation["refiner"] = {"tag": claim.refiner.tag, "weights_sha256": claim.refiner.weights_sha256}
    if claim.loras:
        generation["loras"] = [{"name": n, "weight": w, "sha256": s} for n, w, s in claim.loras]
    if foreign:
        generation["source"] = "an uploaded image not made by this service (not recorded)"
    if include_prompt:
        generation.update(prompt=claim.prompt, negative_prompt=claim.negative_prompt)
    return {
        "claim_generator_info": [dict(AGENT)],
        "title": f"sdxl-bento-{claim.mode}.{EXTENSIONS.get(media_type, 'img')}",
        "format": media_type,
        "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": [action]}},
                       {"label": GENERATION_LABEL, "data": generation}],
    }


class Provenance:
    """Signs images with the operator's credentials; recognises manifests it signed."""

    def __init__(self, credentials: Credentials, *, tsa_url: str | None = None, include_prompt: bool = False,
                 reader: ManifestReader | None = None) -> None:
        self.credentials = credentials
        self.tsa_url = tsa_url or None
        self.include_prompt = include_prompt
        self.reader = reader or ManifestReader(own=credentials.identity)

    def sign(self, data: bytes, media_type: str, claim: Claim, *, timestamp: bool = True) -> bytes:
        """The same file with its manifest embedded (``c2pa.C2paError`` when the library refuses)."""
        import c2pa

        definition = manifest_definition(claim, media_type, include_prompt=self.include_prompt)
        settings = {"builder": {"thumbnail": {"enabled": False}}, "verify": dict(_OFFLINE)}
        tsa = self.tsa_url if timestamp else None
        out = io.BytesIO()
        with c2pa.Context.from_dict(settings) as context, \
                c2pa.Signer.from_info(c2pa.C2paSignerInfo(self.credentials.alg, self.credentials.chain_pem,
                                                          self.credentials.key_pem, tsa)) as signer, \
                c2pa.Builder(definition, context=context) as builder:
            source = claim.source
            if source is not None and source.ours:
                builder.set_intent(c2pa.C2paBuilderIntent.EDIT)  # adds c2pa.opened, linked to the parent
                title = f"{source.image_id or 'source'}.{EXTENSIONS.get(source.media_type, 'img')}"
                builder.add_ingredient({"title": title, "relationship": "parentOf"}, source.media_type,
                                       io.BytesIO(source.data))
            builder.sign(signer, media_type, io.BytesIO(data), out)
        return out.getvalue()

    def is_ours(self, data: bytes) -> bool:
        """Whether ``data`` carries a valid manifest signed with this service's certificate."""
        return self.reader.read(data).from_this_service

    def self_test(self) -> None:
        """At startup: sign a small image (without the TSA) and recognise it, or raise with the library's reason."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (128, 128, 128)).save(buffer, format="PNG")
        signed = self.sign(buffer.getvalue(), "image/png",
                           Claim(mode="txt2img", model=Model("self-test", None), parameters="self-test"),
                           timestamp=False)
        report = self.reader.read(signed)
        if not report.valid:
            raise ValueError("a test image signed with the C2PA credentials does not validate: "
                             + "; ".join(f"{r.code}: {r.explanation}" for r in report.reasons))
        if not report.from_this_service:
            logger.warning("C2PA: this service's own manifests cannot be recognised (the certificate file has no "
                           "issuer certificate after the signing certificate): img2img of an uploaded image made "
                           "here is recorded as a foreign source")


# -- reading -----------------------------------------------------------------------------------------------------
class Reason(BaseModel):
    code: str
    explanation: str = ""


class Signer(BaseModel):
    common_name: Optional[str] = None
    issuer: Optional[str] = None
    serial_number: Optional[str] = None
    alg: Optional[str] = None
    time: Optional[str] = Field(default=None, description="The RFC 3161 timestamp's time, when the manifest has one.")


class Action(BaseModel):
    action: str
    digital_source_type: Optional[str] = None
    software_agent: Optional[str] = None
    description: Optional[str] = None


class Ingredient(BaseModel):
    title: Optional[str] = None
    format: Optional[str] = None
    relationship: Optional[str] = None
    has_manifest: bool = False
    signer: Optional[Signer] = None
    claim_generator: Optional[str] = None
    failures: list[Reason] = Field(default_factory=list,
                                   description="What failed when the ingredient's own manifest was validated.")


class C2paReport(BaseModel):
    present: bool = Field(description="The file carries a C2PA manifest store.")
    valid: bool = Field(default=False, description="Signature and hashes check out (state Valid or Trusted).")
    trusted: bool = Field(default=False, description="The signer chains to a configured trust anchor.")
    state: Optional[str] = Field(default=None, description="The C2PA library's validation state: Invalid, Valid "
                                                           "or Trusted.")
    from_this_service: bool = Field(default=False, description="Valid and signed with this service's certificate.")
    reasons: list[Reason] = Field(default_factory=list, description="Why it is invalid or untrusted, as the C2PA "
                                                                    "library says.")
    signer: Optional[Signer] = None
    claim_generator: Optional[str] = None
    title: Optional[str] = None
    actions: list[Action] = Field(default_factory=list)
    ingredients: list[Ingredient] = Field(default_factory=list)
    generation: Optional[dict[str, Any]] = Field(default=None, description="This service's generation assertion "
                                                                           "(mode, models, parameters' sha256).")
    manifests: int = Field(default=0, description="Manifests in the store (the active one and its ingredients').")


class ManifestReader:
    """Reads and validates a file's manifest store, offline, under the configured trust anchors."""

    def __init__(self, trust_anchors: str | None = None, own: Identity | None = None) -> None:
        self.trust_anchors = trust_anchors or None
        """PEM roots (``SDXL_BENTO_C2PA_TRUST_ANCHORS``) added to the library's own."""
        self.own = own

    def read(self, data: bytes) -> C2paReport:
        import c2pa

        settings: dict[str, Any] = {"verify": dict(_OFFLINE)}
        if self.trust_anchors:
            settings["trust"] = {"user_anchors": self.trust_anchors}
        try:
            with c2pa.Context.from_dict(settings) as context:
                reader = c2pa.Reader.try_create(None, io.BytesIO(data), None, context)
                if reader is None:
                    return C2paReport(present=False)
                with reader:
                    store = json.loads(reader.json())
        except c2pa.C2paError as exc:
            return C2paReport(present=True, state="Invalid",
                              reasons=[Reason(code=_error_code(exc), explanation=str(exc))])
        report = _report(store)
        report.from_this_service = self._ours(data, report)
        return report

    def _ours(self, data: bytes, report: C2paReport) -> bool:
        """Signed with our certificate: trusted under our own issuers alone, with our certificate's serial."""
        own = self.own
        if own is None or not report.valid or not own.issuers_pem or report.signer is None \
                or report.signer.serial_number != str(own.serial):
            return False
        import c2pa

        settings = {"verify": dict(_OFFLINE), "trust": {"trust_anchors": own.issuers_pem}}
        try:
            with c2pa.Context.from_dict(settings) as context, \
                    c2pa.Reader(None, io.BytesIO(data), None, context) as reader:
                return reader.get_validation_state() == "Trusted"
        except c2pa.C2paError:
            return False


def _error_code(exc: Exception) -> str:
    """``Verify``, ``Signature``, ``JumbfParseError``, ...: the library's error kind, from its message."""
    text = str(exc)
    head = text.split(":", 1)[0].strip()
    return head if head and " " not in head else type(exc).__name__.lstrip("_").removeprefix("C2pa") or "error"


def _signer(info: dict[str, Any] | None) -> Signer | None:
    if not info:
        return None
    return Signer(common_name=info.get("common_name"), issuer=info.get("issuer"),
                  serial_number=info.get("cert_serial_number"), alg=info.get("alg"), time=info.get("time"))


def _generator(manifest: dict[str, Any]) -> str | None:
    info = manifest.get("claim_generator_info") or []
    if info and isinstance(info[0], dict):
        return " ".join(str(info[0][k]) for k in ("name", "version") if info[0].get(k))
    return manifest.get("claim_generator")


def _failures(results: dict[str, Any] | None) -> list[Reason]:
    active = (results or {}).get("activeManifest") or {}
    return [Reason(code=f.get("code", ""), explanation=f.get("explanation", "")) for f in active.get("failure", [])]


def _report(store: dict[str, Any]) -> C2paReport:
    manifests = store.get("manifests") or {}
    manifest = manifests.get(store.get("active_manifest") or "", {})
    state = store.get("validation_state")
    reasons = _failures(store.get("validation_results"))
    if not reasons:
        reasons = [Reason(code=s.get("code", ""), explanation=s.get("explanation", ""))
                   for s in store.get("validation_status") or []]
    actions, generation = [], None
    for assertion in manifest.get("assertions") or []:
        if assertion.get("label") in _ACTIONS:
            for a in (assertion.get("data") or {}).get("actions") or []:
                agent = a.get("softwareAgent")
                agent_text = " ".join(str(agent[k]) for k in ("name", "version") if agent.get(k)) \
                    if isinstance(agent, dict) else agent
                actions.append(Action(action=a.get("action", ""), digital_source_type=a.get("digitalSourceType"),
                                      software_agent=agent_text, description=a.get("description")))
        elif assertion.get("label") == GENERATION_LABEL:
            generation = assertion.get("data")
    ingredients = []
    for ing in manifest.get("ingredients") or []:
        parent = manifests.get(ing.get("active_manifest") or "", {})
        ingredients.append(Ingredient(
            title=ing.get("title"), format=ing.get("format"), relationship=ing.get("relationship"),
            has_manifest=bool(ing.get("active_manifest")), signer=_signer(parent.get("signature_info")),
            claim_generator=_generator(parent) if parent else None,
            failures=_failures(ing.get("validation_results"))))
    return C2paReport(present=True, valid=state in ("Valid", "Trusted"), trusted=state == "Trusted", state=state,
                      reasons=reasons, signer=_signer(manifest.get("signature_info")),
                      claim_generator=_generator(manifest), title=manifest.get("title"), actions=actions,
                      ingredients=ingredients, generation=generation, manifests=len(manifests))
