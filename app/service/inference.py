"""The steps of one predict around the batcher: prepare (thread pool) -> score (worker) -> render.

Plain functions on typed values; the `Predictor` strings them together.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from app.core.images import decode_image
from app.core.patchcore import BatchItem, Prediction, predict_batch
from app.service import rendering
from app.service.registry import LoadedProduct

HeatmapKind = Literal["none", "png", "overlay"]


@dataclass(frozen=True)
class PredictOptions:
    heatmap: HeatmapKind = "png"
    regions: bool = False

    @property
    def renders(self) -> bool:
        return self.heatmap != "none" or self.regions


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


def score_prepared(items: Sequence[PreparedImage]) -> list[Prediction | Exception]:
    """The batch function of the one worker that owns the device (app.core's batch API)."""
    return predict_batch([BatchItem(i.product.model, i.tensor, i.size) for i in items])


def render(prediction: Prediction, prepared: PreparedImage, options: PredictOptions) -> dict:
    """Heatmap PNG and regions for one prediction. Blocking CPU work: use a thread pool."""
    out: dict[str, Any] = {"heatmap": None, "regions": None}
    if not options.renders:
        return out
    height, width = prepared.size
    normalised = np.asarray(prediction.normalised_map, dtype=np.float32)
    if options.heatmap == "png":
        out["heatmap"] = {"kind": "png", "width": width, "height": height,
                          "data": rendering.to_base64(rendering.heatmap_png(normalised,
                                                                             prepared.size))}
    elif options.heatmap == "overlay":
        if prepared.image is None:
            raise RuntimeError("overlay needs the decoded image")
        out["heatmap"] = {"kind": "overlay", "width": width, "height": height,
                          "data": rendering.to_base64(rendering.overlay_png(normalised,
                                                                             prepared.image))}
    if options.regions:
        out["regions"] = rendering.find_regions(normalised, prepared.size)
    return out
