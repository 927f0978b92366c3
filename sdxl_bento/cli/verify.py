"""``sdxl-bento verify FILE``: what ``POST /verify`` answers, computed here, offline (no server, no network)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..core.generation import UPLOAD_MAX_PIXELS
from ..core.provenance import Identity, ManifestReader
from ..core.verify import VerifyReport, inspect
from ..errors import ServiceError

MAX_FILE_BYTES = 1 << 30
"""A local file may be larger than an upload; the pixels are still decoded only within ``UPLOAD_MAX_PIXELS``."""


def register(groups: argparse._SubParsersAction) -> None:
    cmd = groups.add_parser("verify", help="read an image's C2PA manifest, watermark and parameters (offline)",
                            description="What POST /verify answers, computed locally: the C2PA manifest (valid or "
                                        "not and why, signer, actions, ingredients), the SDXL invisible watermark, "
                                        "the parameters text.")
    cmd.add_argument("files", nargs="+", type=Path, metavar="FILE")
    cmd.add_argument("--trust-anchors", type=Path, default=_env_path("SDXL_BENTO_C2PA_TRUST_ANCHORS"),
                     help="PEM root certificates to trust (default: $SDXL_BENTO_C2PA_TRUST_ANCHORS)")
    cmd.add_argument("--cert", type=Path, default=_env_path("SDXL_BENTO_C2PA_CERT"),
                     help="a service's signing certificate and chain, to tell its own manifests "
                          "(default: $SDXL_BENTO_C2PA_CERT)")
    cmd.add_argument("--json", action="store_true", help="one JSON report per file (a list for several files)")
    cmd.set_defaults(run=run)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def run(args: argparse.Namespace) -> int:
    reader = ManifestReader(trust_anchors=args.trust_anchors.read_text() if args.trust_anchors else None,
                            own=Identity.load(args.cert) if args.cert else None)
    reports = []
    for path in args.files:
        try:
            reports.append((path, inspect(path.read_bytes(), reader, max_pixels=UPLOAD_MAX_PIXELS,
                                          max_bytes=MAX_FILE_BYTES)))
        except ServiceError as exc:
            print(f"sdxl-bento verify: {path}: {exc.message}", file=sys.stderr)
            return 1
    if args.json:
        dumped = [r.model_dump(mode="json") for _, r in reports]
        print(json.dumps(dumped[0] if len(dumped) == 1 else dumped, indent=2))
    else:
        print("\n\n".join(describe(path, report) for path, report in reports))
    return 0


def describe(path: Path, report: VerifyReport) -> str:
    c = report.c2pa
    lines = [f"{path}: {report.format}, {report.width}x{report.height}, {report.bytes} bytes"]
    if not c.present:
        lines.append("C2PA: no manifest")
    else:
        state = (c.state or "Invalid") + (" (signed by this service)" if c.from_this_service else "")
        lines.append(f"C2PA: {state}")
        lines += [f"  {'why' if not c.valid else 'note'}: {r.code}: {r.explanation}" for r in c.reasons]
        if c.signer is not None:
            s = c.signer
            lines.append(f"  signer: {s.common_name} (issuer {s.issuer}, {s.alg}, serial {s.serial_number})"
                         + (f", timestamp {s.time}" if s.time else ""))
        if c.claim_generator:
            lines.append(f"  made with: {c.claim_generator}")
        for a in c.actions:
            source = (a.digital_source_type or "").rsplit("/", 1)[-1]
            lines.append(f"  action: {a.action}" + (f" [{source}]" if source else "")
                         + (f" by {a.software_agent}" if a.software_agent else "")
                         + (f": {a.description}" if a.description else ""))
        for i in c.ingredients:
            by = f", manifest signed by {i.signer.common_name}" if i.signer else ", no manifest"
            lines.append(f"  ingredient: {i.title} ({i.relationship}, {i.format}{by})")
        if c.generation:
            g = c.generation
            model = g.get("model") or {}
            lines.append(f"  model: {model.get('tag')} (weights sha256 {model.get('weights_sha256')})")
            lines.append(f"  parameters sha256: {g.get('parameters_sha256')}")
    w = report.watermark
    lines.append(f"Watermark: {'present' if w.present else 'absent'} ({w.matched_bits}/{w.bits} bits, "
                 f"{w.threshold} needed)" if w.checked else f"Watermark: not checked ({w.reason})")
    lines.append("Parameters: " + (report.parameters.replace("\n", "\n  ") if report.parameters else "none"))
    return "\n".join(lines)
