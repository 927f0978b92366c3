"""``sdxl-bento generate`` against a scripted task API (httpx.MockTransport): the flow, the files,
--json, errors as sentences, Ctrl-C cancelling the task. The real server: tests/e2e/test_clients.py."""

import argparse
import json

import httpx
import pytest

from sdxl_bento.cli import generate as cli_generate
from sdxl_bento.cli.generate import error_sentence, generate, output_paths


class FakeService:
    """The task API: submit -> two in-progress polls -> completed; images downloadable."""

    def __init__(self, images=2, fail_with=None, interrupt_on_poll=False, withheld=()):
        self.requests: list[httpx.Request] = []
        self.polls = 0
        self.images = images
        self.fail_with = fail_with
        self.interrupt_on_poll = interrupt_on_poll
        self.cancelled = False
        self.withheld = withheld

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/jobs/submit":
            self.body = json.loads(request.content)
            return httpx.Response(200, json={"task_id": "t-1", "status": "in_progress"})
        if path == "/jobs/status":
            self.polls += 1
            if self.interrupt_on_poll:
                raise KeyboardInterrupt
            if self.polls == 1:
                return httpx.Response(200, json={"status": "in_progress", "state": "queued", "queue_position": 1})
            if self.polls == 2:
                return httpx.Response(200, json={"status": "in_progress", "state": "running", "step": 2,
                                                 "total_steps": 4, "eta_s": 0.5})
            return httpx.Response(200, json={"status": "failed" if self.fail_with else "completed"})
        if path == "/jobs/get":
            if self.fail_with:
                return httpx.Response(400, json=self.fail_with)
            seed = self.body.get("seed", 100)
            return httpx.Response(200, json={"model": "sdxl-base:x", "synthetic": True, "images": [
                {"id": None, "url": None, "seed": seed + k, "finish_reason": "content_filtered"} if k in self.withheld
                else {"id": f"i{k}", "url": f"/images/i{k}", "seed": seed + k} for k in range(self.images)]})
        if path.startswith("/images/"):
            return httpx.Response(200, content=b"PNG:" + path.encode(), headers={"content-type": "image/png"})
        if path == "/jobs/cancel":
            self.cancelled = True
            return httpx.Response(200, json={"task_id": "t-1", "status": "canceled"})
        return httpx.Response(404, json={"error": "not found"})


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(cli_generate, "POLL_S", 0)


def run(service, tmp_path, **kw):
    return generate("a cat", output=tmp_path / "out.png", server="http://svc", transport=httpx.MockTransport(service),
                    **kw)


def test_generates_and_downloads_every_image(tmp_path, capsys):
    service = FakeService(images=2)
    assert run(service, tmp_path, api_key="sk-1", seed=5, steps=4, size="256x320", n=2, negative="dog",
               scheduler="ddim") == 0
    assert service.body == {"prompt": "a cat", "width": 256, "height": 320, "num_images": 2, "refine": "none",
                            "output_format": "png", "seed": 5, "steps": 4, "negative_prompt": "dog",
                            "scheduler": "ddim"}
    assert all(r.headers["authorization"] == "Bearer sk-1" for r in service.requests)
    assert (tmp_path / "out-1.png").read_bytes() == b"PNG:/images/i0"
    assert (tmp_path / "out-2.png").read_bytes() == b"PNG:/images/i1"
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'out-1.png'} (seed 5)" in out and "(seed 6)" in out


def test_json_output_is_one_object(tmp_path, capsys):
    assert run(FakeService(images=1), tmp_path, seed=9, json_output=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task_id"] == "t-1" and out["seeds"] == [9] and out["files"] == [str(tmp_path / "out.png")]


def test_the_output_suffix_picks_the_format(tmp_path):
    service = FakeService(images=1)
    generate("x", output=tmp_path / "a.webp", server="http://svc", transport=httpx.MockTransport(service))
    assert service.body["output_format"] == "webp"


def test_a_failed_task_is_one_sentence_and_exit_1(tmp_path, capsys):
    bentoml_shape = {"error": "1 validation error for Input",
                     "detail": [{"loc": ["steps"], "msg": "Input should be greater than or equal to 1", "type": "x"}]}
    assert run(FakeService(fail_with=bentoml_shape), tmp_path, steps=0) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("sdxl-bento: the server refused the request (400): "
                           "steps: Input should be greater than or equal to 1")
    assert not (tmp_path / "out.png").exists()


def test_ctrl_c_cancels_the_task(tmp_path, capsys):
    service = FakeService(interrupt_on_poll=True)
    assert run(service, tmp_path) == 130
    assert service.cancelled and "task t-1 cancelled" in capsys.readouterr().err


def test_a_bad_size_and_an_unreachable_server(tmp_path, capsys):
    assert run(FakeService(), tmp_path, size="big") == 1
    assert "--size must be WIDTHxHEIGHT" in capsys.readouterr().err

    def refuse(request):
        raise httpx.ConnectError("connection refused")

    assert generate("x", output=tmp_path / "o.png", server="http://svc", transport=httpx.MockTransport(refuse)) == 1
    assert "cannot reach the service at http://svc" in capsys.readouterr().err


@pytest.mark.parametrize("status, body, headers, sentence", [
    (503, {"error": {"type": "overloaded", "message": "the queue is full"}}, {"retry-after": "5"},
     "the server refused the request (503): the queue is full; try again in 5 s"),
    (400, {"error": "1 validation error", "detail": [{"loc": ["body", "width"], "msg": "bad"}]}, {},
     "the server refused the request (400): width: bad"),
    (400, [{"error": "task_id is required"}], {}, "the server refused the request (400): task_id is required"),
    (404, {"error": "task_id not found"}, {}, "the server refused the request (404): task_id not found"),
    (502, None, {}, "the server answered 502 Bad Gateway: upstream down"),
])
def test_error_sentences(status, body, headers, sentence):
    response = httpx.Response(status, json=body, headers=headers) if body is not None else httpx.Response(
        status, text="upstream down")
    assert error_sentence(response) == sentence


def test_output_paths_and_register():
    from pathlib import Path

    assert output_paths(Path("d/out.png"), 1) == [Path("d/out.png")]
    assert output_paths(Path("d/out.png"), 3) == [Path("d/out-1.png"), Path("d/out-2.png"), Path("d/out-3.png")]
    top = argparse.ArgumentParser()
    cli_generate.register(top.add_subparsers(dest="group"))
    args = top.parse_args(["generate", "a cat", "-n", "2", "--size", "512x512", "--json", "--refine", "ensemble"])
    assert (args.prompt, args.n, args.size, args.json, args.refine) == ("a cat", 2, "512x512", True, "ensemble")
    assert args.run is cli_generate._run


def test_images_withheld_by_the_safety_check(tmp_path, capsys):
    assert run(FakeService(images=2, withheld=(0,)), tmp_path, seed=3, n=2, json_output=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seeds"] == [4] and out["withheld_seeds"] == [3] and out["files"] == [str(tmp_path / "out.png")]
    assert (tmp_path / "out.png").read_bytes() == b"PNG:/images/i1"
    assert run(FakeService(images=1, withheld=(0,)), tmp_path / "none") == 1
    assert "every image was withheld by the safety check" in capsys.readouterr().err


class StreamingService(FakeService):
    """The task API with its event stream: queued, running steps, a preview, completed; the first connection drops
    after two events, and the second must resume with Last-Event-ID."""

    EVENTS = [("queued", {"state": "queued", "queue_position": 0, "eta_s": 2}),
              ("running", {"state": "running", "step": 1, "total_steps": 4, "eta_s": 1}),
              ("preview", {"step": 2, "total_steps": 4, "images": ["AA=="]}),
              ("running", {"state": "running", "step": 4, "total_steps": 4, "eta_s": 0}),
              ("completed", {"status": "completed"})]

    def __init__(self, **kw):
        super().__init__(**kw)
        self.resumed_from = []

    def __call__(self, request):
        if request.url.path != "/jobs/events":
            return super().__call__(request)
        last = int(request.headers.get("last-event-id", "0"))
        self.resumed_from.append(last)
        chosen = list(enumerate(self.EVENTS, 1))[last:last + 2] if last == 0 else list(enumerate(self.EVENTS, 1))[last:]
        text = ": ping\n\n" + "".join(f"id: {i}\nevent: {name}\ndata: {json.dumps(data)}\n\n" for i, (name, data) in chosen)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=text.encode())


def test_progress_follows_the_event_stream_and_resumes_it(tmp_path, capsys):
    service = StreamingService(images=1)
    assert run(service, tmp_path, seed=1) == 0
    assert service.resumed_from == [0, 2]  # the dropped stream resumed after event 2
    assert service.polls == 0  # no polling
    assert (tmp_path / "out.png").read_bytes() == b"PNG:/images/i0"
