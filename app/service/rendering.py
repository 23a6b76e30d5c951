"""Heatmaps and anomalous regions from a normalised anomaly map (pure numpy / PIL).

normalised_map is (h, w) float32 laid over the photo (at its size, or scaled to a
bounded size with the same aspect), 0.5 = threshold.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

REGION_THRESHOLD = 0.5
# Maps [0, 1] to colour; 0.5 (the threshold) sits where green turns to yellow.
_JET_STOPS = np.array(
    [
        [0.00, 0, 0, 128],
        [0.15, 0, 0, 255],
        [0.35, 0, 255, 255],
        [0.50, 128, 255, 128],
        [0.65, 255, 255, 0],
        [0.85, 255, 0, 0],
        [1.00, 128, 0, 0],
    ],
    dtype=np.float64,
)


def _colour_lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    channels = [np.interp(x, _JET_STOPS[:, 0], _JET_STOPS[:, c]) for c in (1, 2, 3)]
    return np.stack(channels, axis=1).round().astype(np.uint8)


COLOUR_LUT = _colour_lut()  # (256, 3) uint8


def _fit(normalised_map: np.ndarray, height: int, width: int) -> np.ndarray:
    if normalised_map.ndim != 2:
        raise ValueError(f"expected a 2-D anomaly map, got shape {normalised_map.shape}")
    if normalised_map.shape == (height, width):
        return normalised_map
    resized = Image.fromarray(np.ascontiguousarray(normalised_map, dtype=np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def colourise(normalised_map: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] (clipped) -> (H, W, 3) uint8."""
    index = np.clip(np.nan_to_num(normalised_map, nan=0.0), 0.0, 1.0) * 255.0
    return COLOUR_LUT[index.round().astype(np.uint8)]


def heatmap_png(normalised_map: np.ndarray, size: tuple[int, int]) -> bytes:
    """Colour-mapped anomaly map at size (H, W), encoded as PNG."""
    return _png(colourise(_fit(normalised_map, *size)))


def overlay_png(normalised_map: np.ndarray, image: np.ndarray, alpha: float = 0.5) -> bytes:
    """Heatmap blended over the photo (H, W, 3) uint8, encoded as PNG."""
    height, width = image.shape[:2]
    heat = colourise(_fit(normalised_map, height, width)).astype(np.float32)
    blended = image.astype(np.float32) * (1.0 - alpha) + heat * alpha
    return _png(np.clip(blended, 0, 255).astype(np.uint8))


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Level 1: a fraction of the default's CPU time for slightly larger files.
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def find_regions(normalised_map: np.ndarray, size: tuple[int, int] | None = None,
                 threshold: float = REGION_THRESHOLD, max_regions: int = 100,
                 to_size: tuple[int, int] | None = None) -> list[dict]:
    """8-connected regions where the map exceeds `threshold`, largest first.

    Each: {"bbox": {"x", "y", "width", "height"}, "area": pixels, "max_score"}.
    `size` resizes the map before labelling; `to_size` (H, W) instead labels the map
    as it is and scales boxes and areas to a photo of that size (the map lies over it).
    """
    scores = normalised_map if size is None else _fit(normalised_map, *size)
    sy = sx = 1.0
    if to_size is not None:
        sy, sx = to_size[0] / scores.shape[0], to_size[1] / scores.shape[1]
    mask = scores > threshold
    if not mask.any():
        return []
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(mask, labels, index)
    peaks = ndimage.maximum(scores, labels, index)
    regions: list[dict[str, Any]] = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        rows, cols = box
        x0, y0 = int(cols.start * sx), int(rows.start * sy)
        x1, y1 = int(np.ceil(cols.stop * sx)), int(np.ceil(rows.stop * sy))
        regions.append({
            "bbox": {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0},
            "area": int(round(areas[label - 1] * sx * sy)),
            "max_score": float(peaks[label - 1]),
        })
    regions.sort(key=lambda r: int(r["area"]), reverse=True)
    return regions[:max_regions]
