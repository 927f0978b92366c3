"""Tasks in process: ``TaskControl`` around a stand-in for BentoML's task routes, answering from a real journal,
with a real registry and scheduler (a held fake engine); ``run_task`` with a real ``Generation``."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image
from starlette.responses import JSONResponse

from sdxl_bento.core.generation import Generation, ModelInfo
from sdxl_bento.core.images import ImageStore
from sdxl_bento.core.policy import DEFAULT_TIERS, OPEN_PRINCIPAL, Admission, Principal
from sdxl_bento.errors import Cancelled, NotFound, Unavailable
from sdxl_bento.gpu.scheduler import JobState, Scheduler
from sdxl_bento.http.auth import KeyStore
from sdxl_bento.http.journal import TaskJournal, TaskRecord
from sdxl_bento.http.tasks import TaskCancelled, TaskControl, TaskRegistry, run_task, status_body
from sdxl_bento.jobs import BatchKey, Work
from sdxl_bento.runtime import Front
from sdxl_bento.schemas import GenerateRequest

ALICE = Principal("alice", DEFAULT_TIERS["standard"], "a0")
BOB = Principal("bob", DEFAULT_TIERS["standard"], "b0")
OPS = Principal("ops", DEFAULT_TIERS["premium"], "o0", operator=True)
CALLERS = {"alice": ALICE, "bob": BOB, "ops": OPS, "open": OPEN_PRINCIPAL}
KEY = BatchKey(kind="txt2img", width=256, height=256, steps=4, guidance_scale=5.0, scheduler="euler")


class HeldEngine:
    """Makes a plain image per seed once ``gate`` is set, reporting each step."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.started = threading.Event()

    def generate(self, works, on_step=None, on_preview=None):  # previews: the real engine's (test_events)
        self.calls.append([w.prompt for w in works])
        self.started.set()
        total = works[0].key.total_steps()
        for step in range(1, total + 1):
            self.gate.wait(5)
            if on_step:
                on_step(step, total)
        return [[Image.new("RGB", (w.key.width, w.key.height), (seed % 256, 0, 0)) for seed in w.seeds]
                for w in works]


class BentoTasks:
    """Stands in for BentoML's task routes: ``submit`` and ``retry`` hand out a task id; every call is
    recorded; ``cancel`` answers 400, as the local server does."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    async def __call__(self, scope, receive, send) -> None:
        path = scope["path"]
        self.calls.append((scope["method"], path, scope["query_string"].decode()))
        if path.endswith(("/submit", "/retry")):
            answer = JSONResponse({"task_id": f"task-{len(self.calls)}", "status": "in_progress"})
        elif path.endswith("/cancel"):
            answer = JSONResponse([{"error": "cancel is not supported on a local server"}], status_code=400)
        else:
            answer = JSONResponse({"from": "bentoml"})
        await answer(scope, receive, send)


class AsCaller:
    """Stands in for the gateway: the caller named by ``x-caller`` (none without it) and an admission."""

    def __init__(self, app, admission: Admission | None = None) -> None:
        self.app = app
        self.admission = admission
        self.state: dict = {}

    async def __call__(self, scope, receive, send) -> None:
        name = dict(scope["headers"]).get(b"x-caller", b"").decode()
        self.state = scope.setdefault("state", {})
        self.state.update(principal=CALLERS.get(name), admission=self.admission)
        await self.app(scope, receive, send)


@pytest.fixture
def rig(tmp_path):
    engine = HeldEngine()
    scheduler = Scheduler(engine, max_jobs=16)
    scheduler.start()
    journal = TaskJournal(tmp_path / "state" / "tasks.db")
    registry = TaskRegistry(journal)
    registry.scheduler = scheduler
    bento = BentoTasks()
    control = TaskControl(bento, registry, journal, ("/jobs", "/img2img_jobs"))
    front = AsCaller(control, Admission(images=3, priority=5, deadline_s=300))
    yield SimpleNamespace(engine=engine, scheduler=scheduler, journal=journal, registry=registry, bento=bento,
                          control=control, front=front, tmp_path=tmp_path)
    engine.gate.set()
    scheduler.stop()
    journal.close()


def call(app, method: str, path: str, caller: str | None = None, **kw) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sdxl.test") as c:
            return await c.request(method, path, headers={"x-caller": caller} if caller else {}, **kw)

    return asyncio.run(go())


def submitted(rig, caller: str = "alice") -> str:
    answer = call(rig.front, "POST", "/jobs/submit", caller, json={"prompt": "x"})
    assert answer.status_code == 200
    return answer.json()["task_id"]


def queued_task(rig, caller: str = "alice"):
    """A task whose job waits behind a running one (the engine is held)."""
    (blocker,) = rig.scheduler.submit([Work(KEY, "blocker", "", [0])], timeout=30)
    assert rig.engine.started.wait(5)
    task_id = submitted(rig, caller)
    (job,) = rig.scheduler.submit([Work(KEY, "task", "", [1])], timeout=30)
    rig.registry.attach(task_id, [job])
    return task_id, job, blocker


# -- submit and status --------------------------------------------------------------------------------
def test_submit_records_the_task_with_its_owner_and_cost(rig):
    task_id = submitted(rig)
    record = rig.journal.get(task_id)
    assert (record.status, record.owner, record.cost_images) == ("in_progress", "alice", 3)
    assert len(rig.registry) == 1 and rig.front.state["audit"]["task_id"] == task_id
    rig.front.admission = None
    anonymous = submitted(rig, "open")
    assert (rig.journal.get(anonymous).owner, rig.journal.get(anonymous).cost_images) == (None, 1)
    assert [c[:2] for c in rig.bento.calls] == [("POST", "/jobs/submit")] * 2


def test_an_unanswered_submit_records_nothing(rig):
    async def refuse(scope, receive, send):
        await JSONResponse({"error": "bad"}, status_code=400)(scope, receive, send)

    rig.control.app = refuse
    answer = call(rig.front, "POST", "/jobs/submit", "alice", json={"prompt": "x"})
    assert answer.status_code == 400 and rig.journal.count() == 0 and len(rig.registry) == 0


def test_status_in_progress_has_queue_position_step_and_eta(rig):
    rig.scheduler.seed_rate(1e-7)
    task_id, job, blocker = queued_task(rig)
    running_task = submitted(rig)
    rig.registry.attach(running_task, [blocker])
    waiting = call(rig.front, "GET", f"/jobs/status?task_id={task_id}", "alice").json()
    assert waiting["status"] == "in_progress" and waiting["completed_at"] is None
    assert (waiting["state"], waiting["queue_position"], waiting["step"], waiting["total_steps"]) == ("queued", 0, 0, 4)
    assert waiting["eta_s"] > 0
    running = call(rig.front, "GET", f"/jobs/status?task_id={running_task}", "alice").json()
    assert running["state"] == "running" and "queue_position" not in running and running["eta_s"] >= 0
    fresh = submitted(rig)  # no job yet
    assert call(rig.front, "GET", f"/jobs/status?task_id={fresh}", "alice").json()["state"] == "queued"
    assert all(method != "GET" for method, _, _ in rig.bento.calls)  # answered from the journal


def test_status_and_get_of_ended_tasks_come_from_the_journal(rig):
    ids = [submitted(rig) for _ in range(5)]
    done, failed, cancelled, lost, shut = ids
    result = {"images": [{"id": "i-1"}], "model": "m"}
    rig.registry.ended(done, "completed", result=result, http_status=200)
    error = {"error": {"type": "forbidden", "message": "steps 50 is above"}}
    rig.registry.ended(failed, "failed", "forbidden", error=error, http_status=403)
    rig.registry.ended(cancelled, "canceled", "cancelled")
    rig.journal.finished(shut, "failed", "shutdown")
    rig.journal.recover()  # the process restarted: `lost` was unfinished
    status = {task_id: call(rig.front, "GET", f"/jobs/status?task_id={task_id}", "alice").json() for task_id in ids}
    assert status[done]["status"] == "completed" and status[done]["completed_at"] is not None
    assert (status[failed]["status"], status[failed]["reason"]) == ("failed", "forbidden")
    assert (status[cancelled]["status"], status[cancelled]["reason"]) == ("canceled", "cancelled")
    assert (status[lost]["status"], status[lost]["reason"]) == ("failed", "restart")
    assert "restarted" in status[lost]["message"] and "shut down" in status[shut]["message"]

    def get(task_id):
        return call(rig.front, "GET", f"/jobs/get?task_id={task_id}", "alice")

    assert (get(done).status_code, get(done).json()) == (200, result)
    assert (get(failed).status_code, get(failed).json()) == (403, error)
    assert (get(cancelled).status_code, get(cancelled).json()["error"]["type"]) == (409, "cancelled")
    assert (get(lost).status_code, get(lost).json()["error"]["type"]) == (410, "restart")
    assert (get(shut).status_code, get(shut).json()["error"]["type"]) == (410, "shutdown")
    still = submitted(rig)
    assert (get(still).status_code, get(still).json()["error"]["type"]) == (400, "not_completed")
    assert all(method == "POST" for method, _, _ in rig.bento.calls)


def test_status_body_of_a_lost_task():
    body = status_body(TaskRecord("t", "failed", "restart", "alice", 0.0, 60.0))
    assert body == {"task_id": "t", "status": "failed", "created_at": "1970-01-01T00:00:00+00:00",
                    "executed_at": "1970-01-01T00:00:00+00:00", "completed_at": "1970-01-01T00:01:00+00:00",
                    "reason": "restart", "message": "task t did not finish: the service restarted first; submit it "
                                                    "again"}


# -- ownership ----------------------------------------------------------------------------------------------
def test_another_keys_task_is_not_found_on_every_route(rig):
    task_id = submitted(rig, "alice")
    routes = [("GET", "status"), ("GET", "get"), ("PUT", "cancel"), ("POST", "retry")]
    for method, action in routes:
        for caller in ("bob", None):
            answer = call(rig.front, method, f"/jobs/{action}?task_id={task_id}", caller)
            assert answer.status_code == 404 and answer.json()["error"]["type"] == "not_found", (action, caller)
        assert call(rig.front, method, f"/jobs/{action}?task_id=never-issued", "alice").status_code == 404
    assert len(rig.bento.calls) == 1  # only the submit reached BentoML
    for caller in ("alice", "ops", "open"):  # its owner, an operator, the open service
        assert call(rig.front, "GET", f"/jobs/status?task_id={task_id}", caller).status_code == 200


# -- cancel and retry -------------------------------------------------------------------------------------
def test_cancel_stops_the_job_and_is_recorded_at_once(rig):
    task_id, job, blocker = queued_task(rig)
    answer = call(rig.front, "PUT", f"/jobs/cancel?task_id={task_id}", "alice")
    assert (answer.status_code, answer.json()) == (200, {"task_id": task_id, "status": "canceled"})
    assert job.state == JobState.cancelled
    record = rig.journal.get(task_id)
    assert (record.status, record.reason) == ("canceled", "cancelled")
    assert ("PUT", "/jobs/cancel", f"task_id={task_id}") in rig.bento.calls  # BentoML marks its row too
    again = call(rig.front, "PUT", f"/jobs/cancel?task_id={task_id}", "alice")
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict"
    rig.engine.gate.set()
    blocker.future.result(5)
    assert rig.engine.calls == [["blocker"]]  # the cancelled job never ran


def test_cancel_of_a_running_task_ends_its_job_cancelled(rig):
    running, mate = rig.scheduler.submit([Work(KEY, "running", "", [0]), Work(KEY, "mate", "", [1])], timeout=30)
    assert rig.engine.started.wait(5)  # one batch: the mate keeps it going, so the engine runs to its end
    task_id = submitted(rig, "bob")
    rig.registry.attach(task_id, [running])
    assert call(rig.front, "PUT", f"/jobs/cancel?task_id={task_id}", "ops").status_code == 200  # an operator may
    assert running.cancel_requested and rig.journal.get(task_id).status == "canceled"
    rig.engine.gate.set()
    with pytest.raises(Cancelled):
        running.future.result(5)
    assert running.state == JobState.cancelled and mate.future.result(5)


def test_cancel_of_a_task_that_runs_elsewhere_or_ended_meanwhile(rig):
    rig.journal.accepted("elsewhere", "alice")
    answer = call(rig.front, "PUT", "/jobs/cancel?task_id=elsewhere", "alice")
    assert answer.status_code == 404 and "not running in this worker" in answer.json()["error"]["message"]
    finishing = submitted(rig)
    (job,) = rig.scheduler.submit([Work(KEY, "quick", "", [0])], timeout=30)
    rig.engine.gate.set()
    job.future.result(5)
    rig.registry.attach(finishing, [job])  # its work is done; its answer is being stored
    assert call(rig.front, "PUT", f"/jobs/cancel?task_id={finishing}", "alice").status_code == 409
    assert rig.journal.get(finishing).status == "in_progress"


def test_retry_of_a_task_from_before_the_start_is_gone(rig):
    rig.journal.accepted("old", "alice", now=rig.control.started - 60)
    answer = call(rig.front, "POST", "/jobs/retry?task_id=old", "alice")
    assert answer.status_code == 410 and answer.json()["error"]["reason"] == "restart"
    task_id = submitted(rig)
    retried = call(rig.front, "POST", f"/jobs/retry?task_id={task_id}", "alice")
    assert retried.status_code == 200
    new = retried.json()["task_id"]
    assert new != task_id and rig.journal.get(new).owner == "alice" and rig.journal.get(new).cost_images == 3
    assert rig.bento.calls[-1] == ("POST", "/jobs/retry", f"task_id={task_id}")


def test_other_routes_pass_through(rig):
    assert call(rig.front, "GET", "/jobs/status", "alice").json() == {"from": "bentoml"}  # no task_id: BentoML's
    assert call(rig.front, "GET", "/other/status?task_id=x", "alice").json() == {"from": "bentoml"}
    assert rig.journal.count() == 0


# -- run_task -------------------------------------------------------------------------------------------------
@pytest.fixture
def runner(rig, tmp_path):
    images = ImageStore(tmp_path / "images")
    keys = KeyStore({}, [(b"a" * 32, ALICE), (b"b" * 32, BOB)])
    front = Front(settings=None, routes=None, keys=keys, signer=None, images=images, journal=rig.journal,
                  tasks=rig.registry, drain=None)
    generation = Generation(rig.scheduler, images, ModelInfo("sdxl-base:v1", None, False), timeout=10)

    def start(req: GenerateRequest, task_id: str, deadline: str | None = None):
        ctx = SimpleNamespace(request=SimpleNamespace(state=SimpleNamespace(task_id=task_id),
                                                      headers={"x-request-deadline": deadline} if deadline else {}))
        return run_task(ctx, req, front=front, generation=generation)

    return SimpleNamespace(start=start, images=images, generation=generation)


def test_run_task_records_completed_with_the_answer(rig, runner):
    rig.engine.gate.set()
    rig.journal.accepted("t1", "bob", cost_images=2)
    rig.registry.submitted("t1")
    answer = asyncio.run(runner.start(GenerateRequest(prompt="x", seed=5, num_images=2, steps=4, width=256,
                                                      height=256), "t1"))
    record = rig.journal.get("t1")
    assert (record.status, record.reason, record.http_status) == ("completed", None, 200)
    assert json.loads(record.result) == answer.model_dump(mode="json")
    assert [i.seed for i in answer.images] == [5, 6]
    assert all(runner.images.info(i.id).owner == "bob" for i in answer.images)  # it ran as its owner
    assert len(rig.registry) == 0


def test_run_task_records_a_service_error_as_failed(rig, runner):
    rig.journal.accepted("t2", "alice")
    with pytest.raises(Unavailable):
        asyncio.run(runner.start(GenerateRequest(prompt="x", refine="ensemble", steps=4), "t2"))
    record = rig.journal.get("t2")
    assert (record.status, record.reason, record.http_status) == ("failed", "unavailable", 422)
    assert json.loads(record.error)["error"]["type"] == "unavailable"
    rig.journal.accepted("t3", "mallory")  # a key removed from the keys file since
    with pytest.raises(Exception, match="no longer in the keys file"):
        asyncio.run(runner.start(GenerateRequest(prompt="x"), "t3"))
    assert (rig.journal.get("t3").status, rig.journal.get("t3").http_status) == ("failed", 401)
    with pytest.raises(NotFound):
        asyncio.run(runner.start(GenerateRequest(prompt="x"), "never-accepted"))


def test_run_task_records_an_unexpected_error_as_failed(rig, runner):
    rig.engine.gate.set()
    rig.journal.accepted("t4", "alice")
    (runner.images.root).rename(rig.tmp_path / "images-gone")  # the image store's disk went away
    with pytest.raises(OSError):
        asyncio.run(runner.start(GenerateRequest(prompt="x", seed=1, steps=4, width=256, height=256), "t4"))
    record = rig.journal.get("t4")
    assert (record.status, record.reason, record.http_status) == ("failed", "error", 500)
    assert json.loads(record.error)["error"]["message"].startswith("the task failed: ")


def test_run_task_cancelled_before_its_job_existed(rig, runner):
    (blocker,) = rig.scheduler.submit([Work(KEY, "blocker", "", [0])], timeout=30)
    assert rig.engine.started.wait(5)
    rig.journal.accepted("t6", "alice")
    rig.registry.submitted("t6")
    assert rig.registry.cancel("t6") == "cancelled"  # answered at once
    assert rig.journal.get("t6").status == "canceled"
    with pytest.raises(TaskCancelled):  # its job is cancelled as it is attached
        asyncio.run(runner.start(GenerateRequest(prompt="x", seed=1, steps=4, width=256, height=256), "t6"))
    assert not issubclass(TaskCancelled, Exception)  # it passes BentoML's runner, which would store a result
    record = rig.journal.get("t6")
    assert (record.status, record.reason) == ("canceled", "cancelled") and len(rig.registry) == 0
    rig.engine.gate.set()
    blocker.future.result(5)
    assert rig.engine.calls == [["blocker"]]


def test_run_task_cancelled_while_its_job_waits(rig, runner):
    (blocker,) = rig.scheduler.submit([Work(KEY, "blocker", "", [0])], timeout=30)
    assert rig.engine.started.wait(5)
    rig.journal.accepted("t7", "alice")

    async def cancelled_while_waiting():
        task = asyncio.ensure_future(runner.start(GenerateRequest(prompt="x", seed=2, steps=4, width=256,
                                                                  height=256), "t7"))
        deadline = time.monotonic() + 5
        while rig.scheduler.depth()[0] == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert rig.registry.cancel("t7") == "cancelled"
        return await asyncio.gather(task, return_exceptions=True)

    (outcome,) = asyncio.run(cancelled_while_waiting())
    assert isinstance(outcome, TaskCancelled)
    record = rig.journal.get("t7")
    assert (record.status, record.reason) == ("canceled", "cancelled") and len(rig.registry) == 0
    rig.engine.gate.set()
    blocker.future.result(5)
    assert rig.engine.calls == [["blocker"]]
