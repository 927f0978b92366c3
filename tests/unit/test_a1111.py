"""The AUTOMATIC1111 API mapping: field for field, the native limits, A1111's answer and error shapes,
and /progress, /interrupt, /sd-models, /samplers from a real scheduler (with a fake engine)."""

import base64
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient

from sdxl_bento.adapters import a1111
from sdxl_bento.adapters import common as compat
from sdxl_bento.core.cache import CachedImage
from sdxl_bento.core.policy import DEFAULT_TIERS, OPEN_PRINCIPAL, Principal
from sdxl_bento.errors import Overloaded, ServiceError
from sdxl_bento.gpu.engine import BatchKey, Work
from sdxl_bento.gpu.scheduler import JobState, Scheduler
from sdxl_bento.schemas import GenerateRequest
from sdxl_bento.store.modelstore import StoredPipeline


def mapped(**body) -> GenerateRequest:
    return a1111.to_generate_request(a1111.A1111Txt2ImgRequest.model_validate(body))


def test_a1111_defaults():
    req = mapped(prompt="a cat")
    assert (req.steps, req.guidance_scale, req.scheduler.value, req.num_images) == (50, 7.0, "euler", 1)
    assert (req.width, req.height, req.seed, req.refine.value) == (1024, 1024, None, "none")


def test_fields_map_onto_generate_request():
    req = mapped(prompt="a cat", negative_prompt="blur", seed=42, steps=12, cfg_scale=4.5, width=832, height=1216,
                 sampler_name="DPM++ 2M Karras", batch_size=2, n_iter=3, refiner_checkpoint="sd_xl_refiner_1.0",
                 refiner_switch_at=0.7)
    assert (req.prompt, req.negative_prompt, req.seed, req.steps, req.guidance_scale) == ("a cat", "blur", 42, 12, 4.5)
    assert (req.width, req.height, req.num_images) == (832, 1216, 6)
    assert req.scheduler.value == "dpmpp_2m_karras" and req.refine.value == "ensemble" and req.high_noise_frac == 0.7
    assert mapped(prompt="x", refiner_checkpoint="r").high_noise_frac == 0.8
    assert mapped(prompt="x", refiner_checkpoint="r", refiner_switch_at=1.0).refine.value == "none"  # A1111: never
    assert mapped(prompt="x", refiner_checkpoint="None").refine.value == "none"


@pytest.mark.parametrize("name, schedule, expected", [
    ("Euler", None, "euler"), ("Euler a", None, "euler_a"), ("DPM++ 2M", "Uniform", "dpmpp_2m"),
    ("DPM++ 2M Karras", None, "dpmpp_2m_karras"), ("DDIM", None, "ddim"), ("UniPC", None, "unipc"),
    ("k_euler_a", None, "euler_a"), ("euler a", None, "euler_a"), ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
    # A1111 1.9+: Automatic is the sampler's own default schedule (Karras for DPM++ 2M, exponential for 2M SDE)
    ("DPM++ 2M", "Automatic", "dpmpp_2m_karras"), ("DPM++ 2M", None, "dpmpp_2m_karras"), (None, None, "euler"),
    ("PLMS", None, "plms"), ("LMS", None, "lms"), ("LMS Karras", None, "lms_karras"), ("Heun", None, "heun"),
    ("DPM2", None, "dpm2_karras"), ("DPM2", "Uniform", "dpm2"), ("DPM2 a Karras", None, "dpm2_a_karras"),
    ("DPM++ 2M SDE", None, "dpmpp_2m_sde_exponential"), ("DPM++ 2M SDE Karras", None, "dpmpp_2m_sde_karras"),
    ("DPM++ SDE", None, "dpmpp_sde_karras"), ("DPM++ SDE", "Exponential", "dpmpp_sde_exponential"),
    ("Euler", "Karras", "euler_karras"), ("Euler", "Exponential", "euler_exponential"), ("k_lms", None, "lms"),
    ("DPM++ 3M SDE", "Automatic", "dpmpp_3m_sde_exponential"), ("LMS Karras", "Automatic", "lms_karras"),
])
def test_samplers(name, schedule, expected):
    assert a1111.sampler(name, schedule).value == expected


def test_sampler_index_is_the_old_name_of_sampler_name():
    assert mapped(prompt="x", sampler_index="Euler a").scheduler.value == "euler_a"
    assert mapped(prompt="x", sampler_index="Euler a", sampler_name="DDIM").scheduler.value == "ddim"


@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive", "DPM++ 2S a", "Restart", "LCM", "DDIM CFG++"])
def test_samplers_without_a_diffusers_equivalent_are_400_naming_the_valid_ones(name):
    with pytest.raises(ServiceError) as info:
        mapped(prompt="x", sampler_name=name)
    assert info.value.status == 400 and info.value.details["field"] == "sampler_name"
    assert "no diffusers equivalent" in info.value.message
    assert "Euler, Euler Karras, Euler Exponential, Euler a, DPM++ 2M" in info.value.message and "PLMS" in info.value.message


def test_unknown_schedules_are_400_naming_the_field():
    with pytest.raises(ServiceError, match="valid for it: Automatic, Uniform") as info:
        mapped(prompt="x", sampler_name="Euler a", scheduler="Karras")  # diffusers' Euler a has no Karras sigmas
    assert info.value.details["field"] == "scheduler"
    with pytest.raises(ServiceError, match="Automatic, Uniform, Karras, Exponential") as info:
        mapped(prompt="x", sampler_name="Euler", scheduler="Align Your Steps")
    assert info.value.details["field"] == "scheduler"


@pytest.mark.parametrize("fields, field", [
    ({"width": 250}, "width"), ({"height": 4096}, "height"), ({"width": 2048, "height": 2048}, None),
    ({"steps": 0}, "steps"), ({"steps": 101}, "steps"), ({"cfg_scale": 21}, "cfg_scale"),
    ({"seed": 2**32}, "seed"), ({"seed": -2}, "seed"), ({"prompt": ""}, "prompt"), ({"prompt": "x" * 501}, None),
    ({"batch_size": 4, "n_iter": 3}, "batch_size"), ({"batch_size": 9}, "batch_size"),
    ({"refiner_checkpoint": "r", "refiner_switch_at": 0.0}, "refiner_switch_at"),
])
def test_limits_are_those_of_generate_request(fields, field):
    req = a1111.A1111Txt2ImgRequest.model_validate({"prompt": "x", **fields})
    with pytest.raises(ServiceError) as info:
        a1111.to_generate_request(req)
    assert info.value.status == 400 and info.value.details.get("field") == field
    answer = a1111.from_error(info.value)
    assert answer.status_code == 400
    assert json.loads(answer.body) == {"error": "HTTPException", "detail": info.value.message, "body": "",
                                       "errors": f"400: {info.value.message}"}


def test_request_validation_errors_and_service_errors_in_a1111_shape():
    with pytest.raises(ValidationError) as info:
        a1111.A1111Txt2ImgRequest.model_validate({"prompt": "x", "steps": "many"})
    answer = a1111.from_error(info.value)
    assert answer.status_code == 400 and json.loads(answer.body)["detail"].startswith("steps: ")
    busy = a1111.from_error(Overloaded("the queue is full", retry_after=4))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "4"
    assert json.loads(busy.body)["detail"] == "the queue is full"


def test_txt2img_answer_is_shaped_as_a1111():
    req = a1111.A1111Txt2ImgRequest.model_validate({
        "prompt": "a cat", "negative_prompt": "dog", "seed": -1, "steps": 4, "width": 256, "height": 256,
        "batch_size": 2, "sampler_name": "Euler a", "restore_faces": False, "styles": ["s"], "not_a1111": 1})
    generated = a1111.to_generate_request(req)
    images = [CachedImage(id=str(i), seed=900 + i, media_type="image/png", width=256, height=256,
                          parameters=f"a cat\nSeed: {900 + i}", data=b"png%d" % i) for i in range(2)]
    out = a1111.to_a1111_response(req, generated, images, "sdxl-base:abc")
    assert set(out) == {"images", "parameters", "info"}
    assert [base64.b64decode(i) for i in out["images"]] == [b"png0", b"png1"]
    params = out["parameters"]
    assert params["prompt"] == "a cat" and params["seed"] == -1 and params["restore_faces"] is False
    assert params["styles"] == ["s"] and params["enable_hr"] is False and "not_a1111" not in params
    assert set(a1111.A1111Txt2ImgRequest.model_fields) == set(params)
    info = json.loads(out["info"])
    assert info["seed"] == 900 and info["all_seeds"] == [900, 901]  # the real seeds, not -1
    assert info["infotexts"] == ["a cat\nSeed: 900", "a cat\nSeed: 901"]
    assert (info["prompt"], info["negative_prompt"], info["all_prompts"]) == ("a cat", "dog", ["a cat", "a cat"])
    assert (info["steps"], info["cfg_scale"], info["sampler_name"], info["width"], info["height"]) == (
        4, 7.0, "Euler a", 256, 256)
    assert info["sd_model_name"] == "sdxl-base:abc" and info["batch_size"] == 2
    quiet = a1111.A1111Txt2ImgRequest.model_validate({"prompt": "a cat", "send_images": False})
    assert a1111.to_a1111_response(quiet, a1111.to_generate_request(quiet), images, "m")["images"] == []


# -- progress / interrupt against a real scheduler ------------------------------------------------
class HeldEngine:
    """Steps only when told to, so the test sees a batch mid-way."""

    def __init__(self):
        self.step = threading.Semaphore(0)
        self.started = threading.Event()

    def generate(self, works, on_step=None):
        self.started.set()
        for step in range(1, 11):
            self.step.acquire(timeout=5)
            on_step(step, 10)
        return [[None] * w.num_images for w in works]


KEY = BatchKey(kind="txt2img", width=256, height=256, steps=10, guidance_scale=5.0, scheduler="euler")


@pytest.fixture
def scheduler():
    engine = HeldEngine()
    s = Scheduler(engine, max_batch_requests=1, max_batch_images=8, max_jobs=8)
    s.start()
    s.engine_for_test = engine
    yield s
    for _ in range(50):
        engine.step.release()
    s.stop()


def wait_for(predicate, timeout=5.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_progress_idle():
    view = a1111.progress_view(None)
    assert view == {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None, "state": {
        "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
        "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}}


def test_progress_of_the_running_batch_and_interrupt(scheduler):
    engine = scheduler.engine_for_test
    running, waiting = scheduler.submit([Work(KEY, "a", "", [1]), Work(KEY, "b", "", [2])], timeout=30)
    assert engine.started.wait(5)
    for _ in range(3):
        engine.step.release()
    assert wait_for(lambda: running.step == 3)
    view = a1111.progress_view(scheduler)
    state = view["state"]
    assert view["progress"] == 0.3 and view["eta_relative"] >= 0
    assert (state["job"], state["job_count"], state["sampling_step"], state["sampling_steps"]) == ("txt2img", 2, 3, 10)
    assert len(state["job_timestamp"]) == 14 and state["interrupted"] is False

    owners = a1111.JobOwners()
    owners.recorder("alice")([running])
    assert a1111.interrupt(scheduler, owners, "bob") == 0  # not bob's
    assert a1111.interrupt(scheduler, owners, "alice") == 1
    assert a1111.progress_view(scheduler)["state"]["interrupted"] is True
    engine.step.release()
    assert wait_for(lambda: running.state == JobState.cancelled)
    assert waiting.state in (JobState.queued, JobState.running)  # the queue is not touched
    assert a1111.interrupt(scheduler, None, None) <= 1  # open service: whatever runs now


def test_app_routes(scheduler, tmp_path: Path):
    models = [StoredPipeline("sdxl-base:v1", tmp_path / "base", {"role": "base"}),
              StoredPipeline("sdxl-refiner:v1", tmp_path / "ref", {"role": "refiner"}),
              StoredPipeline("photo:v2", tmp_path / "photo", {"role": "base", "sha256": "ab" * 32})]
    service = SimpleNamespace(runtime=SimpleNamespace(scheduler=scheduler),
                              front=SimpleNamespace(keys=None, a1111_owners=a1111.JobOwners()))
    app = a1111.a1111_app(lambda: models, service=lambda: service)
    with TestClient(app) as client:
        assert client.get("/progress").json()["state"]["job"] == ""
        listed = client.get("/sd-models").json()
        assert [m["title"] for m in listed] == ["sdxl-base:v1", "photo:v2"]
        assert set(listed[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert listed[0]["model_name"] == "sdxl-base" and listed[1]["hash"] == "ab" * 5
        samplers = client.get("/samplers").json()
        assert [s["name"] for s in samplers] == [spec.label for spec in a1111.SAMPLERS]
        assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
        (job,) = scheduler.submit([Work(KEY, "a", "", [1])], timeout=30)
        assert scheduler.engine_for_test.started.wait(5)
        assert client.post("/interrupt").json() == {}
        assert job.cancel_requested


def test_interrupt_needs_a_principal_when_keys_are_in_use(scheduler):
    service = SimpleNamespace(runtime=SimpleNamespace(scheduler=scheduler),
                              front=SimpleNamespace(keys=object(), a1111_owners=a1111.JobOwners()))
    app = a1111.a1111_app(list, service=lambda: service)
    with TestClient(app) as client:
        answer = client.post("/interrupt")
        assert answer.status_code == 401 and answer.json()["error"] == "HTTPException"


def test_caller_name():
    def scope(principal):
        return {"state": {"principal": principal}} if principal else {}

    assert compat.caller_name(scope(None)) == (False, None)
    assert compat.caller_name(scope(OPEN_PRINCIPAL)) == (True, None)
    assert compat.caller_name(scope(Principal("team", DEFAULT_TIERS["free"], "abcd"))) == (True, "team")
    assert compat.caller_name(scope(Principal("open", DEFAULT_TIERS["free"], "abcd"))) == (True, "open")


def test_wire_model_passes_every_a1111_field_on():
    wire = a1111.A1111Wire.model_validate({"prompt": "x", "restore_faces": True, "enable_hr": None, "bogus": 1})
    fields = {k: getattr(wire, k) for k in type(wire).model_fields}  # what BentoML hands the API method
    assert set(fields) == set(a1111.A1111Txt2ImgRequest.model_fields)
    req = a1111.A1111Txt2ImgRequest.model_validate(compat.given(fields))
    assert req.echo()["restore_faces"] is True and req.echo()["enable_hr"] is False


def test_images_withheld_by_the_safety_check_are_left_out():
    req = a1111.A1111Txt2ImgRequest.model_validate({"prompt": "x", "batch_size": 2})
    kept = CachedImage(id="a", seed=5, media_type="image/png", width=8, height=8, parameters="x\nSeed: 5", data=b"p")
    withheld = CachedImage(id="", seed=6, media_type="image/png", width=8, height=8, parameters="x\nSeed: 6",
                           data=b"", finish_reason="content_filtered")
    out = a1111.to_a1111_response(req, a1111.to_generate_request(req), [withheld, kept], "m")
    info = json.loads(out["info"])
    assert len(out["images"]) == 1 and info["seed"] == 5 and info["all_seeds"] == [5]
    assert info["extra_generation_params"] == {"Content filtered": 1}
    with pytest.raises(ServiceError) as error:
        a1111.to_a1111_response(req, a1111.to_generate_request(req), [withheld], "m")
    answer = a1111.from_error(error.value)
    assert answer.status_code == 400 and "withheld by the safety check" in json.loads(answer.body)["detail"]
