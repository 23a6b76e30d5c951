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
from PIL import Image

from app.core.images import decode_for_model
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
    map_size: tuple[int, int]  # (h, w) the heatmap, overlay and regions are computed at
    decode_s: float
    image: np.ndarray | None  # (h, w, 3) uint8 photo at map_size, kept only for overlays


def bounded_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """`size` (H, W) scaled down, aspect kept, so that its longer side is at most `max_side`."""
    height, width = size
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def prepare(product: LoadedProduct, data: bytes, max_pixels: int, keep_image: bool,
            max_map_side: int = 1024) -> PreparedImage:
    """Decode + validate + resize. Blocking CPU work: call from a thread pool.

    Only what the response needs outlives this call: the network input, and for
    an overlay the photo scaled to the bounded map size (never the full frame).
    """
    started = time.perf_counter()
    # JPEGs decode at 1/2-1/8 scale in the DCT domain when the network input (or, for an
    # overlay, the bounded photo) still gets enough pixels: a 6000x6600 JPEG never
    # becomes a 40 MP array. `size` stays the photo's own.
    # A framed product needs its box, not the frame, at the network size.
    framed_need = product.model.framing.min_decode_side(product.embedder.config.image_size)
    need = None if framed_need is None else max(framed_need, max_map_side if keep_image else 0)
    image, size = decode_for_model(data, max_pixels=max_pixels, min_side=need)
    map_size = bounded_size(size, max_map_side)
    # Framed as the product's bank; the box is in original pixels, scaled onto the decoded array.
    tensor = product.model.preprocess([image], [size])[0]
    kept = None
    if keep_image:
        kept = image if image.shape[:2] == map_size else np.asarray(
            Image.fromarray(image).resize((map_size[1], map_size[0]), Image.Resampling.BILINEAR))
    del image
    return PreparedImage(product, tensor, size, map_size, time.perf_counter() - started, kept)


def score_prepared(items: Sequence[PreparedImage]) -> list[Prediction | Exception]:
    """The batch function of the one worker that owns the device (app.core's batch API)."""
    return predict_batch([BatchItem(i.product.model, i.tensor, i.size) for i in items])


def render(prediction: Prediction, prepared: PreparedImage, options: PredictOptions) -> dict:
    """Heatmap PNG and regions for one prediction. Blocking CPU work: use a thread pool."""
    out: dict[str, Any] = {"heatmap": None, "regions": None}
    if not options.renders:
        return out
    height, width = prepared.map_size
    normalised = np.asarray(prediction.normalised_map_at(prepared.map_size), dtype=np.float32)
    if options.heatmap == "png":
        out["heatmap"] = {"kind": "png", "width": width, "height": height,
                          "data": rendering.to_base64(rendering.heatmap_png(normalised,
                                                                             prepared.map_size))}
    elif options.heatmap == "overlay":
        if prepared.image is None:
            raise RuntimeError("overlay needs the decoded image")
        out["heatmap"] = {"kind": "overlay", "width": width, "height": height,
                          "data": rendering.to_base64(rendering.overlay_png(normalised,
                                                                             prepared.image))}
    if options.regions:
        out["regions"] = rendering.find_regions(normalised, to_size=prepared.size)
    return out
