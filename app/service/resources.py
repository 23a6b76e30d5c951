"""The service's resources, created in the FastAPI lifespan and closed after it.

    store     BankStore        where banks live (app.storage)
    predictor Predictor        batcher, CPU pool, loaded models, prediction metrics
    staging   StagingArea      uploaded nominal images per product
    catalog   ProductCatalog   the one writer of products (publish, activate, delete)
    jobs      JobRunner        background builds

Routes get each through its own dependency (app.service.deps). Opening is
cheap; the slow part (backbone, banks, the demo bank on a fresh machine) runs in
a background thread, so /health/live answers at once and /health/ready says 503
until it is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.service.catalog import ProductCatalog
from app.service.jobs import BuildParams, JobRunner
from app.service.metrics import ServiceMetrics
from app.service.predictor import Predictor
from app.service.recent import FlaggedImages
from app.service.registry import EmbedderFactory
from app.service.settings import Settings
from app.service.staging import StagingArea
from app.service.watch import PointerWatcher
from app.storage import BankStore, StoreUnavailable
from app.storage import create_store as create_bank_store

logger = logging.getLogger(__name__)

# Another host's build runner (Ray: builds as cluster tasks) in place of the in-process one.
JobsFactory = Callable[[ProductCatalog, Predictor, Settings], JobRunner]
# A memory of flagged images shared by several processes (Ray: a detached actor) in place of
# the process's own.
FlaggedFactory = Callable[[Settings], FlaggedImages]

DEMO_PRODUCT = "demo"
# How often the store is pinged for readiness: often while it is down, rarely while it is up.
STORE_RETRY_S = 1.0
STORE_CHECK_S = 10.0
STARTUP_LOAD_ATTEMPTS = 5  # bank loads that raise "unavailable" are retried this often at start


def create_store(settings: Settings) -> BankStore:
    """The configured bank store (local directory or S3); never touches the network."""
    settings.models_dir.mkdir(parents=True, exist_ok=True)  # staging (and the S3 cache) live here too
    return create_bank_store(settings)


class StoreWatch:
    """Pings the store in a background thread, so readiness reflects an outage without blocking a request."""

    def __init__(self, store: BankStore):
        self.store = store
        self.reachable = False
        self.error: str | None = None
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        with self._changed:
            self._changed.notify_all()

    def check(self) -> bool:
        try:
            self.store.ping()
        except StoreUnavailable as exc:
            if self.reachable or self.error is None:
                logger.error("bank store unavailable: %s", exc)
            self.reachable, self.error = False, str(exc)
        else:
            if not self.reachable and self.error is not None:
                logger.info("bank store reachable again")
            self.reachable, self.error = True, None
        with self._changed:
            self._changed.notify_all()
        return self.reachable

    def pause(self, seconds: float) -> None:
        """Sleep, waking early when the service closes."""
        self._closed.wait(seconds)

    def wait_reachable(self) -> bool:
        """Block until the store answers (True) or the service closes (False)."""
        with self._changed:
            while not self.reachable and not self._closed.is_set():
                self._changed.wait(STORE_RETRY_S)
        return self.reachable

    def _run(self) -> None:
        while not self._closed.is_set():
            self._closed.wait(STORE_CHECK_S if self.check() else STORE_RETRY_S)


def _demo_images() -> list[Path] | None:
    """The packaged demo images, or None when app.demo is not installed."""
    try:
        from app.demo import demo_nominal_images
    except ImportError:
        return None
    images = list(demo_nominal_images())
    return images or None


@dataclass
class Startup:
    """The background part of opening: its state is part of readiness."""

    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    started_at: float = field(default_factory=time.time)

    @property
    def complete(self) -> bool:
        return self.done.is_set() and self.error is None


@dataclass
class Resources:
    settings: Settings
    metrics: ServiceMetrics
    store: BankStore
    predictor: Predictor
    staging: StagingArea
    catalog: ProductCatalog
    jobs: JobRunner
    store_watch: StoreWatch
    watcher: PointerWatcher
    startup: Startup = field(default_factory=Startup)

    @classmethod
    def open(cls, settings: Settings, *, store: BankStore | None = None,
             embedder_factory: EmbedderFactory | None = None,
             jobs_factory: JobsFactory | None = None,
             flagged_factory: FlaggedFactory | None = None) -> Resources:
        metrics = ServiceMetrics()
        store = store if store is not None else create_store(settings)
        predictor = Predictor(settings, store, metrics, embedder_factory=embedder_factory,
                              flagged=flagged_factory(settings) if flagged_factory is not None else None)
        staging = StagingArea(
            settings.staging_dir, max_image_pixels=settings.max_image_pixels,
            max_images=settings.max_staging_images,
            max_zip_uncompressed_bytes=int(settings.max_zip_uncompressed_mb * 1024 * 1024),
            max_zip_ratio=settings.max_zip_ratio)
        catalog = ProductCatalog(store, predictor, staging)
        if jobs_factory is not None:
            jobs = jobs_factory(catalog, predictor, settings)
        else:
            jobs = JobRunner(catalog, predictor.embedder, max_finished=settings.max_finished_jobs,
                             min_images=settings.min_build_images, records_dir=settings.jobs_dir,
                             on_change=metrics.set_jobs, on_finished=metrics.build_finished)
        watcher = PointerWatcher(predictor.registry, settings.watch_interval_s, install_guard=catalog.writing)
        resources = cls(settings, metrics, store, predictor, staging, catalog, jobs, StoreWatch(store),
                        watcher)
        predictor.start()
        resources.store_watch.start()
        watcher.start()
        threading.Thread(target=resources._load, name="startup", daemon=True).start()
        return resources

    def close(self) -> None:
        self.watcher.close()
        self.store_watch.close()
        self.jobs.close()
        self.predictor.close()

    def wait_started(self, timeout: float | None = None) -> bool:
        return self.startup.done.wait(timeout)

    def checks(self) -> dict[str, bool]:
        return {**self.predictor.checks(), "store_reachable": self.store_watch.reachable,
                "startup_complete": self.startup.complete}

    @property
    def ready(self) -> bool:
        return all(self.checks().values())

    def _load(self) -> None:
        try:
            # A store that is down at start (or goes down while banks load) delays readiness, never ends it.
            # A bank read that fails as unavailable is retried too (one timed-out S3 GET must not
            # fail a product for good); after a few tries with the store answering its probe, the
            # products that still cannot be read are recorded as failed and the rest serve.
            attempts = 0
            while self.store_watch.wait_reachable():
                attempts += 1
                try:
                    self.predictor.load(retry_unavailable=attempts < STARTUP_LOAD_ATTEMPTS)
                    break
                except StoreUnavailable as exc:
                    self.store_watch.check()
                    logger.warning("bank store unavailable while loading banks (%s); retrying", exc)
                    self.store_watch.pause(STORE_RETRY_S)
            else:
                return
            self._build_demo_if_missing()
        except Exception as exc:
            # Shown by /health/ready: an OSError's reason without its path (the log has both).
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            self.startup.error = f"{type(exc).__name__}: {reason}"
            logger.exception("startup failed")
        finally:
            self.startup.done.set()

    def _build_demo_if_missing(self) -> None:
        if not self.settings.demo or DEMO_PRODUCT in set(self.store.products()):
            return
        images = _demo_images()
        if images is None:
            logger.warning("PATCHCORE_DEMO is on but app.demo has no images; no demo product")
            return
        logger.info("building the demo bank from %d packaged images", len(images))
        job = self.jobs.submit(DEMO_PRODUCT, BuildParams(), lambda: images, source="demo")
        while job.active:
            time.sleep(0.1)
        if job.state != "succeeded":
            logger.error("demo bank build %s: %s", job.state, job.error)
