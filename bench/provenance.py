"""What C2PA provenance costs per image, and how well the invisible watermark survives re-encoding (issue 18).

    .venv/bin/python bench/provenance.py --repeats 20 --out /tmp/provenance.json
    .venv/bin/python bench/provenance.py --size 256 --repeats 2      # the harness check

On one procedural, natural-image-like test image (``bench/postprocess.py``'s ``natural_image``, ``--size``,
default 1024), with the project's own code and a test certificate chain made as the tests make it
(``tests/c2pa_testing.py``):

- sign: ``Provenance.sign`` of the encoded PNG, JPEG q90 and WebP q90 (``images.encode``, infotext included), with
  an ES256 and an Ed25519 key; the bytes the manifest adds; an edit (``c2pa.edited`` with its source as ingredient);
  with an RFC 3161 TSA on the loopback interface (the network's round trip to a real TSA comes on top);
- the parts of a signature: the c2pa ``Context`` and ``Signer`` made per call;
- read: ``ManifestReader.read`` (what img2img runs on an upload) and ``verify.inspect`` (``/verify``: manifest,
  watermark detection, parameters);
- the watermark (``Watermarker``, dwtDct) read back with ``WatermarkDecoder`` from the PNG, and after re-encoding
  it as JPEG at quality 95, 90, 75 and as WebP 90: bits of 48 matched (41 needed).

Timings are the median and p90 of ``--repeats`` runs, in milliseconds, the cases interleaved run by run.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from PIL import Image  # noqa: E402
from postprocess import natural_image  # noqa: E402

from sdxl_bento.core.images import encode  # noqa: E402
from sdxl_bento.core.provenance import Claim, Credentials, ManifestReader, Model, Provenance, Source  # noqa: E402
from sdxl_bento.core.verify import inspect  # noqa: E402
from sdxl_bento.core.watermark import Watermarker, detect  # noqa: E402
from tests.c2pa_testing import make_chain, time_stamping_authority  # noqa: E402

MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
TEXT = ("a lighthouse at dusk, volumetric light\nNegative prompt: blurry\nSteps: 30, Sampler: Euler, CFG scale: 5.0, "
        "Seed: 7, Size: 1024x1024, Model: sdxl-base:v1")


def timed(cases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for name, case in cases.items():  # warm-up
        case()
    for _ in range(repeats):
        for name, case in cases.items():
            started = time.perf_counter()
            case()
            runs[name].append((time.perf_counter() - started) * 1000)
    return {name: {"median_ms": round(statistics.median(v), 3),
                   "p90_ms": round(sorted(v)[min(len(v) - 1, int(0.9 * len(v)))], 3)} for name, v in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import c2pa

    folder = Path(tempfile.mkdtemp(prefix="bench-c2pa-"))
    chains = {alg: make_chain(folder / alg, alg) for alg in ("es256", "ed25519")}
    signers = {alg: Provenance(Credentials.load(c.cert, c.key),
                               reader=ManifestReader(trust_anchors=c.root.read_text(),
                                                     own=Credentials.load(c.cert, c.key).identity))
               for alg, c in chains.items()}
    (image,) = Watermarker(True).apply([natural_image(args.size)])
    encoded = {fmt: encode(image, fmt, 90, TEXT) for fmt in MEDIA}
    claim = Claim(mode="txt2img", model=Model("sdxl-base:v1", "ab" * 32), parameters=TEXT)
    result: dict[str, Any] = {"date": datetime.date.today().isoformat(), "size": args.size, "repeats": args.repeats,
                              "python": platform.python_version(), "c2pa_python": c2pa.__version__,
                              "c2pa_sdk": c2pa.sdk_version(), "machine": platform.machine()}

    cases: dict[str, Callable[[], Any]] = {}
    for alg, signer in signers.items():
        for fmt, data in encoded.items():
            cases[f"sign {fmt} {alg}"] = lambda s=signer, d=data, f=fmt: s.sign(d, MEDIA[f], claim)
    es = signers["es256"]
    source = Source(data=es.sign(encoded["png"], "image/png", claim), media_type="image/png", ours=True,
                    image_id="source")
    edit = Claim(mode="img2img", model=claim.model, parameters=TEXT, source=source)
    cases["sign png es256, an edit with its ingredient"] = lambda: es.sign(encoded["png"], "image/png", edit)
    cases["encode png (for scale)"] = lambda: encode(image, "png", 90, TEXT)
    creds = es.credentials
    cases["c2pa Context per call"] = lambda: c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}}
                                                                    ).close()
    cases["c2pa Signer per call"] = lambda: c2pa.Signer.from_info(
        c2pa.C2paSignerInfo(creds.alg, creds.chain_pem, creds.key_pem, None)).close()
    signed = {fmt: es.sign(data, MEDIA[fmt], claim) for fmt, data in encoded.items()}
    for fmt, data in signed.items():
        cases[f"read manifest {fmt}"] = lambda d=data: es.reader.read(d)
        cases[f"/verify report {fmt} (manifest, watermark, parameters)"] = lambda d=data: inspect(
            d, es.reader, max_pixels=4096 ** 2, max_bytes=1 << 30)
    result["timings"] = timed(cases, args.repeats)

    with time_stamping_authority(chains["es256"]) as url:
        stamped = Provenance(creds, tsa_url=url, reader=es.reader)
        result["timings"].update(timed({"sign png es256 with a loopback TSA": lambda: stamped.sign(
            encoded["png"], "image/png", claim)}, max(2, args.repeats // 2)))

    result["manifest_bytes"] = {fmt: len(signed[fmt]) - len(encoded[fmt]) for fmt in MEDIA}
    result["file_bytes"] = {fmt: len(encoded[fmt]) for fmt in MEDIA}

    def reencoded(fmt: str, quality: int) -> Image.Image:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(encoded["png"])).convert("RGB").save(buffer, format=fmt, quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue()))

    survival = {"png": Image.open(io.BytesIO(encoded["png"]))}
    survival.update({f"jpeg q{q}": reencoded("JPEG", q) for q in (95, 90, 75)})
    survival["webp q90"] = reencoded("WEBP", 90)
    result["watermark_bits_matched"] = {name: detect(img).matched for name, img in survival.items()}
    result["watermark_unmarked_image"] = detect(natural_image(args.size, seed=1)).matched

    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
