"""Background bank builds: one worker thread, jobs with state, phase, progress and timings.

A job reads the product's staging set, calls the engine's `build_bank` (which
polls `should_stop` so a cancel takes effect between steps), and publishes the
bank through the `ProductCatalog` (a new immutable version in the store; when
asked, activated and swapped in while requests keep flowing).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core.embedding import EmbedderConfig, PatchEmbedder
from app.core.errors import BuildCancelled
from app.core.patchcore import PatchCoreConfig, build_bank
from app.service.catalog import ProductCatalog
from app.service.errors import JobConflict, JobNotFound, status_and_code

logger = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "running")


@dataclass(frozen=True)
class BuildParams:
    coreset_ratio: float | None = None
    backbone: str | None = None
    seed: int | None = None
    activate: bool = True

    def config(self) -> PatchCoreConfig:
        defaults = PatchCoreConfig()
        embedder = defaults.embedder
        if self.backbone is not None:
            embedder = EmbedderConfig(**{**embedder.to_dict(), "backbone": self.backbone})
            embedder.validate()
        changes: dict[str, Any] = {"embedder": embedder}
        if self.coreset_ratio is not None:
            changes["coreset_ratio"] = self.coreset_ratio
        if self.seed is not None:
            changes["seed"] = self.seed
        return dataclasses.replace(defaults, **changes)


@dataclass
class Job:
    id: str
    product: str
    params: BuildParams
    source: str = "staging"
    state: str = "queued"
    phase: str = "queued"
    progress: float = 0.0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    phase_times: dict[str, float] = field(default_factory=dict)
    error: dict | None = None
    version: str | None = None
    image_count: int | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def describe(self) -> dict:
        now = time.time()
        end = self.finished_at or now
        return {
            "id": self.id,
            "product": self.product,
            "state": self.state,
            "phase": self.phase,
            "progress": round(self.progress, 1),
            "params": {"coreset_ratio": self.params.coreset_ratio,
                       "backbone": self.params.backbone, "seed": self.params.seed,
                       "activate": self.params.activate},
            "source": self.source,
            "image_count": self.image_count,
            "version": self.version,
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "timings_s": {
                "queued": round((self.started_at or end) - self.created_at, 3),
                "running": round(end - self.started_at, 3) if self.started_at else None,
                "phases": {k: round(v, 3) for k, v in self.phase_times.items()},
            },
            "cancel_requested": self.cancel_event.is_set(),
        }


ImageSource = Callable[[], Sequence[Path | np.ndarray]]


class JobRunner:
    """Runs builds one at a time in a dedicated thread; keeps recent finished jobs."""

    def __init__(self, catalog: ProductCatalog, embedder_for: Callable[[EmbedderConfig], PatchEmbedder],
                 *, max_finished: int = 100,
                 on_change: Callable[[dict[str, int]], None] | None = None,
                 on_finished: Callable[[Job], None] | None = None):
        self.catalog = catalog
        self.embedder_for = embedder_for
        self.max_finished = max_finished
        self._on_change = on_change
        self._on_finished = on_finished
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="build-worker")

    # ---------------------------------------------------------------- API
    def submit(self, product: str, params: BuildParams, images: ImageSource,
               source: str = "staging") -> Job:
        config = params.config()  # invalid parameters fail now, not in the worker
        with self._lock:
            for job in self._jobs.values():
                if job.product == product and job.active:
                    raise JobConflict(f"a build for {product!r} is already {job.state}: {job.id}")
            job = Job(uuid.uuid4().hex, product, params, source=source)
            self._jobs[job.id] = job
            self._trim()
        self._changed()
        self._executor.submit(self._run, job, config, images)
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r}")
        return job

    def list(self) -> list[Job]:
        with self._lock:
            return list(reversed(self._jobs.values()))

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.active:
            raise JobConflict(f"job {job_id} is already {job.state}")
        job.cancel_event.set()
        with self._lock:
            if job.state == "queued":
                self._finish(job, "cancelled")
        self._changed()
        return job

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in list(self._jobs.values()):
            counts[job.state] = counts.get(job.state, 0) + 1
        return counts

    def busy_with(self, product: str) -> Job | None:
        for job in list(self._jobs.values()):
            if job.product == product and job.active:
                return job
        return None

    def cancel_product(self, product: str) -> None:
        """Cancel the product's queued or running build, if any (before a delete)."""
        job = self.busy_with(product)
        if job is not None and job.active:
            job.cancel_event.set()
            with self._lock:
                if job.state == "queued":
                    self._finish(job, "cancelled")
            self._changed()

    def close(self) -> None:
        for job in list(self._jobs.values()):
            if job.active:
                job.cancel_event.set()
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ---------------------------------------------------------------- worker
    def _run(self, job: Job, config: PatchCoreConfig, images: ImageSource) -> None:
        with self._lock:
            if job.state != "queued":  # cancelled while waiting
                return
            job.state = "running"
            job.started_at = time.time()
        self._changed()
        phase_started = time.perf_counter()

        def progress(phase: str, fraction: float) -> None:
            nonlocal phase_started
            now = time.perf_counter()
            if phase != job.phase:
                job.phase_times[job.phase] = job.phase_times.get(job.phase, 0.0) + (
                    now - phase_started)
                phase_started = now
                job.phase = phase
            # The build itself is 0-95 %; saving and swapping in is the rest.
            job.progress = max(job.progress, min(95.0, 95.0 * float(fraction)))

        try:
            progress("loading", 0.0)
            paths = list(images())
            job.image_count = len(paths)
            embedder = self.embedder_for(config.embedder)
            bank = build_bank(paths, config, embedder, progress=progress,
                              should_stop=job.cancel_event.is_set)
            if job.cancel_event.is_set():
                raise BuildCancelled("cancelled")
            progress("saving", 0.95)
            job.version = self.catalog.publish(job.product, bank, activate=job.params.activate,
                                               cancelled=job.cancel_event.is_set)
            progress("done", 1.0)
            job.progress = 100.0
            state = "succeeded"
        except BuildCancelled:
            state = "cancelled"
        except Exception as exc:
            status, code = status_and_code(exc)
            job.error = {"code": code if status != 500 or code != "internal_error" else
                         "build_failed", "message": str(exc) or type(exc).__name__}
            logger.exception("build %s for %s failed", job.id, job.product,
                             extra={"job_id": job.id, "product": job.product})
            state = "failed"
        job.phase_times[job.phase] = job.phase_times.get(job.phase, 0.0) + (
            time.perf_counter() - phase_started)
        with self._lock:
            self._finish(job, state)
        logger.info("build %s for %s %s", job.id, job.product, state,
                    extra={"job_id": job.id, "product": job.product, "version": job.version,
                           "state": state})
        self._changed()
        if self._on_finished is not None:
            self._on_finished(job)

    def _finish(self, job: Job, state: str) -> None:
        job.state = state
        job.finished_at = time.time()
        if state == "cancelled":
            job.phase = "cancelled"

    def _trim(self) -> None:
        finished = [j.id for j in self._jobs.values() if not j.active]
        for job_id in finished[: max(0, len(finished) - self.max_finished)]:
            del self._jobs[job_id]

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.counts())
