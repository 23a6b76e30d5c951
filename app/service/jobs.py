"""Background bank builds: one worker thread, jobs with state, phase, progress and timings.

A job reads the product's staging set, calls the engine's `build_bank` (or, for
mode "append", `append_to_bank` on a stored base version with the staged images
that base does not already descend from; both poll `should_stop` so a cancel
takes effect between steps), and publishes the
bank through the `ProductCatalog` (a new immutable version in the store; when
asked, activated and swapped in while requests keep flowing).

Job records are written (atomically, as JSON) to `records_dir` at every change
of state or phase, so a restarted server still answers for its jobs: a job that
was queued or running when the process stopped reads `interrupted`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
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

from app.core.bank import MemoryBank
from app.core.embedding import EmbedderConfig, PatchEmbedder
from app.core.errors import BuildCancelled
from app.core.framing import Framing
from app.core.patchcore import PatchCoreConfig, append_config, append_to_bank, build_bank
from app.service.catalog import ProductCatalog
from app.service.errors import (
    InvalidBuildRequest,
    JobConflict,
    JobNotFound,
    NoNominalImages,
    ProductNotFound,
    TooFewImages,
    VersionNotFound,
    status_and_code,
)
from app.storage import NoActiveVersion

logger = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("succeeded", "failed", "cancelled", "interrupted")
# Each phase's share of the progress bar (start %, span %): the coreset is as long as
# feature extraction on large sets, so it gets its own stretch instead of sitting at 95 %.
PHASES: dict[str, tuple[float, float]] = {
    "queued": (0.0, 0.0), "loading": (0.0, 2.0), "features": (2.0, 48.0),
    "coreset": (50.0, 40.0), "calibration": (90.0, 5.0), "saving": (95.0, 4.0),
    "done": (100.0, 0.0),
}
_RECORD_SUFFIX = ".json"


def build_error(exc: BaseException) -> dict[str, str]:
    """A failed build's error record: the client's mistake by its code, a bug as build_failed
    (named, not described), a full store without paths."""
    status, code = status_and_code(exc)
    message = str(exc) or type(exc).__name__
    if status == 500 and code == "internal_error":
        code, message = "build_failed", f"the build failed ({type(exc).__name__})"
    elif code == "insufficient_storage":
        message = "the bank store is full; nothing was written"
    return {"code": code, "message": message}


# BuildParams fields only a full build can set (BuildParams.append_overrides has the others).
_KEPT_BY_APPEND = ("backbone", "image_size", "patch_size", "stage_dim", "framing", "false_alarm_rate",
                   "map_sigma", "stage_balance", "normalisation")


@dataclass(frozen=True)
class BuildParams:
    coreset_ratio: float | None = None
    backbone: str | None = None
    seed: int | None = None
    activate: bool = True
    mode: str = "full"                # "full" or "append"
    base_version: str | None = None   # append: resolved to the active version at submit
    until: str = "size"               # append: "size" or "radius"
    image_size: int | None = None
    framing: Framing | None = None
    false_alarm_rate: float | None = None
    map_sigma: float | None = None
    patch_size: int | None = None
    stage_dim: int | None = None
    stage_balance: bool | None = None
    normalisation: str | None = None

    def config(self) -> PatchCoreConfig:
        """The full build's config (an append build's comes from its base bank)."""
        defaults = PatchCoreConfig()
        embedder = defaults.embedder
        if any(v is not None for v in (self.backbone, self.image_size, self.patch_size, self.stage_dim,
                                       self.normalisation)):
            embedder = EmbedderConfig(**{**embedder.to_dict(),
                                         "backbone": self.backbone or embedder.backbone,
                                         "image_size": self.image_size or embedder.image_size,
                                         "patch_size": self.patch_size or embedder.patch_size,
                                         "stage_dim": self.stage_dim or embedder.stage_dim,
                                         "normalisation": self.normalisation or embedder.normalisation})
            embedder.validate()
        changes: dict[str, Any] = {"embedder": embedder}
        if self.framing is not None:
            self.framing.validate()
            changes["framing"] = self.framing
        if self.false_alarm_rate is not None:
            changes["false_alarm_rate"] = self.false_alarm_rate
        if self.map_sigma is not None:
            changes["gaussian_sigma"] = self.map_sigma
        if self.stage_balance is not None:
            changes["stage_balance"] = self.stage_balance
        if self.coreset_ratio is not None:
            changes["coreset_ratio"] = self.coreset_ratio
        if self.seed is not None:
            changes["seed"] = self.seed
        return dataclasses.replace(defaults, **changes)

    def append_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in (("coreset_ratio", self.coreset_ratio), ("seed", self.seed)) if v is not None}

    def describe(self) -> dict:
        data = dataclasses.asdict(self)
        data["framing"] = self.framing.to_dict() if self.framing is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> BuildParams:
        """From a job record (what `describe` wrote); unknown keys are ignored."""
        known = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
        if known.get("framing") is not None:
            known["framing"] = Framing.from_dict(known["framing"])
        return cls(**known)


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
            "params": self.params.describe(),
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

    @classmethod
    def from_record(cls, record: dict) -> Job:
        params = BuildParams.from_dict(record.get("params") or {})
        timings = record.get("timings_s") or {}
        return cls(id=str(record["id"]), product=str(record["product"]), params=params,
                   source=str(record.get("source", "staging")), state=str(record["state"]),
                   phase=str(record.get("phase", record["state"])),
                   progress=float(record.get("progress", 0.0)),
                   created_at=float(record.get("created_at") or 0.0),
                   started_at=record.get("started_at"), finished_at=record.get("finished_at"),
                   phase_times=dict(timings.get("phases") or {}), error=record.get("error"),
                   version=record.get("version"), image_count=record.get("image_count"))


ImageSource = Callable[[], Sequence[Path | np.ndarray]]


class JobRunner:
    """Runs builds one at a time in a dedicated thread; keeps recent finished jobs."""

    def __init__(self, catalog: ProductCatalog, embedder_for: Callable[[EmbedderConfig], PatchEmbedder],
                 *, max_finished: int = 100, min_images: int = 1,
                 records_dir: Path | None = None,
                 on_change: Callable[[dict[str, int]], None] | None = None,
                 on_finished: Callable[[Job], None] | None = None):
        self.catalog = catalog
        self.embedder_for = embedder_for
        self.max_finished = max_finished
        self.min_images = min_images
        self.records_dir = records_dir
        self._on_change = on_change
        self._on_finished = on_finished
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        # One record write at a time, each of the job as it is then: a cancel's write (from a
        # request) can no longer land after the worker's final one with an older state.
        self._record_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="build-worker")
        self._restore()

    # ---------------------------------------------------------------- API
    def submit(self, product: str, params: BuildParams, images: ImageSource,
               source: str = "staging", image_count: int | None = None) -> Job:
        """Queue a build. `image_count`, when known, is checked against the minimum now.

        An append build's base version is resolved now (default: the active one), so the
        job says which version it extends even if another is activated meanwhile."""
        config = params.config()  # invalid parameters fail now, not in the worker
        if params.mode == "append":
            params = self._resolve_base(product, params)
            if source == "staging":
                self._check_something_new(product, str(params.base_version), images)
        elif image_count is not None and image_count < self.min_images:
            raise TooFewImages(f"a build needs at least {self.min_images} nominal images; "
                               f"{image_count} are staged for {product!r}")
        with self._lock:
            for job in self._jobs.values():
                if job.product == product and job.active:
                    raise JobConflict(f"a build for {product!r} is already {job.state}: {job.id}")
            job = Job(uuid.uuid4().hex, product, params, source=source, image_count=image_count)
            self._jobs[job.id] = job
            self._trim()
        self._save(job)
        self._changed()
        self._executor.submit(self._run, job, config, images)
        return job

    def _check_something_new(self, product: str, base_version: str, images: ImageSource) -> None:
        """Refuse now an append whose staged images are all in the base's lineage (the job
        checks again, for any base): read from the served model's manifest, so only when the
        base is the version this process serves, and no bank is loaded for it."""
        loaded = self.catalog.predictor.registry.loaded().get(product)
        if loaded is None or loaded.version != base_version:
            return
        known = set(loaded.model.bank.manifest.get("lineage", {}).get("image_ids", []))
        staged = [p.stem for p in images() if isinstance(p, Path)]
        if known and staged and known.issuperset(staged):
            raise NoNominalImages(f"every staged image is already in {base_version}'s lineage; "
                                  "stage new images to append")

    def _resolve_base(self, product: str, params: BuildParams) -> BuildParams:
        # What the base bank's features and threshold were made with: an append cannot change
        # it, and ignoring the request silently would serve something other than was asked.
        # Named as the request names them: framing is its centre_crop, roi and aspect fields.
        kept = [("framing (centre_crop, roi, aspect)" if name == "framing" else name)
                for name in _KEPT_BY_APPEND if getattr(params, name) is not None]
        if kept:
            raise InvalidBuildRequest(f"an append build keeps its base bank's {', '.join(kept)}; "
                                      f"leave {'it' if len(kept) == 1 else 'them'} out")
        versions = self.catalog.versions(product) if product in self.catalog.store.products() else []
        if not versions:
            raise ProductNotFound(f"no bank to append to: {product!r} has no stored version")
        base = params.base_version or self.catalog.store.active_version(product)
        if base is None:
            raise NoActiveVersion(f"{product!r} has no active version to append to; activate one of "
                                  f"{versions} or name it as base_version")
        if base not in versions:
            raise VersionNotFound(f"{product!r} has no version {str(base)[:128]!r}; it has {versions}")
        return dataclasses.replace(params, base_version=base)

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id[:64]!r}")
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
        self._save(job)
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
            self._save(job)
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
        self._save(job)
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
                self._save(job)
            start, span = PHASES.get(phase, (job.progress, 0.0))
            job.progress = max(job.progress, min(100.0, start + span * float(fraction)))

        try:
            progress("loading", 0.0)
            paths = list(images())
            job.image_count = len(paths)
            if job.params.mode == "append":
                bank = self._append(job, paths, progress)
            else:
                if len(paths) < self.min_images:
                    raise TooFewImages(f"a build needs at least {self.min_images} nominal images, "
                                       f"got {len(paths)}")
                embedder = self.embedder_for(config.embedder)
                bank = build_bank(paths, config, embedder, progress=progress,
                                  should_stop=job.cancel_event.is_set, image_ids=_image_ids(job, paths))
            if job.cancel_event.is_set():
                raise BuildCancelled("cancelled")
            progress("saving", 0.0)
            job.version = self.catalog.publish(job.product, bank, activate=job.params.activate,
                                               cancelled=job.cancel_event.is_set)
            progress("done", 1.0)
            job.progress = 100.0
            state = "succeeded"
        except BuildCancelled:
            state = "cancelled"
        except Exception as exc:
            if job.cancel_event.is_set():
                # Cancelled by a product delete, which then removed the staged files under
                # the build: whatever failed after that is the cancellation, not the images.
                state = "cancelled"
            else:
                job.error = build_error(exc)
                logger.exception("build %s for %s failed", job.id, job.product,
                                 extra={"job_id": job.id, "product": job.product})
                state = "failed"
        job.phase_times[job.phase] = job.phase_times.get(job.phase, 0.0) + (
            time.perf_counter() - phase_started)
        with self._lock:
            self._finish(job, state)
        self._save(job)
        logger.info("build %s for %s %s", job.id, job.product, state,
                    extra={"job_id": job.id, "product": job.product, "version": job.version,
                           "state": state})
        self._changed()
        if self._on_finished is not None:
            self._on_finished(job)

    def _append(self, job: Job, paths: Sequence[Path | np.ndarray],
                progress: Callable[[str, float], None]) -> MemoryBank:
        """Append the staged images the base does not already descend from (staged files are
        named by content hash, and service-built banks record those names in their lineage)."""
        base_version, base = self.catalog.store.load(job.product, job.params.base_version)
        known = set(base.manifest.get("lineage", {}).get("image_ids", []))
        ids = _image_ids(job, paths)
        if ids is not None:
            paths = [p for p, i in zip(paths, ids, strict=True) if i not in known]
            ids = [i for i in ids if i not in known]
        if not paths:
            raise NoNominalImages(f"every staged image is already in {base_version}'s lineage; "
                                  "stage new images to append")
        job.image_count = len(paths)
        config = append_config(base, **job.params.append_overrides())
        embedder = self.embedder_for(EmbedderConfig.from_dict(base.embedder))
        return append_to_bank(base, paths, config, embedder, base_version=str(base_version),
                              until=job.params.until, progress=progress,
                              should_stop=job.cancel_event.is_set, image_ids=ids)

    def _finish(self, job: Job, state: str) -> None:
        job.state = state
        job.finished_at = time.time()
        if state in ("cancelled", "interrupted"):
            job.phase = state

    def _trim(self) -> None:
        finished = [j.id for j in self._jobs.values() if not j.active]
        for job_id in finished[: max(0, len(finished) - self.max_finished)]:
            del self._jobs[job_id]
            if self.records_dir is not None:
                (self.records_dir / f"{job_id}{_RECORD_SUFFIX}").unlink(missing_ok=True)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.counts())

    # ---------------------------------------------------------------- records
    def _save(self, job: Job) -> None:
        """Write the job's record atomically; a full disk only costs the record, not the build."""
        if self.records_dir is None:
            return
        try:
            with self._record_lock:
                self.records_dir.mkdir(parents=True, exist_ok=True)
                fd, temp = tempfile.mkstemp(prefix=".job-", suffix=".tmp", dir=self.records_dir)
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as handle:
                        json.dump(job.describe(), handle)
                    os.replace(temp, self.records_dir / f"{job.id}{_RECORD_SUFFIX}")
                finally:
                    Path(temp).unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not write the record of job %s: %s", job.id, exc.strerror)

    def _restore(self) -> None:
        """Load the records of earlier runs; jobs they left active are now `interrupted`."""
        if self.records_dir is None or not self.records_dir.is_dir():
            return
        for stale in self.records_dir.glob(".job-*.tmp"):
            stale.unlink(missing_ok=True)
        restored: list[Job] = []
        for path in self.records_dir.glob(f"*{_RECORD_SUFFIX}"):
            try:
                job = Job.from_record(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("ignoring unreadable job record %s: %s", path.name, exc)
                continue
            if job.active:
                job.error = {"code": "interrupted",
                             "message": "the server stopped while this build was " + job.state}
                self._finish(job, "interrupted")
                self._save(job)
            restored.append(job)
        for job in sorted(restored, key=lambda j: j.created_at):
            self._jobs[job.id] = job
        self._trim()


def _image_ids(job: Job, paths: Sequence[Path | np.ndarray]) -> list[str] | None:
    """Staged files are named by their content hash: that name identifies the image."""
    if job.source != "staging" or not all(isinstance(p, Path) for p in paths):
        return None
    return [p.stem for p in paths if isinstance(p, Path)]
