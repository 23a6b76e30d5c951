from __future__ import annotations

import io

import numpy as np
from PIL import Image

from app.service import rendering


def test_regions_are_connected_components_above_threshold():
    scores = np.zeros((40, 60), dtype=np.float32)
    scores[5:10, 10:20] = 0.9  # 5 x 10 = 50 px
    scores[30:32, 50:53] = 0.7  # 2 x 3 = 6 px
    scores[20, 20] = 0.5  # exactly the threshold: not anomalous
    regions = rendering.find_regions(scores)
    assert [r["area"] for r in regions] == [50, 6]
    assert regions[0]["bbox"] == {"x": 10, "y": 5, "width": 10, "height": 5}
    assert regions[1]["bbox"] == {"x": 50, "y": 30, "width": 3, "height": 2}
    assert np.isclose(regions[0]["max_score"], 0.9)


def test_diagonal_pixels_are_one_region_and_empty_map_has_none():
    scores = np.zeros((5, 5), dtype=np.float32)
    scores[0, 0] = scores[1, 1] = scores[2, 2] = 1.0
    assert len(rendering.find_regions(scores)) == 1
    assert rendering.find_regions(np.zeros((5, 5), dtype=np.float32)) == []


def test_regions_are_reported_at_the_requested_size():
    scores = np.zeros((10, 10), dtype=np.float32)
    scores[:, 5:] = 1.0
    regions = rendering.find_regions(scores, size=(100, 200))
    assert len(regions) == 1
    box = regions[0]["bbox"]
    assert box["height"] == 100 and 90 <= box["x"] <= 110 and box["x"] + box["width"] == 200


def test_heatmap_png_has_the_original_size_and_threshold_colours():
    scores = np.linspace(0, 1, 64 * 32, dtype=np.float32).reshape(32, 64)
    png = rendering.heatmap_png(scores, (90, 120))
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (120, 90) and image.mode == "RGB"
    low, high = rendering.colourise(np.array([[0.0, 1.0]], dtype=np.float32))[0]
    assert low[2] > low[0] and high[0] > high[2]  # blue for normal, red for anomalous


def test_overlay_blends_over_the_photo():
    photo = np.full((20, 30, 3), 200, dtype=np.uint8)
    png = rendering.overlay_png(np.zeros((20, 30), dtype=np.float32), photo)
    with Image.open(io.BytesIO(png)) as image:
        blended = np.asarray(image)
    assert blended.shape == (20, 30, 3)
    expected = (200 * 0.5 + rendering.COLOUR_LUT[0] * 0.5).astype(int)
    assert np.abs(blended[0, 0].astype(int) - expected).max() <= 1
