"""A durable record of every accepted task, so none is silently lost.

BentoML keeps task state in ``$BENTOML_HOME/task_result.db`` and re-creates that file at every
start, and it runs tasks inside the worker process: a restart loses tasks in flight without a
trace. The journal is a SQLite file outside BentoML's reach (``SDXL_BENTO_STATE_DIR``). At
startup, tasks it holds as unfinished are marked failed with reason ``restart``, and the status
route answers from it for ids BentoML no longer knows.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

UNFINISHED = ("in_progress",)


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    status: str
    """BentoML's vocabulary: in_progress, completed, failed, canceled."""
    reason: str | None
    owner: str | None
    created: float
    updated: float


class TaskJournal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS tasks (task_id TEXT PRIMARY KEY, status TEXT NOT NULL, reason TEXT, "
            "owner TEXT, created REAL NOT NULL, updated REAL NOT NULL)")

    def recover(self) -> int:
        """Mark tasks left unfinished by an earlier process as failed (reason ``restart``); returns how many."""
        with self._lock:
            cur = self._db.execute(
                f"UPDATE tasks SET status='failed', reason='restart', updated=? "
                f"WHERE status IN ({','.join('?' * len(UNFINISHED))})", (time.time(), *UNFINISHED))
            return cur.rowcount

    def accepted(self, task_id: str, owner: str | None) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO tasks VALUES (?, 'in_progress', NULL, ?, ?, ?)",
                             (task_id, owner, now, now))

    def finished(self, task_id: str, status: str, reason: str | None = None) -> None:
        with self._lock:
            self._db.execute("UPDATE tasks SET status=?, reason=?, updated=? WHERE task_id=?",
                             (status, reason, time.time(), task_id))

    def get(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        return TaskRecord(*row) if row else None

    def prune(self, older_than_s: float) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM tasks WHERE updated < ? AND status NOT IN ('in_progress')",
                                    (time.time() - older_than_s,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
