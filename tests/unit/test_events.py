"""Task events: numbered and kept (a reconnect with Last-Event-ID loses nothing), one terminal event taken from the
journal's record (also for a task lost to a restart), and the scheduler's notifications turned into events."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from sdxl_bento.gpu.scheduler import Scheduler
from sdxl_bento.http.events import EventLog, Progress
from sdxl_bento.http.journal import TaskJournal
from sdxl_bento.jobs import BatchKey, Work

KEY = BatchKey(kind="txt2img", width=256, height=256, steps=4, guidance_scale=5.0, scheduler="euler")


def collect(log: EventLog, task_id: str, after: int, journal: TaskJournal) -> list:
    async def run():
        return [event async for event in log.stream(task_id, after, journal, poll_s=0.01, reread_s=0.05)]

    return asyncio.run(asyncio.wait_for(run(), 10))


def test_events_are_numbered_per_task_and_nothing_follows_the_terminal_one(tmp_path):
    log = EventLog(tmp_path / "events.db")
    assert [log.append("a", "running", {"step": i}) for i in (1, 2)] == [1, 2]
    assert log.append("b", "queued", {}) == 1
    assert log.append("a", "completed", {"result": {}}) == 3
    assert log.append("a", "running", {"step": 3}) is None and log.append("a", "failed", {}) is None
    assert [e.seq for e in log.since("a", 1)] == [2, 3] and log.terminal_seq("a") == 3
    again = EventLog(tmp_path / "events.db")  # another worker, or after a restart
    assert [e.event for e in again.since("a")] == ["running", "running", "completed"]


def test_a_stream_resumes_after_last_event_id_and_ends_with_the_terminal_event(tmp_path):
    journal = TaskJournal(tmp_path / "tasks.db")
    journal.accepted("t", "alice")
    log = EventLog(tmp_path / "events.db")
    for step in (1, 2, 3):
        log.append("t", "running", {"step": step})

    def finish():
        time.sleep(0.2)
        log.publish("t", "running", {"step": 4})
        log.publish("t", "completed", {"status": "completed"})

    threading.Thread(target=finish).start()
    events = collect(log, "t", 2, journal)
    assert [(e.seq, e.event) for e in events] == [(3, "running"), (4, "running"), (5, "completed")]
    assert collect(log, "t", 5, journal) == []  # the client had seen the end


def test_a_task_lost_to_a_restart_ends_its_stream_with_the_journals_reason(tmp_path):
    journal = TaskJournal(tmp_path / "tasks.db")
    journal.accepted("t", None)
    log = EventLog(tmp_path / "events.db")
    log.append("t", "running", {"step": 1})
    assert TaskJournal(tmp_path / "tasks.db").recover() == 1  # the next process
    (event,) = collect(log, "t", 1, journal)
    assert event.event == "failed" and json.loads(event.data)["reason"] == "restart"


def test_the_journals_listener_sees_each_end_once(tmp_path):
    journal = TaskJournal(tmp_path / "tasks.db")
    seen = []
    journal.listeners.append(lambda record: seen.append((record.task_id, record.status, record.reason)))
    journal.accepted("t", None)
    journal.finished("t", "canceled", "cancelled")
    journal.finished("t", "completed", result="{}")  # the work's late end does not override
    journal.accepted("u", None)
    journal.recover()
    assert seen == [("t", "canceled", "cancelled"), ("u", "failed", "restart")]


class SteppingEngine:
    """Four steps, a preview after the second (what the real engine does every ``preview_every`` steps)."""

    def generate(self, works, on_step=None, on_preview=None):
        for step in range(1, 5):
            time.sleep(0.02)
            on_step(step, 4)
            if step == 2 and on_preview is not None:
                on_preview(2, 4, [b"jpeg-%d" % i for w in works for i in w.seeds])
        return [[f"img{s}" for s in w.seeds] for w in works]


def test_scheduler_notifications_become_queued_running_and_preview_events(tmp_path):
    log = EventLog(tmp_path / "events.db")
    scheduler = Scheduler(SteppingEngine())
    progress = Progress(log, scheduler=lambda: scheduler)
    (job,) = scheduler.submit([Work(key=KEY, prompt="p", negative_prompt="", seeds=[7, 8])], timeout=30)
    progress.watch("t", [job])
    scheduler.start()
    job.future.result(10)
    log.flush()
    scheduler.stop()
    events = log.since("t")
    names = [e.event for e in events]
    assert names[0] == "queued" and json.loads(events[0].data)["queue_position"] == 0
    assert "preview" in names and names.count("running") >= 2
    preview = json.loads(events[names.index("preview")].data)
    assert preview["step"] == 2 and len(preview["images"]) == 2 and preview["media_type"] == "image/jpeg"
    last = json.loads([e for e in events if e.event == "running"][-1].data)
    assert (last["step"], last["total_steps"]) == (4, 4)
