"""The `Predictor`: everything that answers predict requests.

It owns the micro-batcher and its one device worker, the CPU pool that decodes
and renders, the loaded model of every product (`ProductRegistry`) and the
prediction metrics. Created in the lifespan and handed to routes by
`deps.PredictorDep`; `start()` / `close()` bracket its life. Nothing in it
knows about HTTP, so another host (a Ray Serve replica) runs it unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from app.core import device_decode
from app.core.embedding import EmbedderConfig, PatchEmbedder, create_embedder
from app.core.errors import ImageTooLarge, PatchCoreError
from app.core.images import probe_image
from app.core.patchcore import Prediction
from app.service.batching import ClientGoneWaiter, MicroBatcher, Timed, wait_or_give_up
from app.service.budget import DECODE_BYTES_PER_PIXEL, MemoryBudget
from app.service.errors import Overloaded
from app.service.inference import PredictOptions, PreparedImage, prepare, render, score_prepared
from app.service.metrics import ServiceMetrics
from app.service.recent import FlaggedImages, RecentImages
from app.service.registry import EmbedderFactory, FailedProduct, LoadedProduct, ProductRegistry
from app.service.settings import Settings
from app.service.staging import UploadedFile
from app.storage import BankStore

logger = logging.getLogger(__name__)

class Predictor:
    def __init__(self, settings: Settings, store: BankStore, metrics: ServiceMetrics, *,
                 embedder_factory: EmbedderFactory | None = None,
                 flagged: FlaggedImages | None = None):
        self.settings = settings
        self.metrics = metrics
        self.registry = ProductRegistry(store, embedder_factory or self._create_embedder,
                                        on_change=self._banks_changed)
        self.batcher: MicroBatcher[PreparedImage, Prediction] = MicroBatcher(
            functools.partial(score_prepared, on_device_decode=metrics.device_decoded),
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms, queue_size=settings.queue_size, observer=metrics)
        metrics.track_queue(lambda: self.batcher.depth, settings.queue_size)
        # Decode/validate/resize and heatmap rendering: CPU work kept off the event loop.
        self.cpu_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="prepare")
        self.decode_budget = MemoryBudget(settings.decode_memory_mb * 1024 * 1024)
        self.backbone_loaded = False
        self.banks_loaded = False
        self.recent: FlaggedImages = flagged if flagged is not None else RecentImages(
            int(settings.feedback_cache_mb * 1024 * 1024))
        self.device_decode = settings.device_decode

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the batch worker (cheap); `load` does the slow part."""
        self.batcher.start()

    def load(self, retry_unavailable: bool = False) -> None:
        """Load the default backbone, then the active bank of every stored product.

        `retry_unavailable`: a bank the store cannot serve now raises StoreUnavailable (the
        caller retries the whole load) instead of being recorded as failed."""
        embedder = self.registry.embedder(EmbedderConfig())
        self._check_device_decode(embedder.device)
        self.backbone_loaded = True
        for name in sorted(self.registry.store.products()) if self.settings.preload_banks else []:
            self.registry.load(name, raise_unavailable=retry_unavailable)
        self.banks_loaded = True
        if self.registry.failed():
            logger.warning("%d bank(s) failed to load: %s", len(self.registry.failed()),
                           ", ".join(sorted(self.registry.failed())))

    def close(self) -> None:
        self.batcher.stop()
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)

    def checks(self) -> dict[str, bool]:
        return {"backbone_loaded": self.backbone_loaded, "banks_loaded": self.banks_loaded,
                "batch_worker_running": self.batcher.running}

    # ---------------------------------------------------------------- products
    def get(self, name: str) -> LoadedProduct:
        return self.registry.get(name)

    def loaded(self) -> dict[str, LoadedProduct]:
        return self.registry.loaded()

    def failed(self) -> dict[str, FailedProduct]:
        return self.registry.failed()

    def embedder(self, config: EmbedderConfig) -> PatchEmbedder:
        return self.registry.embedder(config)

    # ---------------------------------------------------------------- predict
    async def predict(self, product: str, uploads: Sequence[UploadedFile], options: PredictOptions,
                      client_gone: ClientGoneWaiter | None = None, request_id: str | None = None) -> dict:
        """Prepare in the CPU pool, score through the batcher, render in the pool.

        Flagged images are remembered under `request_id` (bounded) for false-alarm feedback."""
        loaded = self.registry.get(product)
        loop = asyncio.get_running_loop()
        keep = options.heatmap == "overlay"
        settings = self.settings
        # PATCHCORE_REQUEST_TIMEOUT_S bounds the whole request: every wait below (the CPU pool
        # for headers, decodes and renders, and the batch queue) gets the time that is left,
        # and a client that hangs up meanwhile ends the wait (its work not yet started in the
        # pool is dropped with it).
        deadline = loop.time() + settings.request_timeout_s

        def in_time(work: Awaitable[Any]) -> Awaitable[Any]:
            return wait_or_give_up(work, deadline - loop.time(), client_gone,
                                   f"no result within {settings.request_timeout_s:g} s")

        # In the pool: PIL parses every chunk before the pixels, and a crafted body (millions
        # of empty PNG chunks or JPEG comments) would hold the event loop, and every probe, for seconds.
        pixels = await in_time(loop.run_in_executor(self.cpu_pool, self._check_pixel_budget, uploads))
        device_decode = self.decodes_on_device(loaded)

        def prepare_one(index: int, upload: UploadedFile) -> PreparedImage:
            label = f"image {index} ({_shown(upload.filename)})"
            try:
                with self.decode_budget.reserve(pixels[index] * DECODE_BYTES_PER_PIXEL,
                                                timeout=settings.request_timeout_s):
                    return prepare(loaded, upload.data, settings.max_image_pixels, keep,
                                   settings.max_heatmap_side, device_decode, label)
            except PatchCoreError as exc:
                raise type(exc)(f"{label}: {exc}") from exc

        # Queue slots are reserved before anything is decoded (a full queue answers 429
        # at once), and the request is marked as on its way while it is prepared, so the
        # worker keeps an open batch waiting for it; submit_many releases both.
        try:
            with self.batcher.incoming(len(uploads)) as mark:
                prepared = await in_time(asyncio.gather(
                    *(loop.run_in_executor(self.cpu_pool, prepare_one, i, u)
                      for i, u in enumerate(uploads))))
                # A client that hangs up abandons its tickets: the worker skips them and
                # counts them (patchcore_dropped_images_total), once.
                scored = await self.batcher.submit_many(
                    prepared, max(deadline - loop.time(), 0.001), client_gone, incoming=mark)
        except Overloaded:
            self.metrics.rejected.inc()
            raise

        def finish(index: int) -> dict:
            return _result(index, uploads[index], prepared[index], scored[index], loaded.version,
                           options)

        if options.renders:
            results = await in_time(asyncio.gather(
                *(loop.run_in_executor(self.cpu_pool, finish, i) for i in range(len(prepared)))))
        else:
            # Nothing to render: a few float conversions, cheaper than a hop to the pool,
            # where the result would also queue behind other requests' decodes.
            results = [finish(i) for i in range(len(prepared))]
        self.metrics.images.labels(loaded.name).inc(len(results))
        anomalous = sum(1 for r in results if r["is_anomalous"])
        for index, result in enumerate(results):
            if result["is_anomalous"]:
                self.recent.remember(request_id, index, loaded.name, uploads[index])
        if anomalous:
            self.metrics.anomalous.labels(loaded.name).inc(anomalous)
        return {"product": loaded.name, "results": results}

    def _check_device_decode(self, device: torch.device) -> None:
        """Decode one frame on the device before serving: where that fails (a torchvision
        without nvJPEG, a driver problem), JPEG bodies decode on the CPU, and the log says why."""
        if not self._decodes_on(device):
            return
        problem = device_decode.probe(device)
        if problem is not None:
            logger.warning("JPEG bodies decode on the CPU: the %s device cannot decode them (%s)",
                           device, problem)
            self.device_decode = "off"
        else:
            logger.info("JPEG bodies decode on the %s device (PATCHCORE_DEVICE_DECODE=%s)", device,
                        self.device_decode)

    def decodes_on_device(self, loaded: LoadedProduct) -> bool:
        """Whether this product's JPEG bodies are decoded by the batch worker on its device."""
        return self._decodes_on(loaded.embedder.device)

    def _decodes_on(self, device: torch.device) -> bool:
        """PATCHCORE_DEVICE_DECODE applied to a device: "auto" means a CUDA device."""
        return self.device_decode == "always" or (self.device_decode == "auto" and device.type == "cuda")

    # ---------------------------------------------------------------- internals
    def _check_pixel_budget(self, uploads: Sequence[UploadedFile]) -> list[int]:
        """Formats and pixel counts from the headers, before any pixel is decoded: with the
        per-image limit this bounds what one request can make the process allocate.
        Returns each image's pixel count."""
        counts: list[int] = []
        for index, upload in enumerate(uploads):
            try:
                _, width, height = probe_image(upload.data)
            except PatchCoreError as exc:
                raise type(exc)(f"image {index} ({_shown(upload.filename)}): {exc}") from exc
            if width * height > self.settings.max_image_pixels:
                raise ImageTooLarge(
                    f"image {index} ({_shown(upload.filename)}) is {width}x{height} = "
                    f"{width * height} pixels, more than the limit of "
                    f"{self.settings.max_image_pixels}")
            counts.append(width * height)
        total = sum(counts)
        if total > self.settings.max_request_pixels:
            raise ImageTooLarge(f"the request's images hold {total} pixels in all, more than the "
                                f"limit of {self.settings.max_request_pixels} per request")
        return counts

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


def _shown(filename: str | None) -> str:
    """A client's file name for an error message: its own words, bounded."""
    return repr((filename or "unnamed")[:100])


def _result(index: int, upload: UploadedFile, item: PreparedImage, timed: Timed[Prediction],
            version: str, options: PredictOptions) -> dict:
    started = time.perf_counter()
    p = timed.value
    drawn = render(p, item, options)
    height, width = item.size
    return {
        "index": index, "filename": upload.filename, "width": width, "height": height,
        "raw_score": float(p.raw_score), "score": float(p.score),
        "threshold": float(p.threshold), "is_anomalous": bool(p.is_anomalous),
        "bank_version": version, **drawn,
        "timings": {"decode_ms": item.decode_s * 1000, "queued_ms": timed.queued_s * 1000,
                    "compute_ms": timed.compute_s * 1000,
                    "render_ms": (time.perf_counter() - started) * 1000,
                    "batch_size": timed.batch_size},
    }

