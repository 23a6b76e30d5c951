"""Builds on the cluster: a named detached `JobBoard` actor keeps the jobs, each
build runs as a Ray task with its own resources (one CPU, a GPU when the cluster
has one), never on a serving replica.

    replica  --submit(images)-->  JobBoard (detached, 0 CPU)  --build_task.remote()-->  worker
       ^                            ^  progress / cancel flag        |
       |  get / list / cancel       +--------------------------------+
                                    the task saves the bank in the store and moves the
                                    pointer; every replica's PointerWatcher picks it up.

The board owns the tasks it starts, so a build and its job record outlive the
replica that accepted the request (Ray kills the tasks of a dead owner; the
board is detached). A crash of the board itself loses the job records (not the
banks): Ray restarts it empty.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import ray

from app.cluster import JOB_BOARD_NAME, NAMESPACE
from app.core.embedding import EmbedderConfig
from app.core.errors import BuildCancelled
from app.service.catalog import ProductCatalog
from app.service.errors import InvalidBuildRequest, JobConflict, JobNotFound, TooFewImages
from app.service.jobs import PHASES, BuildParams, ImageSource, Job, JobRunner, build_error
from app.service.predictor import Predictor
from app.service.settings import Settings

logger = logging.getLogger(__name__)

CANCEL_POLL_S = 0.25
# How long a product delete waits for its cancelled build to end (a save in progress finishes).
CANCEL_WAIT_S = 120.0
PROGRESS_EVERY_S = 0.2


# --------------------------------------------------------------------------- the board
class JobBoard:
    """Job records, and the build tasks it started. An async actor: one event loop, no locks."""

    def __init__(self, max_finished: int = 100):
        self.max_finished = max_finished
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.refs: dict[str, Any] = {}
        self.phase_started: dict[str, float] = {}

    async def submit(self, product: str, params: dict, images: list[tuple[str, bytes]],
                     source: str) -> dict:
        for job in self.jobs.values():
            if job.product == product and job.active:
                return {"conflict": f"a build for {product!r} is already {job.state}: {job.id}"}
        job = Job(uuid.uuid4().hex, product, BuildParams.from_dict(params), source=source,
                  image_count=len(images))
        self.jobs[job.id] = job
        self._trim()
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        ref = build_task.options(num_cpus=1, num_gpus=gpus).remote(job.id, product, params, images)
        self.refs[job.id] = ref
        asyncio.get_running_loop().create_task(self._follow(job, ref))
        return {"job": job.describe()}

    async def get(self, job_id: str) -> dict | None:
        job = self.jobs.get(job_id)
        return job.describe() if job else None

    async def list(self) -> list[dict]:
        return [job.describe() for job in reversed(self.jobs.values())]

    async def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self.jobs.values():
            counts[job.state] = counts.get(job.state, 0) + 1
        return counts

    async def cancel(self, job_id: str) -> dict:
        job = self.jobs.get(job_id)
        if job is None:
            return {"not_found": f"no job {job_id!r}"}
        if not job.active:
            return {"conflict": f"job {job_id} is already {job.state}"}
        job.cancel_event.set()
        if job.state == "queued":  # not started: it never will
            ray.cancel(self.refs[job_id])
            self._finish(job, "cancelled")
        return {"job": job.describe()}

    async def cancel_product(self, product: str) -> None:
        for job in list(self.jobs.values()):
            if job.product == product and job.active:
                await self.cancel(job.id)

    async def busy_with(self, product: str) -> dict | None:
        for job in self.jobs.values():
            if job.product == product and job.active:
                return job.describe()
        return None

    # ------------------------------------------------------------ called by the build task
    async def started(self, job_id: str) -> bool:
        """The task asks before it starts; False when the job was cancelled meanwhile."""
        job = self.jobs.get(job_id)
        if job is None or job.state != "queued":
            return False
        job.state, job.started_at = "running", time.time()
        self.phase_started[job_id] = time.perf_counter()
        return True

    async def progress(self, job_id: str, phase: str, fraction: float) -> None:
        job = self.jobs.get(job_id)
        if job is None or not job.active:
            return
        now = time.perf_counter()
        if phase != job.phase:
            started = self.phase_started.get(job_id, now)
            job.phase_times[job.phase] = job.phase_times.get(job.phase, 0.0) + now - started
            self.phase_started[job_id] = now
            job.phase = phase
        # The single process's progress bar: each phase has its stretch (app.service.jobs.PHASES).
        start, span = PHASES.get(phase, (job.progress, 0.0))
        job.progress = max(job.progress, min(100.0, start + span * float(fraction)))

    async def cancel_requested(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        return job is None or job.cancel_event.is_set()

    # ------------------------------------------------------------ internals
    async def _follow(self, job: Job, ref: Any) -> None:
        try:
            outcome = await ref
        except Exception as exc:  # the task's worker died, or it was cancelled before it ran
            outcome = {"state": "cancelled"} if job.cancel_event.is_set() else {
                "state": "failed",
                "error": {"code": "build_failed", "message": f"build task lost: {type(exc).__name__}"}}
        finally:
            self.refs.pop(job.id, None)
        if not job.active:
            return
        started = self.phase_started.pop(job.id, None)
        if started is not None:
            job.phase_times[job.phase] = job.phase_times.get(job.phase, 0.0) + (
                time.perf_counter() - started)
        job.version = outcome.get("version")
        job.image_count = outcome.get("image_count", job.image_count)
        job.error = outcome.get("error")
        if outcome["state"] == "succeeded":
            job.progress, job.phase = 100.0, "done"
        self._finish(job, outcome["state"])

    @staticmethod
    def _finish(job: Job, state: str) -> None:
        job.state = state
        job.finished_at = time.time()
        if state == "cancelled":
            job.phase = "cancelled"

    def _trim(self) -> None:
        finished = [j.id for j in self.jobs.values() if not j.active]
        for job_id in finished[: max(0, len(finished) - self.max_finished)]:
            del self.jobs[job_id]


RemoteJobBoard = ray.remote(num_cpus=0, max_restarts=-1)(JobBoard)


def job_board(max_finished: int = 100) -> Any:
    """The cluster's one board: created on first use, found by name after that."""
    return RemoteJobBoard.options(name=JOB_BOARD_NAME, namespace=NAMESPACE, lifetime="detached",
                                  get_if_exists=True).remote(max_finished)


# --------------------------------------------------------------------------- the build task
@ray.remote(max_retries=0)
def build_task(job_id: str, product: str, params: dict, images: list[tuple[str, bytes]]) -> dict:
    """Build, save and (when asked) activate a bank; returns the outcome, never raises."""
    from app.core.embedding import create_embedder
    from app.core.patchcore import build_bank
    from app.service.resources import create_store

    board = ray.get_actor(JOB_BOARD_NAME, namespace=NAMESPACE)
    if not ray.get(board.started.remote(job_id)):
        return {"state": "cancelled"}
    stop = threading.Event()
    done = threading.Event()

    def poll_cancel() -> None:
        while not done.wait(CANCEL_POLL_S):
            try:
                if ray.get(board.cancel_requested.remote(job_id), timeout=5):
                    stop.set()
                    return
            except Exception:  # noqa: S112 - the board is restarting: ask again
                continue

    threading.Thread(target=poll_cancel, name="cancel-poll", daemon=True).start()
    last = {"phase": "", "at": 0.0}

    def progress(phase: str, fraction: float) -> None:
        now = time.monotonic()
        if phase != last["phase"] or now - last["at"] >= PROGRESS_EVERY_S:
            last.update(phase=phase, at=now)
            board.progress.remote(job_id, phase, fraction)

    try:
        settings = Settings()
        config = BuildParams.from_dict(params).config()
        with tempfile.TemporaryDirectory(prefix="build-") as tmp:
            paths = []
            for index, (name, data) in enumerate(images):
                path = Path(tmp) / f"{index:05d}{Path(name).suffix.lower()}"
                path.write_bytes(data)
                paths.append(path)
            progress("loading", 0.0)
            weights = settings.weights_path if config.embedder.backbone == EmbedderConfig().backbone \
                else None
            embedder = create_embedder(config.embedder, device=settings.device, weights_path=weights)
            bank = build_bank(paths, config, embedder, progress=progress, should_stop=stop.is_set)
        if stop.is_set():
            raise BuildCancelled("cancelled")
        progress("saving", 0.0)
        version = create_store(settings).save(product, bank, activate=bool(params.get("activate", True)))
        return {"state": "succeeded", "version": str(version), "image_count": len(images)}
    except BuildCancelled:
        return {"state": "cancelled", "image_count": len(images)}
    except Exception as exc:  # the same error record as the single process's JobRunner
        logger.exception("build %s for %s failed", job_id, product)
        return {"state": "failed", "image_count": len(images), "error": build_error(exc)}
    finally:
        done.set()


# --------------------------------------------------------------------------- the replica's side
def _job(record: dict) -> Job:
    """A snapshot of the board's job, with the same describe() as the single process's."""
    job = Job.from_record(record)
    if record.get("cancel_requested"):
        job.cancel_event.set()
    return job


def _answer(reply: dict) -> Job:
    if "conflict" in reply:
        raise JobConflict(reply["conflict"])
    if "not_found" in reply:
        raise JobNotFound(reply["not_found"])
    return _job(reply["job"])


class RayJobRunner(JobRunner):
    """The JobRunner the routes see on a replica: every call goes to the cluster's JobBoard."""

    def __init__(self, catalog: ProductCatalog, predictor: Predictor, settings: Settings):
        super().__init__(catalog, predictor.embedder, max_finished=settings.max_finished_jobs,
                         min_images=settings.min_build_images)
        self.board = job_board(settings.max_finished_jobs)

    def submit(self, product: str, params: BuildParams, images: ImageSource,
               source: str = "staging", image_count: int | None = None) -> Job:
        params.config()  # invalid parameters fail now, not in the task
        if params.mode != "full":
            raise InvalidBuildRequest("append builds run on the uvicorn engine only; "
                                      "the ray engine builds full banks")
        # The staging area is this node's: the task gets the bytes (it may run on another node).
        data = [(_name(i, image), _read(image)) for i, image in enumerate(images())]
        if len(data) < self.min_images:
            raise TooFewImages(f"a build needs at least {self.min_images} nominal images; "
                               f"{len(data)} are staged for {product!r}")
        return _answer(ray.get(self.board.submit.remote(product, params.describe(), data,
                                                          source)))

    def get(self, job_id: str) -> Job:
        record = ray.get(self.board.get.remote(job_id))
        if record is None:
            raise JobNotFound(f"no job {job_id!r}")
        return _job(record)

    def list(self) -> list[Job]:
        return [_job(r) for r in ray.get(self.board.list.remote())]

    def cancel(self, job_id: str) -> Job:
        return _answer(ray.get(self.board.cancel.remote(job_id)))

    def counts(self) -> dict[str, int]:
        return dict(ray.get(self.board.counts.remote()))

    def busy_with(self, product: str) -> Job | None:
        record = ray.get(self.board.busy_with.remote(product))
        return None if record is None else _job(record)

    def cancel_product(self, product: str) -> None:
        """Cancel the product's build and wait for it to end (bounded), as the single
        process's delete waits for a save in progress under the product's lock: a task
        already saving finishes, and the delete that follows removes that version too,
        instead of the build bringing a deleted product back."""
        ray.get(self.board.cancel_product.remote(product))
        deadline = time.monotonic() + CANCEL_WAIT_S
        while self.busy_with(product) is not None:
            if time.monotonic() > deadline:
                logger.warning("the build of %s did not end within %.0f s of its cancel; deleting anyway",
                               product, CANCEL_WAIT_S)
                return
            time.sleep(CANCEL_POLL_S)

    def close(self) -> None:
        """Builds belong to the cluster, not to this replica: they go on."""
        super().close()


def _name(index: int, image: Path | np.ndarray) -> str:
    return Path(image).name if isinstance(image, Path | str) else f"image{index}.npy"


def _read(image: Path | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        raise TypeError("cluster builds take image files, not arrays")
    return Path(image).read_bytes()
