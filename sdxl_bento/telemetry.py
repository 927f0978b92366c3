"""Prometheus metrics of the service, exported on BentoML's ``/metrics``.

Created inside the service instance, after BentoML has set ``PROMETHEUS_MULTIPROC_DIR`` for the
worker (a collector created earlier would be invisible to ``/metrics``). Gauges of several workers
add up (``livesum``) or take the worst (``max``).
"""

from __future__ import annotations

import functools
from typing import Any

from .buildinfo import build_info


@functools.cache
def metrics() -> "Metrics":
    """The process's metrics, created on first use (inside a worker, never at import)."""
    return Metrics()


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.queue_depth = Gauge("sdxl_queue_depth", "Requests waiting for the GPU.", multiprocess_mode="livesum")
        self.running = Gauge("sdxl_running_requests", "Requests in the batch on the GPU.", multiprocess_mode="livesum")
        self.batch_size = Histogram("sdxl_batch_images", "Images per pipeline call.", buckets=(1, 2, 4, 8, 16, 32))
        self.step_seconds = Histogram("sdxl_step_seconds", "Seconds per denoising step of a batch.",
                                      buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30))
        self.images = Counter("sdxl_images_generated", "Images generated on the GPU.")
        self.requests = Counter("sdxl_requests", "Generation requests by endpoint and outcome.",
                                ["endpoint", "outcome"])
        self.cache_hits = Counter("sdxl_cache_hits", "Requests answered from the result cache.")
        self.cache_misses = Counter("sdxl_cache_misses", "Cacheable requests that needed the GPU.")
        self.cache_bytes = Gauge("sdxl_cache_bytes", "Bytes held by the result cache.", multiprocess_mode="max")
        self.coalesced = Counter("sdxl_coalesced_requests", "Requests that joined an identical one in flight.")
        self.ratelimit_degraded = Gauge("sdxl_ratelimit_redis_degraded",
                                        "1 while Redis is configured but unreachable (limits are per process).",
                                        multiprocess_mode="max")
        self.ratelimit_redis_failures = Counter("sdxl_ratelimit_redis_failures", "Rate-limit calls Redis failed.")
        self.rejected = Counter("sdxl_rejected", "Requests refused by the gateway, by reason.", ["reason"])
        self.model_swap_seconds = Histogram("sdxl_model_swap_seconds", "Seconds to load a checkpoint on demand.",
                                            buckets=(0.5, 1, 2, 5, 10, 20, 40, 80))
        self.acceleration = Gauge("sdxl_acceleration", "1 for the speed-ups this worker runs with (after warm-up: "
                                  "a failed compile or capture turns them off).",
                                  ["compile", "cuda_graphs", "vae_decode"], multiprocess_mode="max")
        self.content_filtered = Counter("sdxl_images_content_filtered", "Images withheld or blurred by the NSFW check.")
        self.image_store_bytes = Gauge("sdxl_image_store_bytes", "Bytes of images in the store (last sweep).",
                                       multiprocess_mode="max")
        self.image_store_images = Gauge("sdxl_image_store_images", "Images in the store (last sweep).",
                                        multiprocess_mode="max")
        self.images_removed = Counter("sdxl_images_removed", "Images deleted by the retention sweep, by why.",
                                      ["reason"])
        self.tasks_pruned = Counter("sdxl_tasks_pruned", "Ended tasks dropped from the journal after retention.")
        self.c2pa_sign_seconds = Histogram("sdxl_c2pa_sign_seconds", "Seconds to sign one encoded image with its "
                                           "C2PA manifest (a TSA's round trip included), by format.", ["format"],
                                           buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.c2pa_sign_failures = Counter("sdxl_c2pa_sign_failures", "Images the C2PA library refused to sign (their "
                                          "requests failed).")
        info = build_info()
        self.build_info = Gauge("sdxl_build_info", "1, labelled with the versions this worker runs with.",
                                list(info), multiprocess_mode="max")
        self.build_info.labels(**info).set(1)
        self.idempotent_replays = Counter("sdxl_idempotent_replays", "Requests answered with the stored answer of an "
                                          "earlier request with the same Idempotency-Key (no second run).")
        self.webhook_attempts = Counter("sdxl_webhook_attempts", "Webhook delivery attempts, by outcome.", ["outcome"])

    def observe_batch(self, images: int, steps: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.images.inc(images)
        if steps:
            self.step_seconds.observe(seconds / steps)

    def observe_queue(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)

    def observe_cache(self, stats: Any) -> None:
        self.cache_bytes.set(stats.bytes)

    def observe_retention(self, stats: Any, pruned: int) -> None:
        """After a retention sweep (``retention.RetentionSweeper``)."""
        self.image_store_bytes.set(stats.remaining_bytes)
        self.image_store_images.set(stats.remaining)
        self.images_removed.labels(reason="expired").inc(stats.expired)
        self.images_removed.labels(reason="over_size").inc(stats.evicted)
        self.tasks_pruned.inc(pruned)

    def redis_failed(self) -> None:
        """A rate-limit or job-slot call that Redis failed (the limits then hold per process)."""
        self.ratelimit_redis_failures.inc()
