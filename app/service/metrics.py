"""Prometheus metrics, one CollectorRegistry per app instance (tests build many apps)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from app.service.jobs import Job

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5,
                    5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("patchcore_http_requests_total",
                                "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("patchcore_http_request_duration_seconds",
                                 "HTTP request latency by route", ["method", "route"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("patchcore_queue_depth", "Images waiting for the batch worker",
                                 registry=r)
        self.queue_capacity = Gauge("patchcore_queue_capacity", "Size of the bounded queue",
                                    registry=r)
        self.batch_size = Histogram("patchcore_batch_size", "Images per backbone batch",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.time_queued = Histogram("patchcore_time_queued_seconds",
                                     "Time an image waited in the queue before its batch ran",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.time_computing = Histogram("patchcore_time_computing_seconds",
                                        "Time to compute one batch (backbone + kNN)",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.dropped_total = Counter("patchcore_dropped_images_total",
                               "Images dropped before compute", ["reason"], registry=r)
        self.device_decoded_total = Counter(
            "patchcore_device_decoded_images_total",
            "JPEG bodies decoded on the model's device (PATCHCORE_DEVICE_DECODE)", registry=r)
        self.device_decode_fallbacks = Counter(
            "patchcore_device_decode_fallbacks_total",
            "JPEG bodies sent to the device decoder that it refused, decoded on the CPU instead",
            registry=r)
        self.rejected = Counter("patchcore_rejected_requests_total",
                                "Predict requests refused because the queue was full", registry=r)
        self.images = Counter("patchcore_images_predicted_total", "Images scored",
                              ["product"], registry=r)
        self.anomalous = Counter("patchcore_images_anomalous_total",
                                 "Images scored as anomalous", ["product"], registry=r)
        self.bank_size = Gauge("patchcore_bank_size", "Patch features in the active bank",
                               ["product", "version"], registry=r)
        self.failed_banks = Gauge("patchcore_failed_banks", "Banks that failed to load",
                                  registry=r)
        self.build_jobs = Gauge("patchcore_build_jobs", "Build jobs by state", ["state"],
                                registry=r)
        self.build_duration = Histogram("patchcore_build_duration_seconds",
                                        "Running time of bank builds that succeeded",
                                        buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
                                        registry=r)
        for state in JOB_STATES:
            self.build_jobs.labels(state).set(0)

    def build_finished(self, job: Job) -> None:
        """JobRunner's on_finished: the running time of every build that wrote a bank."""
        if job.state == "succeeded" and job.started_at is not None and job.finished_at is not None:
            self.build_duration.observe(max(0.0, job.finished_at - job.started_at))

    # --------------------------------------------------------------- BatchObserver
    def batch_done(self, size: int, queued_s: Sequence[float], compute_s: float) -> None:
        self.batch_size.observe(size)
        self.time_computing.observe(compute_s)
        for q in queued_s:
            self.time_queued.observe(q)

    def dropped_images(self, reason: str, count: int) -> None:
        self.dropped_total.labels(reason).inc(count)

    def dropped(self, reason: str, count: int) -> None:  # BatchObserver protocol
        self.dropped_images(reason, count)

    def device_decoded(self, decoded: int, fell_back: int) -> None:
        self.device_decoded_total.inc(decoded)
        self.device_decode_fallbacks.inc(fell_back)

    # --------------------------------------------------------------- wiring
    def track_queue(self, depth: Callable[[], int], capacity: int) -> None:
        self.queue_depth.set_function(depth)
        self.queue_capacity.set(capacity)

    def set_banks(self, banks: dict[str, tuple[str, int]], failed: int) -> None:
        """banks: product -> (version, bank size)."""
        self.bank_size.clear()
        for product, (version, size) in banks.items():
            self.bank_size.labels(product, version).set(size)
        self.failed_banks.set(failed)

    def set_jobs(self, counts: dict[str, int]) -> None:
        for state in JOB_STATES:
            self.build_jobs.labels(state).set(counts.get(state, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
