"""Provenance through the real service: images signed with a C2PA manifest (a test chain, a local RFC 3161 TSA),
watermarked, cached signed; ``POST /verify`` through the gateway (a key, the upload's size and type); edits that
name their source; and the service without a certificate, as before."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import c2pa
import httpx
import numpy as np
import pytest
from PIL import Image

from sdxl_bento.core.provenance import COMPOSITE, TRAINED
from sdxl_bento.http.auth import add_key
from tests.c2pa_testing import make_chain, time_stamping_authority
from tests.unit.test_provenance import png_chunks, png_from

from .conftest import REPO, private_home, service_env, serving

pytestmark = pytest.mark.e2e
SMALL = {"width": 256, "height": 256, "steps": 2}
MAX_UPLOAD = 2 * 2**20


@pytest.fixture(scope="module")
def signing(bentoml_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("provenance")
    chain = make_chain(root / "certs", "es256")
    key = add_key(root / "keys.yaml", "tester", "premium")
    with time_stamping_authority(chain) as tsa:
        env = service_env(private_home(bentoml_home, root), root / "images", keys_file=root / "keys.yaml",
                          c2pa_cert=chain.cert, c2pa_key=chain.key, c2pa_trust_anchors=chain.root, c2pa_tsa_url=tsa,
                          watermark="on", max_upload_bytes=MAX_UPLOAD, audit_log=root / "audit.jsonl")
        with serving(env, root / "server.log") as srv:
            client = httpx.Client(base_url=srv.url, timeout=120, headers={"Authorization": f"Bearer {key}"})
            yield srv, client, chain, root
            client.close()


@pytest.fixture(scope="module")
def served_png(signing):
    _, client, _, _ = signing
    r = client.post("/txt2img", json={"prompt": "a lighthouse at dusk", "seed": 7, **SMALL})
    assert r.status_code == 200, r.text
    return r


def verify(client: httpx.Client, data: bytes, how: str = "raw", media_type: str = "image/png") -> dict:
    if how == "raw":
        r = client.post("/verify", content=data, headers={"content-type": media_type})
    elif how == "form":
        r = client.post("/verify", files={"image": ("image", data, media_type)})
    else:
        r = client.post("/verify", json={"image": base64.b64encode(data).decode()})
    assert r.status_code == 200, r.text
    return r.json()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_a_served_png_is_signed_watermarked_and_keeps_its_parameters(signing, served_png):
    _, client, chain, _ = signing
    report = verify(client, served_png.content)
    c = report["c2pa"]
    assert c["present"] and c["valid"] and c["trusted"] and c["state"] == "Trusted" and c["from_this_service"]
    assert [(a["action"], a["digital_source_type"]) for a in c["actions"]] == [("c2pa.created", TRAINED)]
    assert c["actions"][0]["software_agent"].startswith("sdxl-bento ")
    model = c["generation"]["model"]
    assert model["tag"].startswith("sdxl-base:") and len(model["weights_sha256"]) == 64
    assert "a lighthouse" not in json.dumps(c)  # only the parameters' sha256, by default
    assert c["signer"]["common_name"] == "sdxl-bento test signer" and c["signer"]["time"]  # the TSA's
    assert report["watermark"]["present"] and report["watermark"]["matched_bits"] >= report["watermark"]["threshold"]
    assert report["parameters"] == served_png.headers["X-Parameters"].encode().decode("unicode_escape")
    # c2pa-python's own reader agrees, with the same anchor
    context = c2pa.Context.from_dict({"trust": {"user_anchors": chain.root.read_text()},
                                      "verify": {"remote_manifest_fetch": False}})
    with c2pa.Reader("image/png", io.BytesIO(served_png.content), None, context) as reader:
        assert reader.get_validation_state() == "Trusted"


def test_a_cache_hit_serves_the_signed_bytes_without_signing_again(signing, served_png):
    srv, client, _, _ = signing
    again = client.post("/txt2img", json={"prompt": "a lighthouse at dusk", "seed": 7, **SMALL})
    assert again.headers["x-cache"] == "hit" and again.content == served_png.content
    metrics = httpx.get(f"{srv.url}/metrics").text
    signed = [line for line in metrics.splitlines() if line.startswith('sdxl_c2pa_sign_seconds_count{format="png"}')]
    assert signed == ['sdxl_c2pa_sign_seconds_count{format="png"} 1.0']


@pytest.mark.parametrize("fmt, how", [("jpeg", "form"), ("webp", "json")])
def test_jpeg_and_webp_are_signed_and_each_upload_form_is_read(signing, fmt, how):
    _, client, _, _ = signing
    r = client.post("/generate", json={"prompt": "a meadow", "seed": 3, "output_format": fmt, "return_base64": True,
                                       **SMALL})
    data = base64.b64decode(r.json()["images"][0]["base64"])
    report = verify(client, data, how, f"image/{fmt}")
    assert report["format"] == f"image/{fmt}" and report["c2pa"]["trusted"] and report["c2pa"]["from_this_service"]
    assert report["parameters"] and "Seed: 3" in report["parameters"]


def test_img2img_of_a_signed_image_carries_it_as_its_ingredient(signing, served_png):
    _, client, _, _ = signing
    image_id = served_png.headers["X-Image-Id"]
    by_id = client.post("/img2img", json={"prompt": "as an oil painting", "image_id": image_id, "seed": 1,
                                          "return_base64": True, **SMALL}).json()
    uploaded = client.post("/img2img", json={"prompt": "as an oil painting", "seed": 1, "return_base64": True,
                                             "image": base64.b64encode(served_png.content).decode(), **SMALL}).json()
    for answer, title in ((by_id, f"{image_id}.png"), (uploaded, "source.png")):
        c = verify(client, base64.b64decode(answer["images"][0]["base64"]))["c2pa"]
        assert c["trusted"] and [a["action"] for a in c["actions"]] == ["c2pa.opened", "c2pa.edited"]
        (ingredient,) = c["ingredients"]
        assert ingredient["relationship"] == "parentOf" and ingredient["title"] == title
        assert ingredient["has_manifest"] and ingredient["signer"]["common_name"] == "sdxl-bento test signer"
        assert c["generation"]["mode"] == "img2img" and c["manifests"] == 2


def test_refine_names_its_source_and_the_refiner(signing, served_png):
    _, client, _, _ = signing
    answer = client.post("/refine", json={"prompt": "more detail", "image_id": served_png.headers["X-Image-Id"],
                                          "seed": 2, "steps": 4, "strength": 0.5, "return_base64": True})
    assert answer.status_code == 200, answer.text
    c = verify(client, base64.b64decode(answer.json()["images"][0]["base64"]))["c2pa"]
    assert c["trusted"] and [a["action"] for a in c["actions"]] == ["c2pa.opened", "c2pa.edited"]
    assert c["generation"]["mode"] == "refine" and c["generation"]["model"]["tag"].startswith("sdxl-refiner:")
    assert len(c["generation"]["model"]["weights_sha256"]) == 64 and len(c["ingredients"]) == 1


def test_img2img_of_a_foreign_image_does_not_name_it(signing):
    _, client, _, _ = signing
    foreign = io.BytesIO()
    Image.new("RGB", (256, 256), (40, 90, 160)).save(foreign, format="PNG")
    answer = client.post("/img2img", json={"prompt": "a boat", "seed": 1, "return_base64": True,
                                           "image": base64.b64encode(foreign.getvalue()).decode(), **SMALL}).json()
    c = verify(client, base64.b64decode(answer["images"][0]["base64"]))["c2pa"]
    assert c["valid"] and not c["ingredients"]
    assert [(a["action"], a["digital_source_type"]) for a in c["actions"]] == [("c2pa.created", COMPOSITE)]


def test_a_foreign_image_has_no_manifest_and_no_watermark(signing):
    _, client, _, _ = signing
    rng = np.random.default_rng(5)
    photo = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (320, 320, 3), dtype=np.uint8)).save(photo, format="JPEG", quality=90)
    report = verify(client, photo.getvalue(), media_type="image/jpeg")
    assert not report["c2pa"]["present"] and report["watermark"]["checked"] and not report["watermark"]["present"]
    assert report["parameters"] is None


def test_tampered_files_are_reported_invalid_with_the_librarys_reason(signing, served_png):
    _, client, _, _ = signing
    chunks = png_chunks(served_png.content)
    manifest = next(c for c in chunks if c[0] == b"caBX")
    changed = np.array(pixels(served_png.content))
    changed[5, 5] = 255 - changed[5, 5]
    repainted = io.BytesIO()
    Image.fromarray(changed).save(repainted, format="PNG",
                                  pnginfo=_text(Image.open(io.BytesIO(served_png.content)).info["parameters"]))
    forged = png_chunks(repainted.getvalue())
    c = verify(client, png_from(forged[:1] + [manifest] + forged[1:]))["c2pa"]  # pixels changed, manifest kept
    assert c["present"] and not c["valid"] and c["state"] == "Invalid"
    assert "assertion.dataHash.mismatch" in {r["code"] for r in c["reasons"]}

    at = chunks.index(manifest)
    body = bytearray(manifest[1])
    body[body.index(b"c2pa.created") + 2] ^= 0x01  # inside the signed actions assertion
    c = verify(client, png_from(chunks[:at] + [(b"caBX", bytes(body))] + chunks[at + 1:]))["c2pa"]
    assert c["present"] and not c["valid"] and c["reasons"], c


def _text(parameters: str):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    return info


def test_verify_is_guarded_and_bounded(signing, served_png):
    srv, client, _, root = signing
    assert httpx.post(f"{srv.url}/verify", content=served_png.content,
                      headers={"content-type": "image/png"}).status_code == 401
    r = client.post("/verify", content=b"\0" * (MAX_UPLOAD + 1), headers={"content-type": "image/png"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
    r = client.post("/verify", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["type"] == "unsupported_media_type"
    two = client.post("/verify", files=[("image", ("a.png", served_png.content, "image/png")),
                                        ("image", ("b.png", b"not an image", "image/png"))])
    assert two.status_code == 400
    r = client.post("/verify", content=b"not an image at all", headers={"content-type": "image/png"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request"
    lines = [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()]
    assert any(line["endpoint"] == "/verify" and line["status"] == 200 for line in lines)


def test_the_cli_says_what_verify_says_offline(signing, served_png, tmp_path):
    _, client, chain, _ = signing
    path = tmp_path / "served.png"
    path.write_bytes(served_png.content)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_BENTO_")}
    done = subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "verify", str(path), "--json",
                           "--trust-anchors", str(chain.root), "--cert", str(chain.cert)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == verify(client, served_png.content)


def test_watermark_after_a_jpeg_reencode_at_quality_90_is_measured(signing, served_png):
    """Measured and written down (README: Provenance), not asserted: dwtDct is weak by design."""
    _, client, _, _ = signing
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(served_png.content)).convert("RGB").save(jpeg, format="JPEG", quality=90)
    w = verify(client, jpeg.getvalue(), media_type="image/jpeg")["watermark"]
    out = REPO / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / "watermark-jpeg90.json").write_text(json.dumps({"size": "256x256", "matched_bits": w["matched_bits"],
                                                           "present": w["present"]}))
    print(f"watermark after JPEG q90 (256x256): {w['matched_bits']}/48 bits, present={w['present']}")


def test_without_a_certificate_images_carry_no_manifest_and_the_log_says_so_once(server):
    r = httpx.post(f"{server.url}/txt2img", json={"prompt": "a lighthouse", "seed": 11, **SMALL}, timeout=120)
    assert r.status_code == 200
    report = httpx.post(f"{server.url}/verify", content=r.content, headers={"content-type": "image/png"},
                        timeout=60).json()
    assert not report["c2pa"]["present"] and report["parameters"]
    assert pixels(r.content).shape == (256, 256, 3)
    assert server.log.read_text().count("C2PA signing is off") == 1
