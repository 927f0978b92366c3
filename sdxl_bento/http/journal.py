"""A durable record of every accepted task, so none is silently lost.

BentoML keeps task state in ``$BENTOML_HOME/task_result.db`` and re-creates that file at every
start, and it runs tasks inside the worker process: a restart loses tasks in flight without a
trace. The journal is a SQLite file outside BentoML's reach (``SDXL_BENTO_STATE_DIR``). At
startup, tasks it holds as unfinished are marked failed with reason ``restart``, and the status
route answers from it for ids BentoML no longer knows.

It keeps what a task needs for its whole life (owner, cost, the answer or error body and the
status ``get`` answers), so it can answer alone. Columns are only ever added, each nullable, by
``ALTER TABLE`` on files made by older code; rows are read by column name, so this code keeps
reading files that later code extends. Ended tasks are pruned by age, and the file is given back to the disk
(``auto_vacuum=INCREMENTAL``), so it does not grow without bound.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from .statedb import open_shared

logger = logging.getLogger(__name__)

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
    cost_images: int | None = None
    """How many images the task's request asks for (None for tasks recorded by older code)."""
    result: str | None = None
    """The answer's JSON text, once completed."""
    error: str | None = None
    """The error body's JSON text, once failed."""
    http_status: int | None = None
    """The status ``get`` answers for this task."""


_COLUMNS = tuple(f.name for f in fields(TaskRecord))
_ADDED = {"cost_images": "INTEGER", "result": "TEXT", "error": "TEXT", "http_status": "INTEGER"}
"""Columns added after the first schema, with their types; new ones go here (nullable, no default)."""


class TaskJournal:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = open_shared(path, "auto_vacuum=INCREMENTAL", f"journal_size_limit={4 * 2**20}")
        self._migrate()
        self.listeners: list[Callable[[TaskRecord], None]] = []
        """Called with the record of each end this process records (``finished``, ``recover``): the task's
        terminal event and webhook come from here, so what is announced is what the journal holds."""

    def _ended(self, task_ids: list[str]) -> None:
        if not self.listeners:
            return
        for task_id in task_ids:
            record = self.get(task_id)
            if record is None:
                continue
            for listener in list(self.listeners):
                try:
                    listener(record)
                except Exception:
                    logger.exception("journal listener failed for task %s", task_id)

    def _migrate(self) -> None:
        """Create the table, or add the columns an older file lacks; in one write transaction, so
        processes opening the file together do not both add a column."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS tasks (task_id TEXT PRIMARY KEY, status TEXT NOT NULL, reason TEXT, "
                "owner TEXT, created REAL NOT NULL, updated REAL NOT NULL)")
            have = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)")}
            for name, kind in _ADDED.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {kind}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def recover(self, *, now: float | None = None) -> int:
        """Mark tasks left unfinished by an earlier process as failed (reason ``restart``); returns how many."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                lost = [row[0] for row in self._db.execute(
                    f"SELECT task_id FROM tasks WHERE status IN ({','.join('?' * len(UNFINISHED))})", UNFINISHED)]
                self._db.execute(
                    f"UPDATE tasks SET status='failed', reason='restart', updated=? "
                    f"WHERE status IN ({','.join('?' * len(UNFINISHED))})", (_now(now), *UNFINISHED))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self._ended(lost)
        return len(lost)

    def accepted(self, task_id: str, owner: str | None, cost_images: int = 1, *, now: float | None = None) -> None:
        """Record a new task as in progress; a task id already recorded is left as it is."""
        now = _now(now)
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO tasks (task_id, status, owner, created, updated, cost_images) "
                "VALUES (?, 'in_progress', ?, ?, ?, ?)", (task_id, owner, now, now, cost_images))

    def finished(self, task_id: str, status: str, reason: str | None = None, *, result: str | None = None,
                 error: str | None = None, http_status: int | None = None, now: float | None = None) -> bool:
        """Record how a task ended. ``result`` and ``error`` are JSON text, stored and given back as is.
        The first end recorded stays (a cancellation answered to a client is not overwritten by the work's
        late completion); False when the journal does not know the task or it had already ended."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE tasks SET status=?, reason=?, result=?, error=?, http_status=?, updated=? "
                "WHERE task_id=? AND status='in_progress'",
                (status, reason, result, error, http_status, _now(now), task_id))
            changed = cur.rowcount > 0
        if changed:
            self._ended([task_id])
        return changed

    def get(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        return TaskRecord(*row) if row else None

    def count(self, status: str | None = None) -> int:
        """How many tasks the journal holds (with that status, when given)."""
        with self._lock:
            if status is None:
                return self._db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM tasks WHERE status=?", (status,)).fetchone()[0]

    def prune(self, older_than_s: float, now: float | None = None) -> int:
        """Delete ended tasks last updated more than ``older_than_s`` ago; returns how many."""
        with self._lock:
            return self._db.execute(
                f"DELETE FROM tasks WHERE updated < ? AND status NOT IN ({','.join('?' * len(UNFINISHED))})",
                (_now(now) - older_than_s, *UNFINISHED)).rowcount

    def vacuum(self) -> None:
        """Give the pages freed by ``prune`` back to the disk, and truncate the WAL.

        Files made by older code have no auto_vacuum; the first call converts them with a full
        ``VACUUM`` (it rewrites the file once), later calls are incremental and cheap."""
        with self._lock:
            if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                self._db.execute("VACUUM")
            else:
                # executescript steps the pragma to its end; execute() would free a single page
                self._db.executescript("PRAGMA incremental_vacuum;")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _now(now: float | None) -> float:
    return time.time() if now is None else now
