"""The audit log: valid JSON lines, hashed prompts, size rotation, no lost or mixed lines under threads."""

import hashlib
import json
import logging
import re
import stat
import threading

import pytest

from sdxl_bento.audit import AuditLog

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
               queue_s=float("nan"), parameters={"gpu_s": [float("inf")]}, path=tmp_path)
    log.close()
    (line,) = _lines(path)
    assert line["request_id"] == "id-1" and line["queue_s"] is None and line["parameters"] == {"gpu_s": [None]}
    assert json.loads(capsys.readouterr().out) == line


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
    with caplog.at_level(logging.ERROR, logger="sdxl_bento.audit"):
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
