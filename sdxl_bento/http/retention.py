"""Retention: stored images and ended tasks are deleted once past their time or the disk bound.

Without it the image store and the task journal grow until the disk is full. A daemon thread
sweeps both every ``interval_s``, and BentoML's own task table (``task_result.db``: each row holds a
task's request, uploads included, and its answer), which BentoML keeps for 24 hours whatever the
service's retention: the journal answers for tasks, so that table only needs its tasks while they run. Several processes and replicas may sweep one shared store at
once: the sweep is safe beside writers and other sweepers (see ``ImageStore.sweep``). A failure is
logged and the next sweep tries again; the thread never dies of it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..core.images import ImageStore, SweepStats
from .journal import TaskJournal

logger = logging.getLogger(__name__)


class RetentionSweeper:
    def __init__(self, images: ImageStore, journal: TaskJournal, *, image_max_age_s: float, image_max_bytes: int,
                 task_max_age_s: float, interval_s: float, runner_db: Path | None = None,
                 on_sweep: Callable[[SweepStats, int], None] | None = None) -> None:
        """``on_sweep(stats, tasks_pruned)`` runs after each sweep whose image part succeeded (for gauges);
        ``runner_db`` is BentoML's task table, pruned of tasks ended more than ``task_max_age_s`` ago."""
        self.images, self.journal, self.runner_db = images, journal, runner_db
        self.image_max_age_s, self.image_max_bytes = image_max_age_s, image_max_bytes
        self.task_max_age_s, self.interval_s = task_max_age_s, interval_s
        self.on_sweep = on_sweep
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Sweep now, then every ``interval_s``, in a daemon thread; a second call does nothing."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="retention-sweeper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the thread; a sweep under way finishes first (waited for up to ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def sweep_once(self, now: float | None = None) -> tuple[SweepStats | None, int]:
        """Sweep the image store, then prune and vacuum the journal. Never raises: each part's failure
        is logged and does not skip the other. Returns (image stats, None if that part failed; tasks pruned)."""
        stats: SweepStats | None = None
        pruned = 0
        try:
            stats = self.images.sweep(max_age_s=self.image_max_age_s, max_bytes=self.image_max_bytes, now=now)
        except Exception:
            logger.exception("retention: sweeping the image store %s failed", self.images.root)
        try:
            pruned = self.journal.prune(self.task_max_age_s, now=now)
            if pruned:
                self.journal.vacuum()
        except Exception:
            logger.exception("retention: pruning or vacuuming the task journal failed")
        if self.runner_db is not None:
            try:
                prune_runner_tasks(self.runner_db, self.task_max_age_s, now=now)
            except Exception:
                logger.exception("retention: pruning BentoML's task table %s failed", self.runner_db)
        if stats is not None and (stats.deleted or stats.stale_files):
            logger.info("retention: deleted %d images (%d expired, %d over the byte bound; %.1f MiB) and %d "
                        "leftover files; %d images (%.1f MiB) remain", stats.deleted, stats.expired, stats.evicted,
                        stats.freed_bytes / 2**20, stats.stale_files, stats.remaining, stats.remaining_bytes / 2**20)
        if pruned:
            logger.info("retention: pruned %d ended tasks older than %.0f s", pruned, self.task_max_age_s)
        if stats is not None and self.on_sweep is not None:
            try:
                self.on_sweep(stats, pruned)
            except Exception:
                logger.exception("retention: on_sweep failed")
        return stats, pruned

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep_once()
            except Exception:  # sweep_once does not raise; this keeps the thread alive if that ever changes
                logger.exception("retention: sweep failed")
            self._stop.wait(self.interval_s)


def prune_runner_tasks(path: Path, older_than_s: float, now: float | None = None) -> int:
    """Delete BentoML's rows of tasks that ended (or were created, for cancelled ones, which BentoML never
    completes) more than ``older_than_s`` ago; never a task in progress. The table is BentoML 1.4.39's
    (``_bentoml_impl/tasks/result.py``): UTC timestamps as ``YYYY-MM-DD HH:MM:SS[...]`` text, which compare
    in time order as strings."""
    if not Path(path).exists():
        return 0
    cutoff = datetime.fromtimestamp((time.time() if now is None else now) - older_than_s, timezone.utc)
    with sqlite3.connect(str(path), timeout=30) as db:
        db.execute("PRAGMA busy_timeout=5000")
        deleted = db.execute("DELETE FROM result WHERE status != 'in_progress' AND "
                             "COALESCE(completed_at, created_at) < ?",
                             (cutoff.strftime("%Y-%m-%d %H:%M:%S"),)).rowcount
    if deleted:
        with sqlite3.connect(str(path), timeout=30) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return deleted
