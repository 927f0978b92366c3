"""The gateway in process: httpx's ASGI transport -> ``Gateway`` -> a tiny app standing in for BentoML, which
records what reaches it. Keys file, rate limiter, job slots, audit log, signer and route table are the real
ones (no Redis)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest

from sdxl_bento.adapters import a1111
from sdxl_bento.adapters import openai as openai_api
from sdxl_bento.core.policy import Admission
from sdxl_bento.errors import native_error
from sdxl_bento.http import routes
from sdxl_bento.http.audit import AuditLog
from sdxl_bento.http.auth import KeyFile, add_key
from sdxl_bento.http.gateway import Gateway
from sdxl_bento.http.ratelimit import JobSlots, RateLimiter
from sdxl_bento.http.signing import INTERNAL_HEADERS, Signer
from sdxl_bento.schemas import BatchRequest, GenerateRequest, Img2ImgRequest, InpaintRequest, RefineRequest

TABLE = routes.table(
    {"/txt2img": GenerateRequest, "/generate": GenerateRequest, "/refine": RefineRequest, "/img2img": Img2ImgRequest,
     "/inpaint": InpaintRequest}, {"/jobs": GenerateRequest, "/img2img_jobs": Img2ImgRequest},
    batch=BatchRequest,
    foreign={"/v1/images/generations": routes.Route("/v1/images/generations", openai_api.parse_body,
                                                    openai_api.error_response),
             "/sdapi/v1/txt2img": routes.Route("/sdapi/v1/txt2img", a1111.parse_body, a1111.from_error)},
    mounted={"/sdapi/v1": a1111.from_error, "/models": native_error, "/images": native_error})

TIERS = """tiers:
  trickle: {priority: 0, requests_per_minute: 1, images_per_minute: 60, burst_requests: 2, burst_images: 10,
            max_concurrent_jobs: 4, max_pixels: 1048576, max_steps: 40, max_images: 2, default_deadline_s: 120,
            refiner_allowed: false, safety_optional: false}
"""
MAX_BODY = 4096
UPLOAD = "data:image/png;base64," + "VVBMT0FE" * 40


class Inner:
    """Stands in for BentoML: records each request that reaches it and answers 200; may hold the next request
    (``gate``), fail, or note an audit dict in the request state as the API methods do."""

    def __init__(self) -> None:
        self.seen: list[SimpleNamespace] = []
        self.gate: asyncio.Event | None = None
        self.entered: asyncio.Event | None = None
        self.fail = False
        self.audit: dict | None = None

    async def __call__(self, scope, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"]]
        self.seen.append(SimpleNamespace(path=scope["path"], headers=headers, state=dict(scope.get("state", {})),
                                         body=body))
        if self.audit is not None:
            scope["state"]["audit"] = self.audit
        gate, self.gate = self.gate, None  # holds the next request only
        if gate is not None:
            self.entered.set()
            await gate.wait()
        if self.fail:
            raise RuntimeError("the app failed")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})


@pytest.fixture
def rig(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(TIERS)
    raw = {name: add_key(keys, name, tier, operator=name == "ops")
           for name, tier in (("alice", "free"), ("bob", "standard"), ("ops", "premium"), ("drip", "trickle"))}
    inner = Inner()
    drain = SimpleNamespace(draining=False)
    signer = Signer(b"s" * 32)
    slots = JobSlots(None)
    gateway = Gateway(inner, keys=KeyFile(keys), limiter=RateLimiter(), slots=slots,
                      audit=AuditLog(tmp_path / "audit.log"), routes=TABLE, signer=signer, max_body_bytes=MAX_BODY,
                      drain=drain, task_cost=lambda task_id: 2)
    rig = SimpleNamespace(gateway=gateway, inner=inner, drain=drain, signer=signer, slots=slots, key=raw,
                          audit_path=tmp_path / "audit.log")
    rig.audit = lambda: [json.loads(line) for line in rig.audit_path.read_text().splitlines()] \
        if rig.audit_path.exists() else []
    return rig


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sdxl.test")


def call(app, method: str, path: str, *, key: str | None = None, headers=(), **kw) -> httpx.Response:
    """One request; ``key`` as a bearer token; ``headers`` a list of pairs (so names may repeat)."""
    sent = [*([("authorization", f"Bearer {key}")] if key else []), *headers]

    async def go() -> httpx.Response:
        async with client(app) as c:
            return await c.request(method, path, headers=sent, **kw)

    return asyncio.run(go())


def error_type(answer: httpx.Response) -> str:
    return answer.json()["error"]["type"]


# -- who asks ------------------------------------------------------------------------------------------
def test_a_valid_key_is_required_on_guarded_routes(rig):
    for key in (None, "sk-sdxl-wrong"):
        answer = call(rig.gateway, "POST", "/generate", key=key, json={"prompt": "x"})
        assert answer.status_code == 401 and error_type(answer) == "unauthorized"
        assert answer.headers["www-authenticate"] == 'Bearer realm="sdxl-bento"'
    assert call(rig.gateway, "GET", "/jobs/status?task_id=t1").status_code == 401
    assert rig.inner.seen == []
    assert call(rig.gateway, "GET", "/livez").status_code == 200  # not guarded
    assert call(rig.gateway, "POST", "/generate", headers=[("x-api-key", rig.key["bob"])],
                json={"prompt": "x"}).status_code == 200


def test_credentials_are_removed_before_the_app(rig):
    answer = call(rig.gateway, "POST", "/generate", key=rig.key["bob"], json={"prompt": "x"},
                  headers=[("x-api-key", rig.key["alice"]), ("x-request-id", "r-1")])
    assert answer.status_code == 200
    (seen,) = rig.inner.seen
    names = {name for name, _ in seen.headers}
    assert not names & {"authorization", "x-api-key"} and "x-request-id" in names
    assert not any(rig.key["bob"] in value or rig.key["alice"] in value for _, value in seen.headers)
    assert seen.state["principal"].name == "bob"  # Authorization wins over X-API-Key


def test_the_open_service_lets_everyone_in_as_anonymous(rig):
    rig.gateway.keys = None
    answers = [call(rig.gateway, "POST", "/generate", json={"prompt": "x"}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3 and "x-ratelimit-limit" not in answers[0].headers
    assert rig.inner.seen[0].state["principal"].anonymous


@pytest.mark.parametrize("path, headers", [
    ("/jobs/status?task_id=a&task_id=b", []),
    ("/jobs/status?task_id=a", [("x-api-key", "k1"), ("x-api-key", "k2")]),
    ("/jobs/status?task_id=a", [("authorization", "Bearer k1"), ("authorization", "Bearer k2")]),
    ("/jobs/status?task_id=a", [("content-type", "application/json"), ("content-type", "text/plain")]),
    ("/jobs/status?task_id=a", [("x-request-deadline", "5"), ("x-request-deadline", "500")]),
])
def test_repeated_query_parameters_and_deciding_headers_are_refused(rig, path, headers):
    answer = call(rig.gateway, "GET", path, key=rig.key["bob"], headers=headers)
    assert answer.status_code == 400 and "more than once" in answer.json()["error"]["message"]
    assert rig.inner.seen == []


# -- the body --------------------------------------------------------------------------------------------
def test_bodies_too_large_of_another_type_or_not_json_are_refused(rig):
    bob = rig.key["bob"]
    big = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    assert call(rig.gateway, "POST", "/generate", key=bob, content=big).status_code == 413

    async def chunks():  # no Content-Length: counted as it streams
        for _ in range(5):
            yield b" " * 1024

    streamed = call(rig.gateway, "POST", "/generate", key=bob, content=chunks())
    assert streamed.status_code == 413 and error_type(streamed) == "payload_too_large"
    typed = call(rig.gateway, "POST", "/generate", key=bob, content=b"prompt=x",
                 headers=[("content-type", "application/x-www-form-urlencoded")])
    assert typed.status_code == 415 and error_type(typed) == "unsupported_media_type"
    broken = call(rig.gateway, "POST", "/generate", key=bob, content=b'{"prompt": ',
                  headers=[("content-type", "application/json")])
    assert broken.status_code == 400 and broken.json()["error"]["message"] == "the request body is not valid JSON"
    invalid = call(rig.gateway, "POST", "/generate", key=bob, json={"prompt": "x", "steps": 0})
    assert invalid.status_code == 400 and invalid.json()["error"]["message"].startswith("steps: ")
    assert rig.inner.seen == []


@pytest.mark.parametrize("steps", ['"100"', "1e2", "100.0", '"41"'])
def test_numbers_are_policed_as_the_values_that_run(rig, steps):
    answer = call(rig.gateway, "POST", "/generate", key=rig.key["alice"],
                  content=f'{{"prompt": "x", "steps": {steps}}}'.encode(),
                  headers=[("content-type", "application/json")])
    assert answer.status_code == 403
    error = answer.json()["error"]
    assert (error["type"], error["tier"], error["limit"], error["allowed"]) == ("forbidden", "free", "max_steps", 40)
    assert rig.inner.seen == []


def test_the_app_gets_the_caller_its_admission_and_deadline(rig):
    body = b'{"prompt": "x", "num_images": "3", "steps": "12"}'
    answer = call(rig.gateway, "POST", "/generate", key=rig.key["bob"], content=body,
                  headers=[("content-type", "application/json"), ("x-request-deadline", "30")])
    assert answer.status_code == 200
    (seen,) = rig.inner.seen
    assert seen.body == body  # passed on as sent
    assert seen.state["principal"].name == "bob" and seen.state["deadline_s"] == 30
    assert seen.state["admission"] == Admission(images=3, priority=5, deadline_s=30)
    call(rig.gateway, "POST", "/generate", key=rig.key["bob"], json={"prompt": "x"},
         headers=[("x-request-deadline", "9999")])
    assert rig.inner.seen[-1].state["deadline_s"] == 300  # the tier's default is the most
    for bad in ("soon", "0", "nan", "86401"):
        refused = call(rig.gateway, "POST", "/generate", key=rig.key["bob"], json={"prompt": "x"},
                       headers=[("x-request-deadline", bad)])
        assert refused.status_code == 400 and "x-request-deadline" in refused.json()["error"]["message"]


def test_batch_items_are_stamped_with_their_caller(rig):
    answer = call(rig.gateway, "POST", "/generate_batch", key=rig.key["bob"],
                  json={"requests": [{"prompt": "a"}, {"prompt": "b", "steps": "12"}]},
                  headers=[("x-request-deadline", "45")])
    assert answer.status_code == 200
    (seen,) = rig.inner.seen
    items = json.loads(seen.body)["requests"]
    assert [item["caller"] for item in items] == [{"name": "bob", "deadline_s": 45}] * 2
    assert [item["prompt"] for item in items] == ["a", "b"]
    assert dict(seen.headers)["content-length"] == str(len(seen.body))
    assert seen.state["admission"] == Admission(images=2, priority=5, deadline_s=45)
    forged = call(rig.gateway, "POST", "/generate_batch", key=rig.key["alice"],
                  json={"requests": [{"prompt": "a", "caller": {"name": "ops", "deadline_s": 600}}]})
    assert forged.status_code == 400 and "requests.0.caller: set by the server" in forged.json()["error"]["message"]
    over = call(rig.gateway, "POST", "/generate_batch", key=rig.key["alice"],
                json={"requests": [{"prompt": "a"}, {"prompt": "b", "steps": 50}]})
    assert over.status_code == 403 and over.json()["error"]["message"].startswith("requests[1]: steps 50")
    assert len(rig.inner.seen) == 1


# -- how much ----------------------------------------------------------------------------------------------
def test_a_job_slot_is_held_while_the_app_runs_and_freed_after(rig):
    alice = rig.key["alice"]  # free tier: one request at a time

    async def go():
        gate = rig.inner.gate = asyncio.Event()
        rig.inner.entered = asyncio.Event()
        async with client(rig.gateway) as c:
            first = asyncio.ensure_future(c.post("/generate", json={"prompt": "a"},
                                                 headers={"authorization": f"Bearer {alice}"}))
            await asyncio.wait_for(rig.inner.entered.wait(), 5)
            held = rig.slots.held("alice")
            second = await c.post("/generate", json={"prompt": "b"}, headers={"authorization": f"Bearer {alice}"})
            other = await c.post("/generate", json={"prompt": "c"},
                                 headers={"authorization": f"Bearer {rig.key['bob']}"})
            gate.set()
            return held, await first, second, other

    held, first, second, other = asyncio.run(go())
    assert held == 1 and first.status_code == 200 and other.status_code == 200
    assert second.status_code == 429 and second.headers["retry-after"] == "5" and error_type(second) == "rate_limited"
    assert rig.slots.held("alice") == 0
    assert call(rig.gateway, "POST", "/generate", key=alice, json={"prompt": "d"}).status_code == 200


def test_the_slot_is_freed_when_the_app_fails(rig):
    rig.inner.fail = True
    with pytest.raises(RuntimeError):
        call(rig.gateway, "POST", "/generate", key=rig.key["alice"], json={"prompt": "a"})
    assert rig.slots.held("alice") == 0
    assert rig.audit()[-1]["outcome"] == "error"


def test_token_buckets_answer_429_with_retry_after(rig):
    drip = rig.key["drip"]  # 2 requests of burst, 1 a minute
    first, second, third = (call(rig.gateway, "POST", "/generate", key=drip, json={"prompt": "x"}) for _ in range(3))
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.headers["x-ratelimit-limit"] == "2" and first.headers["x-ratelimit-remaining"] == "1"
    assert third.status_code == 429 and error_type(third) == "rate_limited"
    assert 55 <= int(third.headers["retry-after"]) <= 60 and third.headers["x-ratelimit-remaining"] == "0"
    assert len(rig.inner.seen) == 2 and rig.slots.held("drip") == 0
    retry = call(rig.gateway, "POST", "/jobs/retry?task_id=t1", key=rig.key["bob"])  # a retry is charged too
    assert retry.status_code == 200 and rig.inner.seen[-1].state["admission"].images == 2  # the task's cost


# -- replicas and shutdown -----------------------------------------------------------------------------
def test_a_signed_forward_names_the_caller_on_task_routes_only(rig):
    def forward(method, path, query, *, caller="alice", now=None, **kw):
        headers = rig.signer.forward_headers(caller, method, path, query, now=now)
        return headers, call(rig.gateway, method, f"{path}?{query}" if query else path,
                             headers=list(headers.items()), **kw)

    _, answer = forward("GET", "/jobs/status", "task_id=t1")
    assert answer.status_code == 200
    (seen,) = rig.inner.seen
    assert seen.state["principal"].name == "alice"
    assert not {name for name, _ in seen.headers} & set(INTERNAL_HEADERS)
    _, elsewhere = forward("POST", "/generate", "", json={"prompt": "x"})
    assert elsewhere.status_code == 401
    headers, _ = forward("GET", "/jobs/status", "task_id=t1")
    tampered = [("x-sdxl-caller", "ops"), *((k, v) for k, v in headers.items() if k != "x-sdxl-caller")]
    assert call(rig.gateway, "GET", "/jobs/status?task_id=t1", headers=tampered).status_code == 401
    other_task = list(headers.items())
    assert call(rig.gateway, "GET", "/jobs/status?task_id=t2", headers=other_task).status_code == 401
    _, stale = forward("GET", "/jobs/status", "task_id=t1", now=time.time() - 120)
    assert stale.status_code == 401
    _, gone = forward("GET", "/jobs/status", "task_id=t1", caller="mallory")  # no such key
    assert gone.status_code == 401
    assert len(rig.inner.seen) == 2


def test_draining_refuses_new_work_with_503(rig):
    rig.drain.draining = True
    for path in ("/generate", "/jobs/submit", "/jobs/retry?task_id=t1"):
        answer = call(rig.gateway, "POST", path, key=rig.key["bob"], json={"prompt": "x"})
        assert answer.status_code == 503 and error_type(answer) == "shutdown"
        assert answer.headers["retry-after"] == "30"
    assert rig.inner.seen == []
    assert call(rig.gateway, "GET", "/jobs/status?task_id=t1", key=rig.key["bob"]).status_code == 200


# -- what is written and answered -----------------------------------------------------------------------
def test_one_audit_line_per_request_by_route_template_and_without_uploads(rig):
    bob = rig.key["bob"]
    rig.inner.audit = {"outcome": "ok", "model": "sdxl-base:v1", "image_ids": ["i-1"], "cache": "miss"}
    done = call(rig.gateway, "POST", "/img2img", key=bob, json={"prompt": "a cat", "image": UPLOAD, "seed": 3},
                headers=[("x-request-id", "req-7")])
    assert done.headers["x-cache"] == "miss"
    rig.inner.audit = None
    call(rig.gateway, "GET", "/sdapi/v1/etc/passwd/whatever")  # 401
    call(rig.gateway, "GET", "/jobs/made-up-by-a-client")  # 401
    call(rig.gateway, "POST", "/generate", key=rig.key["alice"], json={"prompt": "p", "steps": 41})  # 403
    call(rig.gateway, "POST", "/generate/", key=bob, json={"prompt": "q"})
    call(rig.gateway, "GET", "/livez")  # not guarded: no line
    lines = rig.audit()
    assert [(line["endpoint"], line["status"], line["outcome"]) for line in lines] == [
        ("/img2img", 200, "ok"), ("/sdapi/v1/{path}", 401, "rejected"), ("other", 401, "rejected"),
        ("/generate", 403, "rejected"), ("/generate", 200, "ok")]
    first = lines[0]
    assert (first["key_name"], first["tier"], first["prompt"], first["request_id"]) == ("bob", "standard", "a cat",
                                                                                       "req-7")
    assert first["parameters"]["seed"] == 3 and "image" not in first["parameters"]
    assert first["model"] == "sdxl-base:v1" and first["image_ids"] == ["i-1"] and first["cache"] == "miss"
    assert "VVBMT0FE" not in rig.audit_path.read_text()
    assert lines[1]["key_name"] is None
    assert (lines[3]["key_name"], lines[3]["reason"], lines[3]["parameters"]) == ("alice", "forbidden", {})
    assert "steps 41" in lines[3]["message"]


def test_requests_that_change_something_are_audited_and_reads_only_when_refused(rig):
    bob = rig.key["bob"]
    call(rig.gateway, "GET", "/jobs/status?task_id=t1", key=bob)
    call(rig.gateway, "PUT", "/jobs/cancel?task_id=t1", key=bob)
    call(rig.gateway, "POST", "/sdapi/v1/interrupt", key=bob)
    call(rig.gateway, "GET", f"/images/{uuid.uuid4()}")  # an open read: a signed link, no key
    call(rig.gateway, "GET", "/jobs/status?task_id=t1", key="wrong")
    assert len(rig.inner.seen) == 4
    assert [(line["endpoint"], line["status"], line["key_name"]) for line in rig.audit()] == [
        ("/jobs/cancel", 200, "bob"), ("/sdapi/v1/{path}", 200, "bob"), ("/jobs/status", 401, None)]


def test_refusals_come_in_each_routes_api_shape(rig):
    native = call(rig.gateway, "POST", "/generate", json={"prompt": "x"})
    assert native.json()["error"]["type"] == "unauthorized"
    openai = call(rig.gateway, "POST", "/v1/images/generations", json={"prompt": "x"})
    assert openai.status_code == 401
    assert (openai.json()["error"]["type"], openai.json()["error"]["code"]) == ("invalid_request_error",
                                                                               "invalid_api_key")
    too_many = call(rig.gateway, "POST", "/v1/images/generations", key=rig.key["alice"],
                    json={"prompt": "x", "n": "3", "size": "512x512"})
    assert too_many.status_code == 403
    assert (too_many.json()["error"]["code"], too_many.json()["error"]["param"]) == ("forbidden", "n")
    sdapi = call(rig.gateway, "POST", "/sdapi/v1/txt2img", json={"prompt": "x"})
    assert sdapi.status_code == 401 and sdapi.json()["error"] == "HTTPException"
    assert sdapi.json()["errors"].startswith("401: ")
    bad = call(rig.gateway, "POST", "/sdapi/v1/txt2img", key=rig.key["bob"], json={"prompt": "x", "steps": "many"})
    assert bad.status_code == 400 and bad.json()["error"] == "HTTPException" and "steps" in bad.json()["detail"]
    mounted = call(rig.gateway, "GET", "/sdapi/v1/options")
    assert mounted.status_code == 401 and mounted.json()["error"] == "HTTPException"
    assert rig.inner.seen == []


# -- Idempotency-Key on a multipart form -----------------------------------------------------------------
def test_an_idempotent_form_is_the_same_request_whatever_its_boundary(rig, tmp_path):
    """A client retrying a multipart POST draws a new boundary: the key's fingerprint covers the form's fields
    (what the gateway parsed and policed), so the retry gets the first answer and a changed field is a 422."""
    from sdxl_bento.http.idempotency import REPLAYED, Idempotency, SqliteBackend

    form_route = routes.Route("/form", routes.single(GenerateRequest), form=True)
    table = routes.table({}, {}, batch=BatchRequest, foreign={"/form": form_route}, mounted={})
    gateway = Gateway(rig.inner, keys=rig.gateway.keys, limiter=RateLimiter(), slots=JobSlots(None),
                      audit=AuditLog(tmp_path / "form-audit.log"), routes=table, signer=rig.signer,
                      max_body_bytes=MAX_BODY, idempotency=Idempotency(SqliteBackend(tmp_path / "idem.db")))

    def post(prompt: str, boundary: str) -> httpx.Response:
        body = "".join(f"--{boundary}\r\ncontent-disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                       for name, value in (("prompt", prompt), ("steps", "20"))) + f"--{boundary}--\r\n"
        return call(gateway, "POST", "/form", key=rig.key["alice"], content=body.encode(),
                    headers=[("content-type", f"multipart/form-data; boundary={boundary}"),
                             ("idempotency-key", '"retry-1"')])

    first = post("a lighthouse", "aaaa1111")
    assert first.status_code == 200 and len(rig.inner.seen) == 1
    assert json.loads(rig.inner.seen[0].body) == {"prompt": "a lighthouse", "steps": "20"}
    again = post("a lighthouse", "bbbb2222")
    assert again.status_code == 200 and again.headers.get(REPLAYED) == "true" and len(rig.inner.seen) == 1
    changed = post("a harbour", "cccc3333")
    assert changed.status_code == 422 and len(rig.inner.seen) == 1
