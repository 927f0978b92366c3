"""The audit log: valid JSON lines, hashed prompts, what may reach the file (allow-lists, caps), size rotation,
no lost or mixed lines under threads."""

import base64
import hashlib
import json
import logging
import re
import stat
import threading

import pytest

from sdxl_bento.http.audit import FIELDS as AUDIT_FIELDS
from sdxl_bento.http.audit import PARAMETERS, AuditLog
from sdxl_bento.samplers import Sampler
from sdxl_bento.schemas import GenerateRequest, InpaintRequest, RefineRequest

FIELDS = {"key_name": "marketing", "tier": "standard", "endpoint": "/txt2img", "prompt": "a red fox\nin snow",
          "negative_prompt": "blurry", "parameters": {"seed": 42, "steps": 30, "width": 1024}, "model": "sdxl-base:v1",
          "outcome": "ok", "reason": None, "status": 200, "cache": None, "queue_s": 0.25, "gpu_s": 3.5,
          "image_ids": ["0b6c"], "request_id": "req-1"}


def _lines(*paths):
    return [json.loads(line) for p in paths for line in p.read_text(encoding="utf-8").split("\n") if line]


def test_one_json_line_per_record(tmp_path):
    path = tmp_path / "audit" / "audit.log"
    with AuditLog(path) as log:
        log.record(**FIELDS)
        log.record(**{**FIELDS, "outcome": "rejected", "status": 429, "reason": "rate limit",
                      "prompt": "ünïcode \u2028"})
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == 2 and len(text.splitlines()) == 2
    first, second = _lines(path)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert first == {"time": first["time"], **FIELDS}
    assert second["outcome"] == "rejected" and second["prompt"] == "ünïcode \u2028"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_hash_mode_hides_prompts(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, prompts="hash")
    log.record(**FIELDS)
    log.close()
    (line,) = _lines(path)
    assert "prompt" not in line and "negative_prompt" not in line
    assert line["prompt_sha256"] == hashlib.sha256(FIELDS["prompt"].encode()).hexdigest()
    assert line["negative_prompt_sha256"] == hashlib.sha256(b"blurry").hexdigest()
    assert "red fox" not in path.read_text() and "blurry" not in path.read_text()
    assert line["parameters"] == FIELDS["parameters"]


def test_odd_values_still_give_valid_json(tmp_path, capsys):
    path = tmp_path / "audit.log"
    log = AuditLog(path, stdout=True)
    log.record(request_id=object.__new__(type("Id", (), {"__str__": lambda self: "id-1"})),
               queue_s=float("nan"), parameters={"seeds": [float("inf"), 7], "scheduler": Sampler.euler_a},
               model=tmp_path, prompt="lone \ud800 surrogate")
    log.close()
    (line,) = _lines(path)
    assert line["request_id"] == "id-1" and line["queue_s"] is None
    assert line["parameters"] == {"seeds": [None, 7], "scheduler": "euler_a"} and line["model"] == str(tmp_path)
    assert line["prompt"] == "lone \ud800 surrogate"  # written as its JSON escape: the file stays UTF-8
    assert json.loads(capsys.readouterr().out) == line


def test_only_known_fields_are_written(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.record(**FIELDS, time="1970-01-01", headers={"authorization": "Bearer sk-sdxl-secret"}, body=b"{}",
                   api_key="sk-sdxl-secret", path=tmp_path, task_id="t-1", message="boom", duration_s=0.5,
                   items=None, seeds=[1, 2], finish_reasons=["success"])
    (line,) = _lines(path)
    assert set(line) == {"time", *FIELDS, "task_id", "message", "duration_s", "items", "seeds", "finish_reasons"}
    assert set(line) - {"time"} <= AUDIT_FIELDS and line["time"] != "1970-01-01"
    assert "sk-sdxl-secret" not in path.read_text()


def test_parameters_keep_settings_never_uploads(tmp_path):
    """A 16 MB base64 image, in every place a request can carry one, stays out of the file."""
    upload = base64.b64encode(b"\x89PNG" + bytes(12 * 2**20)).decode()
    assert len(upload) > 16_000_000
    path = tmp_path / "audit.log"
    params = {"width": 1024, "steps": 30, "seed": 7, "loras": [{"name": "ink", "weight": 0.5}],
              "image": upload, "mask": upload, "init_images": [upload], "alwayson_scripts": {"x": {"args": [upload]}},
              "override_settings": {"sd_model_checkpoint": upload}, "prompt": "hidden", "hr_prompt": "hidden",
              "model": upload, "user": "end-user-1", "cfg_scale": 7.0, "sampler_name": "Euler a",
              "denoising_strength": 0.5}
    with AuditLog(path, prompts="hash") as log:
        log.record(endpoint="/img2img", parameters=params,
                   items=[{"prompt": "p", "parameters": {**params, "num_images": 2}}])
    assert path.stat().st_size < 4000
    (line,) = _lines(path)
    kept = line["parameters"]
    assert set(kept) == {"width", "steps", "seed", "loras", "model", "user", "cfg_scale", "sampler_name",
                         "denoising_strength"}
    assert kept["loras"] == [{"name": "ink", "weight": 0.5}] and kept["user"] == "end-user-1"
    assert kept["model"] == upload[:200] + f"…[truncated, {len(upload)} chars]"
    assert line["items"][0]["parameters"] == {**kept, "num_images": 2}
    assert "hidden" not in path.read_text()


def test_parameter_names_cover_the_request_models():
    """Every settings field of the request schemas is kept; their uploads, prompts and webhook URLs (which can
    carry the receiver's token) are not."""
    fields = set(GenerateRequest.model_fields) | set(InpaintRequest.model_fields) | set(RefineRequest.model_fields)
    assert fields - PARAMETERS == {"prompt", "negative_prompt", "image", "mask", "webhook"}
    assert not {"image", "mask", "init_images", "prompt", "negative_prompt", "hr_prompt"} & PARAMETERS


def test_the_hires_pass_is_kept_without_its_prompts(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.record(endpoint="/generate", parameters={"steps": 4, "hires": {"scale": 2, "prompt": "secret castle",
                                                                          "negative_prompt": "x", "steps": 6}})
    line = json.loads(path.read_text())
    assert line["parameters"] == {"steps": 4, "hires": {"scale": 2, "steps": 6}}
    assert "secret castle" not in path.read_text()


def test_batch_items_are_policed_like_the_request(tmp_path):
    path = tmp_path / "audit.log"
    items = [{"prompt": "a red fox", "negative_prompt": "blurry", "parameters": {"steps": 20, "image": "AAAA"},
              "seeds": [3], "outcome": "ok", "secret": "x"},
             {"prompt": "a blue whale", "parameters": {"width": 512}, "outcome": "error", "reason": "timeout"},
             "not a dict"]
    for mode in ("plain", "hash"):
        with AuditLog(path, prompts=mode) as log:
            log.record(endpoint="/generate_batch", items=items)
    plain, hashed = _lines(path)
    assert plain["items"] == [
        {"prompt": "a red fox", "negative_prompt": "blurry", "parameters": {"steps": 20}, "seeds": [3],
         "outcome": "ok"},
        {"prompt": "a blue whale", "parameters": {"width": 512}, "outcome": "error", "reason": "timeout"}, {}]
    sha = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    assert hashed["items"][0] == {"prompt_sha256": sha("a red fox"), "negative_prompt_sha256": sha("blurry"),
                                  "parameters": {"steps": 20}, "seeds": [3], "outcome": "ok"}
    assert hashed["items"][1]["prompt_sha256"] == sha("a blue whale")
    text = path.read_text().split("\n")[1]
    assert "fox" not in text and "whale" not in text and "blurry" not in text


def test_caps(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.record(request_id="req\n{\"outcome\":\"ok\"}\x1b[31m" + "x" * 500, reason="r" * 5000,
                   message="m" * 5000, model="q" * 300, prompt="p" * 20_000, image_ids=[f"id{i}" for i in range(1000)],
                   parameters={"loras": [[[[[["sentinel"]]]]]], "size": "1" * 250},
                   items=[{"prompt": "p"}] * 300)
    (line,) = _lines(path)
    assert line["request_id"] == ('req{"outcome":"ok"}[31m' + "x" * 500)[:128]
    assert len(line["request_id"]) == 128 and line["request_id"].isprintable()
    assert line["reason"] == "r" * 1000 + "…[truncated, 5000 chars]"
    assert line["message"].startswith("m" * 1000 + "…")
    assert line["model"] == "q" * 200 + "…[truncated, 300 chars]"
    assert line["prompt"] == "p" * 10_000 + "…[truncated, 20000 chars]"
    assert len(line["image_ids"]) == 257 and line["image_ids"][-1] == "…[truncated, 1000 items]"
    assert line["parameters"]["size"].endswith("…[truncated, 250 chars]")
    assert line["parameters"]["loras"] == [[[["…[truncated, nested too deep]"]]]]
    assert len(line["items"]) == 257 and line["items"][-1] == "…[truncated, 300 items]"


def test_rotation_at_max_bytes_keeps_backups(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=1000, backups=3)
    for i in range(200):
        log.record(request_id=f"req-{i:04d}", outcome="ok")
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
    for name in files:
        size = (tmp_path / name).stat().st_size
        assert 0 < size <= 1000
    newest_first = [tmp_path / n for n in ("audit.log.3", "audit.log.2", "audit.log.1", "audit.log")]
    ids = [line["request_id"] for line in _lines(*newest_first)]
    assert ids[-1] == "req-0199" and ids == sorted(ids)  # consecutive, newest last, oldest files dropped
    assert ids == [f"req-{i:04d}" for i in range(200 - len(ids), 200)]


def test_eight_threads_lose_and_mix_no_line(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=20_000, backups=50)
    threads = [threading.Thread(target=lambda t=t: [log.record(**{**FIELDS, "request_id": f"{t}-{i}"})
                                                    for i in range(200)]) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    paths = sorted(tmp_path.iterdir())
    assert len(paths) > 3  # it did rotate
    lines = _lines(*paths)  # every line parses
    assert len(lines) == 1600
    assert {line["request_id"] for line in lines} == {f"{t}-{i}" for t in range(8) for i in range(200)}


def test_a_failing_disk_does_not_fail_the_request(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    log = AuditLog(blocker / "audit.log")
    with caplog.at_level(logging.ERROR, logger="sdxl_bento.http.audit"):
        log.record(**FIELDS)
    assert "could not be written" in caplog.text
    blocker.unlink()
    log.record(**FIELDS)  # the disk is back: the next line is written
    log.close()
    assert len(_lines(blocker / "audit.log")) == 1


def test_no_path_and_bad_arguments(capsys):
    AuditLog(None).record(**FIELDS)
    AuditLog(None, stdout=True, prompts="hash").record(prompt="secret")
    assert "secret" not in capsys.readouterr().out
    with pytest.raises(ValueError):
        AuditLog(None, prompts="none")
    with pytest.raises(ValueError):
        AuditLog(None, backups=-1)
