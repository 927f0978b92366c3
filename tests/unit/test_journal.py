import json
import sqlite3
from pathlib import Path

from sdxl_bento.http.journal import TaskJournal, TaskRecord

OLD_SCHEMA = ("CREATE TABLE IF NOT EXISTS tasks (task_id TEXT PRIMARY KEY, status TEXT NOT NULL, reason TEXT, "
              "owner TEXT, created REAL NOT NULL, updated REAL NOT NULL)")
"""The table as the code before ``cost_images``/``result``/``error``/``http_status`` created it."""


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def test_accepted_finished_get(tmp_path):
    journal = TaskJournal(tmp_path / "state" / "journal.db")
    journal.accepted("t1", "alice", cost_images=4, now=100.0)
    journal.accepted("t1", "mallory", cost_images=1, now=101.0)  # a repeat changes nothing
    assert journal.get("t1") == TaskRecord("t1", "in_progress", None, "alice", 100.0, 100.0, cost_images=4)
    result = json.dumps({"images": [{"id": "x"}]})
    assert journal.finished("t1", "completed", result=result, http_status=200, now=150.0)
    assert journal.get("t1") == TaskRecord("t1", "completed", None, "alice", 100.0, 150.0, 4, result, None, 200)
    journal.accepted("t2", None)
    error = json.dumps({"error": {"type": "invalid_request", "message": "no"}})
    journal.finished("t2", "failed", "invalid", error=error, http_status=400)
    record = journal.get("t2")
    assert (record.status, record.reason, record.owner, record.cost_images, record.result, record.error,
            record.http_status) == ("failed", "invalid", None, 1, None, error, 400)
    assert not journal.finished("unknown", "failed")
    assert not journal.finished("t1", "canceled", "cancelled")  # the first end recorded stays
    assert journal.get("t1").status == "completed"
    assert journal.get("unknown") is None
    assert (journal.count(), journal.count("completed"), journal.count("in_progress")) == (2, 1, 0)
    journal.close()
    assert TaskJournal(tmp_path / "state" / "journal.db").get("t1").result == result  # durable


def test_recover_fails_only_unfinished_tasks(tmp_path):
    journal = TaskJournal(tmp_path / "j.db")
    journal.accepted("running", "a")
    journal.accepted("done", "a")
    journal.finished("done", "completed", result="{}", http_status=200)
    journal.close()
    journal = TaskJournal(tmp_path / "j.db")
    assert journal.recover(now=500.0) == 1
    assert journal.get("running").status == "failed" and journal.get("running").reason == "restart"
    assert journal.get("running").updated == 500.0
    assert journal.get("done").status == "completed"
    assert journal.recover() == 0


def test_prune_deletes_old_ended_tasks_never_running_ones(tmp_path):
    journal = TaskJournal(tmp_path / "j.db")
    for task_id, status, updated in [("old-done", "completed", 100.0), ("old-failed", "failed", 100.0),
                                     ("old-canceled", "canceled", 100.0), ("new-done", "completed", 900.0),
                                     ("old-running", None, 100.0)]:
        journal.accepted(task_id, "a", now=50.0)
        if status:
            journal.finished(task_id, status, now=updated)
    assert journal.prune(500.0, now=1000.0) == 3
    assert sorted(t for t in ("old-done", "old-failed", "old-canceled", "new-done", "old-running")
                  if journal.get(t)) == ["new-done", "old-running"]
    assert journal.prune(500.0, now=1000.0) == 0
    assert journal.prune(0.0, now=10**12) == 1 and journal.count() == 1  # in_progress stays, however old


def test_migration_from_the_old_schema(tmp_path):
    path = tmp_path / "journal.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(OLD_SCHEMA)
    db.execute("INSERT OR IGNORE INTO tasks VALUES ('old', 'completed', NULL, 'alice', 1.0, 2.0)")
    db.execute("INSERT OR IGNORE INTO tasks VALUES ('lost', 'in_progress', NULL, NULL, 1.0, 2.0)")
    db.close()

    journal = TaskJournal(path)
    assert journal.get("old") == TaskRecord("old", "completed", None, "alice", 1.0, 2.0)
    assert journal.recover() == 1
    journal.accepted("new", "bob", cost_images=2)
    journal.finished("new", "completed", result='{"ok": true}', http_status=200)
    assert journal.get("new").result == '{"ok": true}' and journal.get("new").cost_images == 2
    journal.close()
    again = TaskJournal(path)  # opening a migrated file adds nothing twice
    columns = [row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(tasks)")]
    assert columns == ["task_id", "status", "reason", "owner", "created", "updated",
                       "cost_images", "result", "error", "http_status"]
    assert again.count() == 3
    again.vacuum()  # converts the old file to incremental auto_vacuum, once
    assert sqlite3.connect(path).execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    assert again.get("new").http_status == 200


def test_the_file_shrinks_back_after_prune_and_vacuum(tmp_path):
    path = tmp_path / "journal.db"
    journal = TaskJournal(path)
    empty = _disk(path)
    result = json.dumps({"images": ["x" * 2000]})
    for i in range(5000):
        journal.accepted(f"t{i}", "alice", now=1.0)
        journal.finished(f"t{i}", "completed", result=result, http_status=200, now=2.0)
    full = _disk(path)
    assert full > 10 * 2**20
    assert journal.prune(60, now=1000.0) == 5000
    journal.vacuum()
    assert _disk(path) < max(2 * empty, 64 * 1024), (empty, full, _disk(path))
    journal.accepted("after", "bob")  # still usable
    assert journal.count() == 1
