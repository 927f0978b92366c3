import logging
import os
import threading
import time

import pytest

from sdxl_bento.core.images import ImageStore, SweepStats
from sdxl_bento.errors import NotFound
from sdxl_bento.http.journal import TaskJournal
from sdxl_bento.http.retention import RetentionSweeper

NOW = 1_000_000_000.0
DAY = 86_400.0


@pytest.fixture
def parts(tmp_path):
    journal = TaskJournal(tmp_path / "state" / "journal.db")
    yield ImageStore(tmp_path / "images"), journal
    journal.close()


def _image(store: ImageStore, size: int, made: float) -> str:
    image_id = store.save(bytes(size), "png", owner="alice")
    os.utime(store.find(image_id)[0], (made, made))
    return image_id


def _task(journal: TaskJournal, task_id: str, status: str | None, updated: float) -> None:
    journal.accepted(task_id, "alice", now=updated)
    if status:
        journal.finished(task_id, status, result="{}", http_status=200, now=updated)


def _exists(store: ImageStore, image_id: str) -> bool:
    try:
        store.find(image_id)
        return True
    except NotFound:
        return False


def test_sweep_once_applies_the_age_bounds(parts, caplog):
    images, journal = parts
    old, young = _image(images, 10, NOW - 8 * DAY), _image(images, 10, NOW - DAY)
    _task(journal, "old", "completed", NOW - 8 * DAY)
    _task(journal, "young", "failed", NOW - DAY)
    _task(journal, "running", None, NOW - 30 * DAY)
    seen = []
    sweeper = RetentionSweeper(images, journal, image_max_age_s=7 * DAY, image_max_bytes=2**30,
                               task_max_age_s=7 * DAY, interval_s=300, on_sweep=lambda s, n: seen.append((s, n)))
    with caplog.at_level(logging.INFO, logger="sdxl_bento.http.retention"):
        stats, pruned = sweeper.sweep_once(now=NOW)
    assert stats == SweepStats(expired=1, freed_bytes=10, remaining=1, remaining_bytes=10) and pruned == 1
    assert seen == [(stats, 1)]
    assert not _exists(images, old) and _exists(images, young)
    assert journal.get("old") is None and journal.get("young") and journal.get("running")
    assert "deleted 1 images" in caplog.text and "pruned 1 ended tasks" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdxl_bento.http.retention"):
        assert sweeper.sweep_once(now=NOW) == (SweepStats(remaining=1, remaining_bytes=10), 0)
    assert caplog.text == ""  # nothing removed, nothing logged


def test_sweep_once_applies_the_byte_bound_oldest_first(parts):
    images, journal = parts
    ids = [_image(images, 1000, NOW - 3600 + 60 * i) for i in range(5)]
    sweeper = RetentionSweeper(images, journal, image_max_age_s=7 * DAY, image_max_bytes=2500,
                               task_max_age_s=7 * DAY, interval_s=300)
    stats, _ = sweeper.sweep_once(now=NOW)
    assert (stats.evicted, stats.expired, stats.remaining, stats.remaining_bytes) == (3, 0, 2, 2000)
    assert [_exists(images, i) for i in ids] == [False, False, False, True, True]


def test_a_failing_part_neither_raises_nor_skips_the_other(parts, caplog):
    images, journal = parts
    _image(images, 10, NOW - 8 * DAY)
    _task(journal, "old", "completed", NOW - 8 * DAY)

    def broken(**_):
        raise OSError("the NFS volume is gone")

    images.sweep = broken
    sweeper = RetentionSweeper(images, journal, image_max_age_s=7 * DAY, image_max_bytes=2**30,
                               task_max_age_s=7 * DAY, interval_s=300, on_sweep=lambda s, n: 1 / 0)
    assert sweeper.sweep_once(now=NOW) == (None, 1)
    assert "NFS volume is gone" in caplog.text
    del images.sweep
    journal.close()  # now the journal fails, and on_sweep raises
    stats, pruned = sweeper.sweep_once(now=NOW)
    assert stats.expired == 1 and pruned == 0
    assert "pruning or vacuuming the task journal failed" in caplog.text and "on_sweep failed" in caplog.text


def test_the_thread_sweeps_every_interval_and_stops(parts):
    images, journal = parts
    old = _image(images, 10, time.time() - 8 * DAY)
    swept = threading.Semaphore(0)
    sweeper = RetentionSweeper(images, journal, image_max_age_s=7 * DAY, image_max_bytes=2**30,
                               task_max_age_s=7 * DAY, interval_s=0.01, on_sweep=lambda s, n: swept.release())
    sweeper.start()
    sweeper.start()  # a second start does nothing
    try:
        assert all(swept.acquire(timeout=5) for _ in range(3))
    finally:
        sweeper.stop()
    assert not _exists(images, old)
    assert not any(t.name == "retention-sweeper" for t in threading.enumerate())


def test_bentoml_task_rows_go_once_their_task_ended_past_the_retention(tmp_path):
    """BentoML's own table, created by BentoML's own code, with rows as its runner writes them."""
    import asyncio
    import datetime
    import sqlite3

    from _bentoml_impl.tasks.result import Sqlite3Store

    from sdxl_bento.http.retention import prune_runner_tasks

    db = tmp_path / "task_result.db"
    Sqlite3Store.init_db(str(db))
    utc = datetime.timezone.utc
    now = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=utc)
    with sqlite3.connect(str(db)) as conn:
        rows = [("old-done", "completed", now - datetime.timedelta(hours=3), now - datetime.timedelta(hours=2)),
                ("new-done", "completed", now - datetime.timedelta(minutes=3), now - datetime.timedelta(minutes=2)),
                ("old-cancelled", "canceled", now - datetime.timedelta(hours=3), None),
                ("old-running", "in_progress", now - datetime.timedelta(hours=3), None)]
        for task_id, status, created, completed in rows:
            conn.execute("INSERT INTO result (task_id, name, input, status, created_at, completed_at) "
                         "VALUES (?, 'jobs', x'00', ?, ?, ?)",
                         (task_id, status, created.strftime("%Y-%m-%d %H:%M:%S"), completed))
    assert prune_runner_tasks(db, 3600, now=now.timestamp()) == 2
    with sqlite3.connect(str(db)) as conn:
        left = sorted(row[0] for row in conn.execute("SELECT task_id FROM result"))
    assert left == ["new-done", "old-running"]
    assert asyncio.run(_status_of(Sqlite3Store, db, "new-done")) == "completed"  # BentoML still reads it


async def _status_of(store_cls, db, task_id):
    async with store_cls(str(db)) as store:
        return (await store.get_status(task_id)).status.value
