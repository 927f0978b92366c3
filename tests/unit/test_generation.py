"""Generation: request -> policed work -> the real scheduler -> stored, encoded images, against an engine that
paints small images at once. The image store, the result cache and the coalescer are the real ones."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sdxl_bento.core.cache import make_cache
from sdxl_bento.core.generation import Generation, ModelInfo, RequestContext
from sdxl_bento.core.images import ImageStore, read_parameters
from sdxl_bento.core.policy import DEFAULT_TIERS, OPEN_PRINCIPAL, Principal
from sdxl_bento.core.safety import ImageGuard
from sdxl_bento.core.watermark import Watermarker
from sdxl_bento.errors import Cancelled, DeadlineExceeded, Forbidden, InvalidRequest, NotFound, Unavailable
from sdxl_bento.gpu.scheduler import Scheduler
from sdxl_bento.jobs import BatchKey, Work
from sdxl_bento.schemas import GenerateRequest, Img2ImgRequest, RefineRequest

MODELS = ModelInfo("sdxl-base:v1", "sdxl-refiner:v1", synthetic=False)
FRANK = Principal("frank", DEFAULT_TIERS["free"], "f0")
ALICE = Principal("alice", DEFAULT_TIERS["standard"], "a0")
BOB = Principal("bob", DEFAULT_TIERS["standard"], "b0")
PAT = Principal("pat", DEFAULT_TIERS["premium"], "p0")
OPS = Principal("ops", DEFAULT_TIERS["standard"], "o0", operator=True)
KEY = BatchKey(kind="txt2img", width=256, height=256, steps=4, guidance_scale=5.0, scheduler="euler")


def painted(width: int, height: int, seed: int) -> Image.Image:
    """A checkerboard in a colour of its seed: which image is whose shows in its pixels, and a blur shows too."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[(np.arange(height)[:, None] // 8 + np.arange(width)[None, :] // 8) % 2 == 0] = (
        seed * 37 % 256, seed * 91 % 256, 200)
    return Image.fromarray(pixels)


class PaintEngine:
    """Paints one image per seed at the work's size, at once; with ``hold``, waits for ``gate`` first."""

    def __init__(self, hold: bool = False) -> None:
        self.calls: list[list[Work]] = []
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.started = threading.Event()

    @property
    def prompts(self) -> list[list[str]]:
        return [[w.prompt for w in works] for works in self.calls]

    def generate(self, works, on_step=None, on_preview=None):  # previews: the real engine's (test_events)
        self.calls.append(list(works))
        self.started.set()
        total = works[0].key.total_steps()
        for step in range(1, total + 1):
            self.gate.wait(5)
            if on_step:
                on_step(step, total)
        return [[painted(w.key.width, w.key.height, seed) for seed in w.seeds] for w in works]


class OddSeedChecker:
    """Scores as NSFW the images painted for odd seeds (their red is odd: seed x 37 mod 256 keeps the parity)."""

    def __init__(self) -> None:
        self.calls = 0

    def scores(self, images):
        self.calls += 1
        return [0.9 if image.getpixel((0, 0))[0] % 2 else 0.1 for image in images]


@pytest.fixture
def rig(tmp_path):
    made = []

    def make(hold: bool = False, max_batch_requests: int = 4, **options) -> SimpleNamespace:
        engine = PaintEngine(hold)
        scheduler = Scheduler(engine, max_batch_requests=max_batch_requests, max_jobs=16)
        scheduler.start()
        made.append((engine, scheduler))
        images = ImageStore(tmp_path / "images")
        options.setdefault("cache", make_cache(None, images, ttl_s=60, max_bytes=2**26))
        generation = Generation(scheduler, images, MODELS, timeout=10, public_url="http://sdxl.test/", **options)
        return SimpleNamespace(engine=engine, scheduler=scheduler, images=images, generation=generation)

    yield make
    for engine, scheduler in made:
        engine.gate.set()
        scheduler.stop()


def txt(**fields) -> GenerateRequest:
    return GenerateRequest.model_validate({"prompt": "a red fox", "width": 256, "height": 256, "steps": 4, **fields})


def upload(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def run(generation: Generation, req, principal: Principal = ALICE, **context):
    ctx = RequestContext(principal=principal, **context)
    return asyncio.run(generation.run(req, ctx)), ctx


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


# -- one request end to end -----------------------------------------------------------------------
def test_run_stores_one_image_per_seed_with_its_infotext(rig):
    r = rig()
    req = txt(negative_prompt="blurry", seed=7, num_images=3, return_base64=True)
    outcome, ctx = run(r.generation, req)
    assert [w.seeds for w in r.engine.calls[0]] == [[7, 8, 9]]
    assert [i.seed for i in outcome.images] == [7, 8, 9]
    assert outcome.cache == "miss" and outcome.model == "sdxl-base:v1"
    for image in outcome.images:
        assert r.images.info(image.id).owner == "alice"
        assert r.images.find(image.id)[0].read_bytes() == image.data
        assert (pixels(image.data) == np.asarray(painted(256, 256, image.seed))).all()  # its own seed's image
        text = read_parameters(image.data)
        assert text == image.parameters
        assert text.startswith("a red fox\nNegative prompt: blurry\n")
        for pair in (f"Seed: {image.seed}", "Steps: 4", "Sampler: Euler", "CFG scale: 5.0", "Size: 256x256",
                     'Model: "sdxl-base:v1"'):  # quoted: the value holds a colon
            assert pair in text
    answer = r.generation.response(req, outcome, ctx)
    assert [i.id for i in answer.images] == [i.id for i in outcome.images]
    assert all(i.url == f"http://sdxl.test/images/{i.id}" for i in answer.images)  # no sign_link: plain
    assert base64.b64decode(answer.images[0].base64) == outcome.images[0].data
    assert answer.parameters["seeds"] == [7, 8, 9] and answer.model == "sdxl-base:v1" and answer.refiner is None


@pytest.mark.parametrize("fmt, media_type", [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_each_output_format_is_encoded_with_its_parameters(rig, fmt, media_type):
    outcome, _ = run(rig().generation, txt(seed=3, output_format=fmt, quality=80))
    (image,) = outcome.images
    assert image.media_type == media_type and Image.open(io.BytesIO(image.data)).format == fmt.upper()
    assert "Seed: 3" in read_parameters(image.data)


def test_an_unseeded_request_gets_random_seeds_and_is_not_cached(rig):
    r = rig()
    outcome, _ = run(r.generation, txt(num_images=2))
    first, second = (i.seed for i in outcome.images)
    assert second == (first + 1) % 2**32 and outcome.cache is None


# -- the caller's tier --------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, limit, allowed", [
    ({"steps": 41}, "max_steps", 40),
    ({"steps": "100"}, "max_steps", 40),  # lax: the string is the int that runs
    ({"width": 1536, "height": 1024}, "max_pixels", 1024 * 1024),
    ({"num_images": 3}, "max_images", 2),
    ({"refine": "ensemble"}, "refiner_allowed", False),
    ({"safety_check": False}, "safety_optional", False),
])
def test_the_request_that_runs_is_policed_against_the_callers_tier(rig, fields, limit, allowed):
    r = rig()
    with pytest.raises(Forbidden) as refused:
        run(r.generation, txt(**fields), FRANK)
    assert refused.value.status == 403
    assert refused.value.details == {"tier": "free", "limit": limit, "allowed": allowed}
    assert r.engine.calls == []


def test_img2img_without_a_size_scales_the_upload_into_the_tiers_pixels(rig):
    r = rig()
    req = Img2ImgRequest(prompt="x", image=upload(2048, 1024), steps=4, strength=0.5)
    outcome, _ = run(r.generation, req, FRANK)  # free: 1024 x 1024 pixels at most
    (work,) = r.engine.calls[-1]
    assert (work.key.kind, work.key.width, work.key.height) == ("img2img", 1448, 720)
    assert work.init_images[0].size == (2048, 1024)  # the engine resizes it
    assert (outcome.images[0].width, outcome.images[0].height) == (1448, 720)
    assert "Size: 1448x720" in outcome.images[0].parameters
    wide = Img2ImgRequest(prompt="x", image=upload(2048, 1280), steps=4, strength=0.5)
    run(r.generation, wide, PAT)  # premium allows 2048 x 2048 pixels, the service 1536 x 1536: the lower
    assert (r.engine.calls[-1][0].key.width, r.engine.calls[-1][0].key.height) == (1936, 1208)
    with pytest.raises(Forbidden) as refused:
        run(r.generation, req.model_copy(update={"width": 1536, "height": 1024}), FRANK)
    assert refused.value.details["limit"] == "max_pixels"
    with pytest.raises(InvalidRequest, match="at least 256"):
        run(r.generation, Img2ImgRequest(prompt="x", image=upload(200, 300), steps=4, strength=0.5), FRANK)
    assert len(r.engine.calls) == 2


def test_stored_images_are_their_keys_and_another_keys_id_is_not_found(rig):
    r = rig()
    outcome, _ = run(r.generation, txt(seed=1))
    image_id = outcome.images[0].id
    assert r.images.info(image_id).owner == "alice"
    img2img = Img2ImgRequest(prompt="y", image_id=image_id, steps=4, strength=0.5)
    refine = RefineRequest(prompt="y", image_id=image_id, steps=4)
    for req in (img2img, refine):
        with pytest.raises(NotFound) as refused:
            run(r.generation, req, BOB)
        assert refused.value.status == 404 and refused.value.message == f"no image with id {image_id}"
    assert len(r.engine.calls) == 1
    for principal in (ALICE, OPS, OPEN_PRINCIPAL):  # its owner, an operator, the open service
        done, _ = run(r.generation, img2img, principal)
        assert r.engine.calls[-1][0].init_images[0].size == (256, 256)
        assert r.images.info(done.images[0].id).owner == (None if principal.anonymous else principal.name)
    refined, _ = run(r.generation, refine, ALICE)
    assert r.engine.calls[-1][0].key.kind == "refine"
    assert f"Source image: {image_id}" in refined.images[0].parameters
    assert 'Refiner: "sdxl-refiner:v1"' in refined.images[0].parameters


def test_work_the_server_cannot_do_is_refused_before_queueing(rig):
    r = rig()
    no_refiner = Generation(r.scheduler, r.images, ModelInfo("sdxl-base:v1", None, False), timeout=10)
    with pytest.raises(Unavailable):
        run(no_refiner, txt(refine="ensemble"))
    with pytest.raises(InvalidRequest, match="no LoRA named 'ink'"):
        run(r.generation, txt(loras=[{"name": "ink"}]))
    assert r.engine.calls == []


# -- cache and coalescing ----------------------------------------------------------------------------
def test_the_cache_answers_the_same_key_only(rig):
    r = rig()
    first, _ = run(r.generation, txt(seed=5), ALICE)
    again, ctx = run(r.generation, txt(seed=5, return_base64=True), ALICE)  # return_base64 is not in the key
    assert (first.cache, again.cache) == ("miss", "hit") and len(r.engine.calls) == 1
    assert [i.id for i in again.images] == [i.id for i in first.images] and ctx.audit["cache"] == "hit"
    other, _ = run(r.generation, txt(seed=5), BOB)  # no key learns from a hit what another asked for
    assert other.cache == "miss" and len(r.engine.calls) == 2
    assert r.images.info(other.images[0].id).owner == "bob"


def test_identical_requests_in_flight_share_one_engine_call(rig):
    r = rig(hold=True)

    async def both():
        calls = [asyncio.ensure_future(r.generation.run(txt(seed=9), RequestContext(principal=ALICE)))
                 for _ in range(2)]
        await until(lambda: r.generation.cache.stats().misses == 2)  # both looked in the cache
        await asyncio.sleep(0.02)  # and the second joined the first
        r.engine.gate.set()
        return await asyncio.gather(*calls)

    first, second = asyncio.run(both())
    assert len(r.engine.calls) == 1
    assert sorted([first.cache, second.cache]) == ["hit", "miss"]
    assert first.images == second.images


# -- deadlines and batches ---------------------------------------------------------------------------
def test_a_job_that_cannot_start_in_time_fails_with_deadline_and_never_runs(rig):
    r = rig(hold=True)
    (blocker,) = r.scheduler.submit([Work(KEY, "blocker", "", [0])], timeout=10)
    assert r.engine.started.wait(5)
    with pytest.raises(DeadlineExceeded) as late:
        run(r.generation, txt(prompt="late", seed=1), ALICE, deadline_s=0.05)
    assert late.value.status == 503 and late.value.details["reason"] == "deadline"
    r.engine.gate.set()
    blocker.future.result(5)
    assert r.scheduler.depth() == (0, 0)
    assert r.engine.prompts == [["blocker"]]


def test_run_batch_gives_each_item_its_callers_priority_deadline_and_owner(rig):
    r = rig(hold=True, max_batch_requests=1)
    (blocker,) = r.scheduler.submit([Work(KEY, "blocker", "", [0])], timeout=10)
    assert r.engine.started.wait(5)
    items = [
        (txt(prompt="low", seed=1), RequestContext(principal=FRANK)),
        (txt(prompt="high", seed=2), RequestContext(principal=PAT)),
        (txt(prompt="hurried", seed=3), RequestContext(principal=BOB, deadline_s=0.05)),
        (txt(prompt="refused", steps=50), RequestContext(principal=FRANK)),  # above the free tier's 40 steps
    ]

    async def batch():
        answers = asyncio.ensure_future(r.generation.run_batch(items))
        await until(lambda: r.scheduler.depth()[0] == 3)
        await asyncio.sleep(0.15)  # "hurried" is past its deadline before the GPU is free
        r.engine.gate.set()
        return await answers

    low, high, hurried, refused = asyncio.run(batch())
    blocker.future.result(5)
    assert r.engine.prompts == [["blocker"], ["high"], ["low"]]  # premium first, then free; the others never ran
    assert low.ok and high.ok
    assert r.images.info(low.result.images[0].id).owner == "frank"
    assert r.images.info(high.result.images[0].id).owner == "pat"
    assert (hurried.ok, hurried.error.type) == (False, "deadline")
    assert (refused.ok, refused.error.type) == (False, "forbidden") and "steps 50" in refused.error.message


# -- after the GPU: safety, watermark, links, audit --------------------------------------------------
def test_the_guard_withholds_flagged_images_and_nothing_flagged_is_cached(rig):
    checker = OddSeedChecker()
    r = rig(guard=ImageGuard(checker, action="block"))
    req = txt(seed=7, num_images=2)
    outcome, ctx = run(r.generation, req)
    withheld, kept = outcome.images
    assert (withheld.seed, withheld.id, withheld.data, withheld.finish_reason) == (7, "", b"", "content_filtered")
    assert kept.finish_reason == "success" and r.images.info(kept.id).owner == "alice"
    assert ctx.audit["finish_reasons"] == ["content_filtered", "success"] and ctx.audit["image_ids"] == [kept.id]
    answer = r.generation.response(req, outcome, ctx).images[0]
    assert (answer.id, answer.url, answer.base64, answer.finish_reason) == (None, None, None, "content_filtered")
    again, _ = run(r.generation, req)
    assert again.cache == "miss" and len(r.engine.calls) == 2
    unchecked, _ = run(r.generation, txt(seed=7, safety_check=False), PAT)  # premium may turn it off
    assert checker.calls == 2 and unchecked.images[0].finish_reason == "success"


def test_the_guard_can_blur_instead(rig):
    r = rig(guard=ImageGuard(OddSeedChecker(), action="blur"))
    outcome, _ = run(r.generation, txt(seed=7, num_images=2))
    blurred, kept = outcome.images
    assert blurred.finish_reason == "content_filtered" and r.images.info(blurred.id).owner == "alice"
    spread = lambda image: np.asarray(image, dtype=np.int16).std(axis=(0, 1)).max()  # noqa: E731
    assert spread(pixels(blurred.data)) < spread(painted(256, 256, 7)) / 4
    assert (pixels(kept.data) == np.asarray(painted(256, 256, 8))).all()


def test_with_the_watermark_off_the_stored_pixels_are_the_engines(rig):
    outcome, _ = run(rig(watermarker=Watermarker(False)).generation, txt(seed=11, width=512, height=256))
    assert (pixels(outcome.images[0].data) == np.asarray(painted(512, 256, 11))).all()


def test_links_are_signed_for_keyed_callers_only(rig):
    r = rig(sign_link=lambda image_id: f"exp=99&sig=for-{image_id[:8]}")
    outcome, ctx = run(r.generation, txt(seed=1))
    image_id = outcome.images[0].id
    signed = f"http://sdxl.test/images/{image_id}?exp=99&sig=for-{image_id[:8]}"
    assert r.generation.response(txt(seed=1), outcome, ctx).images[0].url == signed
    assert r.generation.url(image_id, OPEN_PRINCIPAL) == f"http://sdxl.test/images/{image_id}"


def test_the_audit_dict_says_what_happened(rig):
    r = rig()
    req = Img2ImgRequest(prompt="secret words", image=upload(256, 256), steps=4, strength=0.5, seed=4)
    outcome, ctx = run(r.generation, req)
    audit = ctx.audit
    assert audit["outcome"] == "ok" and audit["model"] == "sdxl-base:v1" and audit["cache"] == "miss"
    assert audit["seeds"] == [4] and audit["image_ids"] == [outcome.images[0].id]
    assert audit["finish_reasons"] == ["success"] and audit["queue_s"] >= 0 and audit["gpu_s"] >= 0
    assert audit["parameters"]["seed"] == 4 and audit["parameters"]["strength"] == 0.5
    assert not {"prompt", "negative_prompt", "image", "mask", "return_base64"} & set(audit["parameters"])
    refused = RequestContext(principal=FRANK)
    with pytest.raises(Forbidden):
        asyncio.run(r.generation.run(txt(steps=60), refused))
    assert refused.audit["outcome"] == "error" and refused.audit["reason"] == "forbidden"
    assert refused.audit["status"] == 403 and "steps 60" in refused.audit["message"]
    assert refused.audit["parameters"]["steps"] == 60


def test_cancelling_one_request_does_not_fail_an_identical_one_that_joined_it(rig):
    r = rig(hold=True)
    (blocker,) = r.scheduler.submit([Work(KEY, "blocker", "", [0])], timeout=10)
    assert r.engine.started.wait(5)
    jobs = []

    async def both():
        first = asyncio.ensure_future(r.generation.run(txt(seed=9), RequestContext(principal=ALICE,
                                                                                   on_submit=jobs.extend)))
        await until(lambda: jobs)
        second = asyncio.ensure_future(r.generation.run(txt(seed=9), RequestContext(principal=ALICE)))
        await until(lambda: r.generation.cache.stats().misses == 2)
        await asyncio.sleep(0.02)  # the second joined the first
        r.scheduler.cancel(jobs[0])  # the first caller's task is cancelled
        r.engine.gate.set()
        return await asyncio.gather(first, second, return_exceptions=True)

    first, second = asyncio.run(both())
    blocker.future.result(5)
    assert isinstance(first, Cancelled)
    assert not isinstance(second, BaseException), second


def test_a_joined_request_keeps_its_own_deadline(rig):
    r = rig(hold=True)
    (blocker,) = r.scheduler.submit([Work(KEY, "blocker", "", [0])], timeout=10)
    assert r.engine.started.wait(5)

    async def both():
        hurried = asyncio.ensure_future(r.generation.run(txt(seed=9), RequestContext(principal=ALICE,
                                                                                     deadline_s=0.3)))
        patient = asyncio.ensure_future(r.generation.run(txt(seed=9), RequestContext(principal=ALICE)))
        await until(lambda: r.generation.cache.stats().misses == 2)
        await until(hurried.done)
        r.engine.gate.set()
        return await asyncio.gather(hurried, patient, return_exceptions=True)

    hurried, patient = asyncio.run(both())
    blocker.future.result(5)
    assert isinstance(hurried, DeadlineExceeded)
    assert not isinstance(patient, BaseException), patient


def test_a_missed_deadline_leaves_no_unretrieved_exception(rig):
    r = rig(hold=True)
    (blocker,) = r.scheduler.submit([Work(KEY, "blocker", "", [0])], timeout=10)
    assert r.engine.started.wait(5)

    async def late():
        errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context["message"]))
        with pytest.raises(DeadlineExceeded):
            await r.generation.run(txt(seed=1), RequestContext(principal=ALICE, deadline_s=0.05))
        await asyncio.sleep(0.02)  # the cancellation reaches the event loop
        gc.collect()
        return errors

    assert asyncio.run(late()) == []
    r.engine.gate.set()
    blocker.future.result(5)
