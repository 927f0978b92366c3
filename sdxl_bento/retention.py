"""Retention: stored images and ended tasks are deleted once past their time or the disk bound.

Without it the image store and the task journal grow until the disk is full. A daemon thread
sweeps both every ``interval_s``. Several processes and replicas may sweep one shared store at
once: the sweep is safe beside writers and other sweepers (see ``ImageStore.sweep``). A failure is
logged and the next sweep tries again; the thread never dies of it.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .images import ImageStore, SweepStats
from .journal import TaskJournal

logger = logging.getLogger(__name__)


class RetentionSweeper:
    def __init__(self, images: ImageStore, journal: TaskJournal, *, image_max_age_s: float, image_max_bytes: int,
                 task_max_age_s: float, interval_s: float,
                 on_sweep: Callable[[SweepStats, int], None] | None = None) -> None:
        """``on_sweep(stats, tasks_pruned)`` runs after each sweep whose image part succeeded (for gauges)."""
        self.images, self.journal = images, journal
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
