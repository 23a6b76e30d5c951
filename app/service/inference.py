"""The steps of one predict around the batcher: prepare (thread pool) -> score (worker) -> render.

Plain functions on typed values; the `Predictor` strings them together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from app.core.device_decode import decode_to_network_input, device_jpeg_size
from app.core.errors import PatchCoreError
from app.core.framing import Box
from app.core.images import decode_for_model
from app.core.patchcore import BatchItem, Prediction, predict_batch
from app.service import rendering
from app.service.registry import LoadedProduct

logger = logging.getLogger(__name__)

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
    """One validated image, tied to the model that admitted it: decoded and resized on
    the CPU (`tensor`), or a JPEG left encoded for the batch worker to decode on the
    model's device (`encoded`, app.core.device_decode)."""

    product: LoadedProduct
    tensor: torch.Tensor | None  # (3, S, S) float32, normalised; None while encoded
    size: tuple[int, int]  # original (H, W)
    map_size: tuple[int, int]  # (h, w) the heatmap, overlay and regions are computed at
    decode_s: float
    image: np.ndarray | None  # (h, w, 3) uint8 photo at map_size, kept only for overlays
    encoded: bytes | None = None  # a plain JPEG for the device decoder
    label: str = "image"  # how an error names it to the client, e.g. "image 1 ('a.jpg')"


def bounded_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """`size` (H, W) scaled down, aspect kept, so that its longer side is at most `max_side`."""
    height, width = size
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def prepare(product: LoadedProduct, data: bytes, max_pixels: int, keep_image: bool,
            max_map_side: int = 1024, device_decode: bool = False, label: str = "image") -> PreparedImage:
    """Decode + validate + resize. Blocking CPU work: call from a thread pool.

    Only what the response needs outlives this call: the network input, and for
    an overlay the photo scaled to the bounded map size (never the full frame).
    With `device_decode`, a plain JPEG is only checked here and stays encoded for the
    batch worker, which decodes it on the model's device (`score_prepared`); an overlay
    needs the photo on the CPU, so it never goes that way.
    """
    started = time.perf_counter()
    if device_decode and not keep_image:
        size = device_jpeg_size(data)
        if size is not None and _frames(product, size):
            return PreparedImage(product, None, size, bounded_size(size, max_map_side),
                                 time.perf_counter() - started, None, encoded=data, label=label)
    return _prepare_on_cpu(product, data, max_pixels, keep_image, max_map_side, started)


def _prepare_on_cpu(product: LoadedProduct, data: bytes, max_pixels: int | None, keep_image: bool,
                    max_map_side: int, started: float) -> PreparedImage:
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


def score_prepared(items: Sequence[PreparedImage],
                   on_device_decode: Callable[[int, int], None] | None = None) -> list[Prediction | Exception]:
    """The batch function of the one worker that owns the device (app.core's batch API).

    JPEGs left encoded are decoded on their model's device first, one decoder call for
    all of the batch's images that share a backbone configuration; a frame the device
    decoder refuses is decoded on the CPU here, and one the CPU refuses too fails alone
    (its client gets the CPU path's 4xx).
    `on_device_decode(decoded, fell_back)` hears how many took each way (metrics)."""
    tensors: list[torch.Tensor | Exception | None] = [i.tensor for i in items]
    by_embedder: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        if item.encoded is not None:
            by_embedder.setdefault(id(item.product.embedder), []).append(index)
    for indices in by_embedder.values():
        embedder = items[indices[0]].product.embedder
        try:
            decoded = decode_to_network_input(
                [(items[i].encoded or b"", items[i].size, _framed_box(items[i])) for i in indices],
                embedder.device, embedder.preprocess_decoded,
                shapes=[items[i].product.model.framing.input_shape_for(items[i].size, embedder.config.image_size)
                        for i in indices])
        except Exception as exc:  # e.g. out of device memory: these frames go to the CPU
            logger.warning("device JPEG decode failed for %d image(s), decoding on the CPU: %s",
                           len(indices), exc)
            decoded = [None] * len(indices)
        for i, tensor in zip(indices, decoded, strict=True):
            tensors[i] = tensor if tensor is not None else _decode_on_cpu(items[i])
        if on_device_decode is not None:
            fell_back = sum(1 for tensor in decoded if tensor is None)
            on_device_decode(len(indices) - fell_back, fell_back)
    results: list[Prediction | Exception | None] = [None] * len(items)
    ready = [i for i, t in enumerate(tensors) if isinstance(t, torch.Tensor)]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            results[i] = t if isinstance(t, Exception) else RuntimeError("image was not prepared")
    scored = predict_batch([BatchItem(items[i].product.model, tensors[i], items[i].size)  # type: ignore[arg-type]
                            for i in ready])
    for i, result in zip(ready, scored, strict=True):
        results[i] = result
    return [r if r is not None else RuntimeError("item was not scored") for r in results]


def _frames(product: LoadedProduct, size: tuple[int, int]) -> bool:
    """False when the product's region of interest misses a frame of this size: the CPU
    path then refuses the image with the reason."""
    try:
        product.model.framing.box(*size)
    except ValueError:
        return False
    return True


def _framed_box(item: PreparedImage) -> Box | None:
    framing = item.product.model.framing
    return None if framing.is_whole() else framing.box(*item.size)


def _decode_on_cpu(item: PreparedImage) -> torch.Tensor | Exception:
    """The CPU path for a JPEG the device decoder refused: its tensor, or the error its
    client gets (the pixel limit was checked from the header before it was queued)."""
    try:
        prepared = _prepare_on_cpu(item.product, item.encoded or b"", None, False, max(item.map_size),
                                   time.perf_counter())
    except PatchCoreError as exc:  # the client's image: named as the CPU path names it
        return type(exc)(f"{item.label}: {exc}")
    except Exception as exc:  # noqa: BLE001 - the item's own answer, as any scoring error
        return exc
    return prepared.tensor if prepared.tensor is not None else RuntimeError("image was not prepared")


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
        out["regions"] = rendering.find_regions(region_map(prediction, normalised, prepared.map_size),
                                                to_size=prepared.size)
    return out


def region_map(prediction: Prediction, normalised: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The normalised map regions are cut from at the threshold (0.5): the heatmap itself,
    except for an anomalous image whose map peaks under it.

    The decision is the largest patch distance (Eq. 6); the map is those distances
    upsampled and smoothed (Sec. 3.3), which spreads a one- or two-patch peak below the
    threshold, even below the nominal median where the normalised map is clipped to 0, so
    a flagged part had no region (10 of 12 flagged transistor test images in one review
    run). There the raw map is scaled so that its peak is the image's score, and the
    region around the patch that decided is the one above the threshold; its max_score is
    the image's score.
    """
    if not prediction.is_anomalous or float(normalised.max(initial=0.0)) > rendering.REGION_THRESHOLD:
        return normalised
    raw = prediction.raw_map_at(size)
    peak = float(raw.max(initial=0.0))
    if peak <= 0.0:
        return normalised
    return prediction.calibration.normalise(raw * (prediction.raw_score / peak)).astype(np.float32)
