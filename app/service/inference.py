"""The predict pipeline around the batcher: prepare (thread pool) -> batch (worker) -> render.

`run_batch` is the batch function of the one worker that owns the device: the
backbone runs once per EmbedderConfig group, whatever products the images are
for, then each product's kNN runs on its slice of the features.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.core.errors import PatchCoreError
from app.core.images import decode_image
from app.service import rendering
from app.service.batching import MicroBatcher
from app.service.errors import ClientGone, Overloaded
from app.service.metrics import ServiceMetrics
from app.service.registry import LoadedProduct


@dataclass(frozen=True)
class PreparedImage:
    """One decoded, validated and resized image, tied to the model that admitted it."""

    product: LoadedProduct
    tensor: torch.Tensor  # (3, S, S) float32, normalised
    size: tuple[int, int]  # original (H, W)
    decode_s: float
    image: np.ndarray | None  # (H, W, 3) uint8, kept only for overlays


def prepare(product: LoadedProduct, data: bytes, max_pixels: int,
            keep_image: bool) -> PreparedImage:
    """Decode + validate + resize. Blocking CPU work: call from a thread pool."""
    started = time.perf_counter()
    image = decode_image(data, max_pixels=max_pixels)
    tensor = product.embedder.preprocess([image])[0]
    return PreparedImage(product, tensor, (int(image.shape[0]), int(image.shape[1])),
                         time.perf_counter() - started, image if keep_image else None)


def run_batch(items: Sequence[PreparedImage]) -> list[Any]:
    """Score a batch; returns one Prediction (or the exception that failed it) per item."""
    results: list[Any] = [None] * len(items)
    by_embedder: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        by_embedder.setdefault(id(item.product.embedder), []).append(index)
    for indices in by_embedder.values():
        embedder = items[indices[0]].product.embedder
        try:
            features = embedder.embed(torch.stack([items[i].tensor for i in indices]))
        except Exception as exc:
            for i in indices:
                results[i] = exc
            continue
        by_model: dict[int, list[int]] = {}
        for position, i in enumerate(indices):
            by_model.setdefault(id(items[i].product.model), []).append(position)
        for positions in by_model.values():
            model = items[indices[positions[0]]].product.model
            try:
                predictions = model.predict_embeddings(
                    features[positions], [items[indices[p]].size for p in positions])
                if len(predictions) != len(positions):
                    raise RuntimeError("predict_embeddings returned the wrong number of results")
            except Exception as exc:
                predictions = [exc] * len(positions)
            for p, prediction in zip(positions, predictions, strict=True):
                results[indices[p]] = prediction
    return results


def render(prediction: Any, prepared: PreparedImage, heatmap: str, regions: bool) -> dict:
    """Heatmap PNG and regions for one prediction. Blocking CPU work: use a thread pool."""
    out: dict[str, Any] = {"heatmap": None, "regions": None}
    height, width = prepared.size
    normalised = np.asarray(prediction.normalised_map, dtype=np.float32)
    if heatmap == "png":
        out["heatmap"] = {"kind": "png", "width": width, "height": height,
                          "data": rendering.to_base64(rendering.heatmap_png(normalised,
                                                                             prepared.size))}
    elif heatmap == "overlay":
        if prepared.image is None:
            raise RuntimeError("overlay needs the decoded image")
        out["heatmap"] = {"kind": "overlay", "width": width, "height": height,
                          "data": rendering.to_base64(rendering.overlay_png(normalised,
                                                                             prepared.image))}
    if regions:
        out["regions"] = rendering.find_regions(normalised, prepared.size)
    return out


async def predict_uploads(
    *, loaded: LoadedProduct, uploads: Sequence[Any], heatmap: str, regions: bool,
    pool: Executor, batcher: MicroBatcher, max_pixels: int, timeout_s: float,
    metrics: ServiceMetrics, is_disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> dict:
    """Prepare in `pool`, score through the batcher, render in `pool`. Returns the response."""
    loop = asyncio.get_running_loop()
    keep = heatmap == "overlay"

    def prepare_one(index: int, upload: Any) -> PreparedImage:
        try:
            return prepare(loaded, upload.data, max_pixels, keep)
        except PatchCoreError as exc:
            raise type(exc)(f"image {index} ({upload.filename}): {exc}") from exc

    # Marked as on its way while it is prepared, so the worker keeps an open batch
    # waiting for it; submit_many releases the mark as it queues the images.
    with batcher.incoming() as mark:
        prepared = await asyncio.gather(
            *(loop.run_in_executor(pool, prepare_one, i, u) for i, u in enumerate(uploads)))
        try:
            scored = await batcher.submit_many(prepared, timeout_s, is_disconnected,
                                               incoming=mark)
        except Overloaded:
            metrics.rejected.inc()
            raise
        except ClientGone:
            metrics.dropped_images("client_gone", len(prepared))
            raise

    def finish(index: int) -> dict:
        started = time.perf_counter()
        timed, item, upload = scored[index], prepared[index], uploads[index]
        p = timed.value
        drawn = render(p, item, heatmap, regions)
        height, width = item.size
        return {
            "index": index, "filename": upload.filename, "width": width, "height": height,
            "raw_score": float(p.raw_score), "score": float(p.score),
            "threshold": float(p.threshold), "is_anomalous": bool(p.is_anomalous),
            "bank_version": loaded.version, **drawn,
            "timings": {"decode_ms": item.decode_s * 1000, "queued_ms": timed.queued_s * 1000,
                        "compute_ms": timed.compute_s * 1000,
                        "render_ms": (time.perf_counter() - started) * 1000,
                        "batch_size": timed.batch_size},
        }

    if heatmap == "none" and not regions:
        # Nothing to render: a few float conversions, cheaper than a hop to the pool,
        # where the result would also queue behind other requests' decodes.
        results = [finish(i) for i in range(len(prepared))]
    else:
        results = await asyncio.gather(
            *(loop.run_in_executor(pool, finish, i) for i in range(len(prepared))))
    metrics.images.labels(loaded.name).inc(len(results))
    anomalous = sum(1 for r in results if r["is_anomalous"])
    if anomalous:
        metrics.anomalous.labels(loaded.name).inc(anomalous)
    return {"product": loaded.name, "results": results}
