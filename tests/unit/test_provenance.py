"""C2PA Content Credentials: signing every format, reading back with c2pa-python's own Reader, tampering,
edits with their ingredient, timestamps from a real (local) TSA, and the report ``/verify`` and the CLI give.
The certificates are made in the tests (``tests/c2pa_testing.py``)."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import zlib
from pathlib import Path

import c2pa
import numpy as np
import pytest
from PIL import Image

from sdxl_bento.core.generation import Generation, ModelInfo
from sdxl_bento.core.images import ImageStore, encode, read_parameters
from sdxl_bento.core.provenance import (
    COMPOSITE,
    GENERATION_LABEL,
    TRAINED,
    Claim,
    Credentials,
    ManifestReader,
    Model,
    Provenance,
    Source,
    parameters_sha256,
)
from sdxl_bento.core.verify import inspect
from sdxl_bento.core.watermark import Watermarker
from sdxl_bento.errors import InvalidRequest
from sdxl_bento.jobs import BatchKey, Work
from sdxl_bento.schemas import GenerateRequest, Img2ImgRequest, InpaintRequest
from tests.c2pa_testing import make_chain, time_stamping_authority

MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
TEXT = "a lighthouse at dusk\nSteps: 2, Sampler: Euler, CFG scale: 5.0, Seed: 7, Size: 256x256, Model: sdxl-base:v1"
WEIGHTS = "ab" * 32


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    root = tmp_path_factory.mktemp("c2pa")
    return {"es256": make_chain(root / "es256", "es256"), "ed25519": make_chain(root / "ed25519", "ed25519"),
            # another operator whose CA and certificate carry the very same names
            "other": make_chain(root / "other", "es256")}


def provenance(chain, **kwargs) -> Provenance:
    credentials = Credentials.load(chain.cert, chain.key)
    return Provenance(credentials, reader=ManifestReader(trust_anchors=chain.root.read_text(),
                                                         own=credentials.identity), **kwargs)


def picture(size=256, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, size)
    rgb = np.stack([x[None, :].repeat(size, 0), x[:, None].repeat(size, 1), np.full((size, size), 96.0)], -1)
    return Image.fromarray(np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8))


def claim(**kwargs) -> Claim:
    return Claim(**{"mode": "txt2img", "model": Model("sdxl-base:v1", WEIGHTS), "parameters": TEXT,
                    "prompt": "a lighthouse at dusk", **kwargs})


def library_read(data: bytes, chain) -> tuple[str, dict]:
    """c2pa-python's Reader, as any consumer of the file would use it: (validation state, active manifest)."""
    context = c2pa.Context.from_dict({"trust": {"user_anchors": chain.root.read_text()},
                                      "verify": {"remote_manifest_fetch": False}})
    with c2pa.Reader(None, io.BytesIO(data), None, context) as reader:
        return reader.get_validation_state(), reader.get_active_manifest()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        chunks.append((data[at + 4:at + 8], data[at + 8:at + 8 + length]))
        at += 12 + length
    return chunks


def png_from(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(body)) + kind + body
                                           + struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks)


# -- credentials ---------------------------------------------------------------------------------------------------
def test_credentials_take_es256_and_ed25519_and_refuse_a_key_of_another_certificate(chains, tmp_path):
    assert Credentials.load(chains["es256"].cert, chains["es256"].key).alg == "es256"
    assert Credentials.load(chains["ed25519"].cert, chains["ed25519"].key).alg == "ed25519"
    with pytest.raises(ValueError, match="does not belong to the first certificate"):
        Credentials.load(chains["es256"].cert, chains["other"].key)
    with pytest.raises(ValueError, match="not PEM certificates"):
        Credentials.load(chains["es256"].key, chains["es256"].key)
    assert "PRIVATE" not in repr(Credentials.load(chains["es256"].cert, chains["es256"].key))


# -- signing -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["es256", "ed25519"])
@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_every_format_is_signed_and_reads_back_with_the_c2pa_reader(chains, alg, fmt):
    chain = chains[alg]
    data = encode(picture(), fmt, 90, TEXT)
    signed = provenance(chain).sign(data, MEDIA[fmt], claim())
    state, manifest = library_read(signed, chain)
    assert state == "Trusted"
    assert manifest["claim_generator_info"][0]["name"] == "sdxl-bento"
    assertions = {a["label"]: a["data"] for a in manifest["assertions"]}
    (action,) = assertions["c2pa.actions.v2"]["actions"]
    assert action["action"] == "c2pa.created" and action["digitalSourceType"] == TRAINED
    assert action["softwareAgent"]["name"] == "sdxl-bento"
    generation = assertions[GENERATION_LABEL]
    assert generation["model"] == {"tag": "sdxl-base:v1", "weights_sha256": WEIGHTS}
    assert generation["parameters_sha256"] == parameters_sha256(read_parameters(signed))
    assert "prompt" not in generation and "a lighthouse" not in json.dumps(manifest)
    # the manifest goes beside the pixels and the parameters text
    assert np.array_equal(pixels(signed), pixels(data))
    assert read_parameters(signed) == TEXT


def test_signed_png_and_jpeg_differ_from_the_unsigned_file_only_by_their_manifest(chains):
    signer = provenance(chains["es256"])
    data = encode(picture(), "png", 90, TEXT)
    signed = signer.sign(data, "image/png", claim())
    assert [k for k, _ in png_chunks(signed) if k not in [k for k, _ in png_chunks(data)]] == [b"caBX"]
    assert png_from([c for c in png_chunks(signed) if c[0] != b"caBX"]) == data

    jpeg = encode(picture(), "jpeg", 90, TEXT)
    signed = signer.sign(jpeg, "image/jpeg", claim())
    assert strip_app11(signed) == jpeg


def strip_app11(data: bytes) -> bytes:
    """A JPEG without its APP11 (JUMBF, C2PA) segments."""
    out, at = bytearray(data[:2]), 2
    while at < len(data) and data[at] == 0xFF and data[at + 1] not in (0xDA,):
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if data[at + 1] != 0xEB:
            out += data[at:at + 2 + length]
        at += 2 + length
    return bytes(out + data[at:])


def test_the_prompt_is_in_the_manifest_only_when_the_operator_opts_in(chains):
    data = encode(picture(), "png", 90, TEXT)
    signed = provenance(chains["es256"], include_prompt=True).sign(data, "image/png", claim())
    _, manifest = library_read(signed, chains["es256"])
    generation = {a["label"]: a["data"] for a in manifest["assertions"]}[GENERATION_LABEL]
    assert generation["prompt"] == "a lighthouse at dusk"


def test_an_edit_of_an_image_of_this_service_carries_it_as_its_parent_ingredient(chains):
    signer = provenance(chains["es256"])
    first = signer.sign(encode(picture(seed=1), "png", 90, TEXT), "image/png", claim())
    source = Source(data=first, media_type="image/png", ours=signer.is_ours(first), image_id="1234")
    assert source.ours
    edit = signer.sign(encode(picture(seed=2), "jpeg", 90, TEXT), "image/jpeg", claim(mode="img2img", source=source))
    state, manifest = library_read(edit, chains["es256"])
    assert state == "Trusted"
    actions = [a["action"] for a in {a["label"]: a["data"] for a in manifest["assertions"]}
               ["c2pa.actions.v2"]["actions"]]
    assert actions == ["c2pa.opened", "c2pa.edited"]
    (ingredient,) = manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf" and ingredient["title"] == "1234.png"
    assert ingredient["active_manifest"]  # the source's own manifest travels with it

    report = signer.reader.read(edit)
    assert report.from_this_service and report.manifests == 2
    assert report.ingredients[0].has_manifest and report.ingredients[0].signer.common_name == "sdxl-bento test signer"


def test_an_edit_of_a_foreign_image_is_a_composite_and_does_not_carry_the_upload(chains):
    signer = provenance(chains["es256"])
    foreign = encode(picture(seed=3), "png")
    source = Source(data=foreign, media_type="image/png", ours=signer.is_ours(foreign))
    assert not source.ours
    edit = signer.sign(encode(picture(seed=4), "png", 90, TEXT), "image/png", claim(mode="img2img", source=source))
    report = signer.reader.read(edit)
    assert report.valid and not report.ingredients
    assert [(a.action, a.digital_source_type) for a in report.actions] == [("c2pa.created", COMPOSITE)]


def test_only_this_services_certificate_is_recognised_as_its_own(chains):
    ours, theirs = provenance(chains["es256"]), provenance(chains["other"])
    data = encode(picture(), "png")
    assert ours.is_ours(ours.sign(data, "image/png", claim()))
    # same names, same profile, a valid signature: another operator's certificate all the same
    foreign = theirs.sign(data, "image/png", claim())
    assert theirs.reader.read(foreign).from_this_service
    assert ours.reader.read(foreign).valid and not ours.is_ours(foreign)
    assert not ours.is_ours(data)


def test_a_tsa_url_timestamps_every_manifest(chains):
    chain = chains["es256"]
    with time_stamping_authority(chain) as url:
        signed = provenance(chain, tsa_url=url).sign(encode(picture(), "png"), "image/png", claim())
    context = c2pa.Context.from_dict({"trust": {"user_anchors": chain.root.read_text()},
                                      "verify": {"remote_manifest_fetch": False}})
    with c2pa.Reader("image/png", io.BytesIO(signed), None, context) as reader:
        results = reader.get_validation_results()["activeManifest"]
        assert reader.get_validation_state() == "Trusted"
        assert {"timeStamp.validated", "timeStamp.trusted"} <= {r["code"] for r in results["success"]}
    assert provenance(chain).reader.read(signed).signer.time


# -- tampering ----------------------------------------------------------------------------------------------------
def test_changed_pixels_under_the_original_manifest_are_invalid_with_the_librarys_reason(chains):
    signer = provenance(chains["es256"])
    signed = signer.sign(encode(picture(), "png", 90, TEXT), "image/png", claim())
    changed = np.array(pixels(signed))
    changed[10, 10] = 255 - changed[10, 10]
    forged = png_chunks(encode(Image.fromarray(changed), "png", 90, TEXT))
    manifest = next(c for c in png_chunks(signed) if c[0] == b"caBX")
    tampered = png_from(forged[:1] + [manifest] + forged[1:])  # where the signer put it
    report = signer.reader.read(tampered)
    assert report.present and not report.valid and report.state == "Invalid"
    assert "assertion.dataHash.mismatch" in {r.code for r in report.reasons}
    state, _ = library_read(tampered, chains["es256"])
    assert state == "Invalid"


def test_a_changed_manifest_is_invalid_with_the_librarys_reason(chains):
    signer = provenance(chains["es256"])
    signed = signer.sign(encode(picture(), "png", 90, TEXT), "image/png", claim())
    chunks = png_chunks(signed)
    at = next(i for i, c in enumerate(chunks) if c[0] == b"caBX")
    body = chunks[at][1]
    where = body.index(b"sdxl-base:v1")  # the model tag inside the generation assertion
    chunks[at] = (b"caBX", body[:where] + b"sdxl-evil:v1" + body[where + 12:])
    report = signer.reader.read(png_from(chunks))
    assert report.present and not report.valid
    assert report.reasons and all(r.explanation or r.code for r in report.reasons)
    assert any("mismatch" in r.code or "hash" in r.code.lower() for r in report.reasons), report.reasons


def test_a_file_without_a_manifest_reads_as_absent():
    assert not ManifestReader().read(encode(picture(), "png")).present


# -- the report of /verify and the CLI -----------------------------------------------------------------------------
def test_the_report_reads_manifest_watermark_and_parameters(chains):
    signer = provenance(chains["es256"])
    (marked,) = Watermarker(True).apply([picture()])
    signed = signer.sign(encode(marked, "png", 90, TEXT), "image/png", claim())
    report = inspect(signed, signer.reader, max_pixels=4096 ** 2, max_bytes=2 ** 24)
    assert report.format == "image/png" and (report.width, report.height) == (256, 256)
    assert report.c2pa.trusted and report.c2pa.from_this_service
    assert report.watermark.checked and report.watermark.present and report.watermark.matched_bits >= 41
    assert report.parameters == TEXT

    foreign = inspect(encode(picture(seed=9), "jpeg"), signer.reader, max_pixels=4096 ** 2, max_bytes=2 ** 24)
    assert not foreign.c2pa.present and foreign.watermark.checked and not foreign.watermark.present
    small = inspect(encode(picture(size=64), "png"), signer.reader, max_pixels=4096 ** 2, max_bytes=2 ** 24)
    assert not small.watermark.checked
    with pytest.raises(InvalidRequest):
        inspect(b"GIF89a" + b"\0" * 64, signer.reader, max_pixels=4096 ** 2, max_bytes=2 ** 24)


def test_the_cli_verifies_a_file_offline(chains, tmp_path):
    import os
    import sys

    signer = provenance(chains["es256"])
    path = tmp_path / "signed.png"
    path.write_bytes(signer.sign(encode(picture(), "png", 90, TEXT), "image/png", claim()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_BENTO_")}
    done = subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "verify", str(path), "--json",
                           "--trust-anchors", str(chains["es256"].root), "--cert", str(chains["es256"].cert)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["c2pa"]["state"] == "Trusted" and report["c2pa"]["from_this_service"]
    assert report["parameters"] == TEXT
    text = subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "verify", str(path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert text.returncode == 0 and "C2PA: Valid" in text.stdout and "signingCredential.untrusted" in text.stdout


# -- in the generation flow ----------------------------------------------------------------------------------------
def generation(tmp_path: Path, signer: Provenance | None) -> Generation:
    return Generation(None, ImageStore(tmp_path / ("signed" if signer else "plain")),
                      ModelInfo("sdxl-base:v1", None, False), timeout=10, watermarker=Watermarker(True),
                      provenance=signer, weights_sha256={"sdxl-base:v1": WEIGHTS}.get)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_stored_images_are_signed_with_the_same_pixels_as_unsigned_ones(chains, tmp_path, fmt):
    signer = provenance(chains["es256"])
    req = GenerateRequest(prompt="a lighthouse", seed=7, width=256, height=256, steps=2, output_format=fmt)
    work = Work(key=BatchKey(kind="txt2img", width=256, height=256, steps=2, guidance_scale=5.0, scheduler="euler",
                             model="sdxl-base:v1"), prompt=req.prompt, negative_prompt="", seeds=[7, 8])
    images = [picture(seed=1), picture(seed=2)]
    plain = generation(tmp_path, None).store(work, images, req)
    signed_gen = generation(tmp_path, signer)
    signed = signed_gen.store(work, images, req)
    for a, b in zip(plain, signed):
        assert np.array_equal(pixels(a.data), pixels(b.data)) and a.parameters == b.parameters
        assert read_parameters(b.data) == b.parameters
        assert signed_gen.images.info(b.id).path.read_bytes() == b.data  # the store (and so the cache) holds it
        report = signer.reader.read(b.data)
        assert report.from_this_service and report.generation["model"]["weights_sha256"] == WEIGHTS
        assert report.generation["parameters_sha256"] == parameters_sha256(b.parameters)


def test_an_image_that_cannot_be_signed_fails_its_request_instead_of_going_out_unsigned(chains, tmp_path):
    import socket

    from sdxl_bento.errors import GenerationFailed

    with socket.socket() as s:  # a port nothing listens on: the TSA does not answer
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gen = generation(tmp_path, provenance(chains["es256"], tsa_url=f"http://127.0.0.1:{port}/"))
    req = GenerateRequest(prompt="a lighthouse", seed=7, width=256, height=256, steps=2)
    key = BatchKey(kind="txt2img", width=256, height=256, steps=2, guidance_scale=5.0, scheduler="euler")
    with pytest.raises(GenerationFailed, match="could not be signed"):
        gen.store(Work(key=key, prompt="a lighthouse", negative_prompt="", seeds=[7]), [picture()], req)
    assert not list(gen.images.root.iterdir())  # nothing unsigned was stored


def test_img2img_of_a_stored_signed_image_names_it_as_ingredient(chains, tmp_path):
    signer = provenance(chains["es256"])
    gen = generation(tmp_path, signer)
    req = GenerateRequest(prompt="a lighthouse", seed=7, width=256, height=256, steps=2)
    key = BatchKey(kind="txt2img", width=256, height=256, steps=2, guidance_scale=5.0, scheduler="euler")
    (first,) = gen.store(Work(key=key, prompt="a lighthouse", negative_prompt="", seeds=[7]), [picture()], req)

    edit = Img2ImgRequest(prompt="as an oil painting", image_id=first.id, seed=3, width=256, height=256, steps=2)
    ekey = BatchKey(kind="img2img", width=256, height=256, steps=2, guidance_scale=5.0, scheduler="euler",
                    strength=0.6)
    (out,) = gen.store(Work(key=ekey, prompt=edit.prompt, negative_prompt="", seeds=[3]), [picture(seed=5)], edit,
                       source=gen._edit_source(edit))
    report = signer.reader.read(out.data)
    assert [a.action for a in report.actions] == ["c2pa.opened", "c2pa.edited"]
    assert report.ingredients[0].title == f"{first.id}.png" and report.ingredients[0].has_manifest
    assert report.generation["mode"] == "img2img"

    mask = base64.b64encode(encode(Image.new("L", (256, 256), 255), "png")).decode()
    inpaint = InpaintRequest(prompt="a red door", image_id=out.id, mask=mask, seed=4, width=256, height=256,
                             steps=2, output_format="webp")
    ikey = BatchKey(kind="inpaint", width=256, height=256, steps=2, guidance_scale=5.0, scheduler="euler",
                    strength=0.6)
    (painted,) = gen.store(Work(key=ikey, prompt=inpaint.prompt, negative_prompt="", seeds=[4]), [picture(seed=6)],
                           inpaint, source=gen._edit_source(inpaint))
    report = signer.reader.read(painted.data)
    assert report.generation["mode"] == "inpaint" and report.ingredients[0].title == f"{out.id}.png"
    assert report.manifests == 3  # the inpainting, the img2img it started from, and the first image


def test_the_weights_sha256_is_what_sha256sum_computes(tmp_path):
    from sdxl_bento.store.modelstore import folder_weights_sha256

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet weights")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae weights")
    (tmp_path / "model_index.json").write_text("{}")
    shell = subprocess.run(["bash", "-c", "find . -type f -name '*.safetensors' -printf '%P\\n' | LC_ALL=C sort "
                            "| xargs sha256sum | sha256sum"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert folder_weights_sha256(tmp_path) == shell.stdout.split()[0]


def test_imported_models_record_their_weights_sha256(bentoml_home):
    from sdxl_bento.store import modelstore

    stored = modelstore.find("sdxl-base:latest")
    assert stored.metadata["weights_sha256"] == modelstore.folder_weights_sha256(stored.path)
    assert modelstore.weights_sha256(stored) == stored.metadata["weights_sha256"]


def test_a_model_without_the_record_is_hashed_once_and_remembered(bentoml_home, tmp_path):
    from sdxl_bento.store import modelstore

    stored = modelstore.find("sdxl-base:latest")
    older = modelstore.StoredPipeline(stored.tag, stored.path, {k: v for k, v in stored.metadata.items()
                                                                if k != "weights_sha256"})
    digest = modelstore.weights_sha256(older, cache_dir=tmp_path)
    assert digest == stored.metadata["weights_sha256"]
    assert json.loads((tmp_path / "weights-sha256.json").read_text()) == {stored.tag: digest}


def test_the_benchmark_runs(tmp_path):
    import sys

    out = tmp_path / "provenance.json"
    done = subprocess.run([sys.executable, "bench/provenance.py", "--size", "256", "--repeats", "1", "--out", str(out)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["manifest_bytes"]["png"] > 1000 and "sign png es256" in result["timings"]
    assert result["watermark_bits_matched"]["png"] >= 0
