"""Everything the service holds while it runs, on one object kept at `app.state.service`.

Startup (loading the backbone and every bank, and building the demo bank on a
fresh machine) runs in a background thread, so /health/live answers at once
and /health/ready says 503 until it is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from app.core.embedding import EmbedderConfig, PatchEmbedder, create_embedder
from app.service.batching import MicroBatcher
from app.service.inference import run_batch
from app.service.jobs import BuildParams, JobManager
from app.service.metrics import ServiceMetrics
from app.service.registry import ProductRegistry
from app.service.settings import Settings
from app.service.staging import StagingArea

logger = logging.getLogger(__name__)

DEMO_PRODUCT = "demo"


def _demo_images() -> list[Path] | None:
    """The packaged demo images, or None when app.demo is not installed."""
    try:
        from app.demo import demo_nominal_images
    except ImportError:
        return None
    images = list(demo_nominal_images())
    return images or None


def _default_store(settings: Settings) -> Any:
    from app.storage import LocalBankStore

    return LocalBankStore(settings.models_dir)


class ServiceState:
    def __init__(self, settings: Settings, *, store: Any = None,
                 embedder_factory: Callable[[EmbedderConfig], PatchEmbedder] | None = None):
        self.settings = settings
        self.metrics = ServiceMetrics()
        settings.models_dir.mkdir(parents=True, exist_ok=True)
        self.store = store if store is not None else _default_store(settings)
        self.registry = ProductRegistry(self.store, embedder_factory or self._create_embedder,
                                        on_change=self._banks_changed)
        self.batcher: MicroBatcher = MicroBatcher(
            run_batch, max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size, observer=self.metrics)
        self.metrics.track_queue(lambda: self.batcher.depth, settings.queue_size)
        self.jobs = JobManager(self.registry, self.store, max_finished=settings.max_finished_jobs,
                               on_change=self.metrics.set_jobs)
        self.staging = StagingArea(
            settings.staging_dir, max_image_pixels=settings.max_image_pixels,
            max_images=settings.max_staging_images,
            max_zip_uncompressed_bytes=int(settings.max_zip_uncompressed_mb * 1024 * 1024),
            max_zip_ratio=settings.max_zip_ratio)
        # Decode/validate/resize and heatmap rendering: CPU work kept off the event loop.
        self.cpu_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="prepare")
        self.started_at = time.time()
        self.backbone_loaded = False
        self.banks_loaded = False
        self.startup_error: str | None = None
        self._startup_done = threading.Event()
        self._startup_thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.batcher.start()
        self._startup_thread = threading.Thread(target=self._startup, name="startup",
                                                daemon=True)
        self._startup_thread.start()

    def stop(self) -> None:
        self.jobs.shutdown()
        self.batcher.stop()
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)

    def wait_started(self, timeout: float | None = None) -> bool:
        return self._startup_done.wait(timeout)

    def _startup(self) -> None:
        try:
            self.registry.embedder(EmbedderConfig())
            self.backbone_loaded = True
            self.registry.load_all()
            self.banks_loaded = True
            if self.registry.failed():
                logger.warning("%d bank(s) failed to load: %s", len(self.registry.failed()),
                               ", ".join(sorted(self.registry.failed())))
            self._build_demo_if_missing()
        except Exception as exc:
            self.startup_error = f"{type(exc).__name__}: {exc}"
            logger.exception("startup failed")
        finally:
            self._startup_done.set()

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

    def _create_embedder(self, config: EmbedderConfig) -> PatchEmbedder:
        logger.info("loading backbone %s on %s", config.backbone, self.settings.device)
        # PATCHCORE_WEIGHTS_PATH is for the default backbone only.
        weights = self.settings.weights_path if config.backbone == EmbedderConfig().backbone \
            else None
        return create_embedder(config, device=self.settings.device, weights_path=weights)

    def _banks_changed(self) -> None:
        self.metrics.set_banks(
            {name: (p.version, int(p.info["bank_size"])) for name, p in
             self.registry.loaded().items()}, len(self.registry.failed()))

    # ---------------------------------------------------------------- readiness
    def checks(self) -> dict[str, bool]:
        return {
            "backbone_loaded": self.backbone_loaded,
            "banks_loaded": self.banks_loaded,
            "batch_worker_running": self.batcher.running,
            "startup_complete": self._startup_done.is_set() and self.startup_error is None,
        }

    @property
    def ready(self) -> bool:
        return all(self.checks().values())
