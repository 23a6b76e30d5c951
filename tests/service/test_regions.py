"""Regions agree with the decision: a flagged image always has one, around the patch that decided."""

from __future__ import annotations

import torch

from app.core.calibration import Calibration
from app.core.patchcore import Prediction
from app.service.inference import region_level
from app.service.rendering import REGION_THRESHOLD, find_regions


def _prediction(raw_score: float, peak: float) -> Prediction:
    """A 224 px map with one smoothed bump of height `peak` at (row 60, col 150)."""
    ys, xs = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    smoothed = 2.0 + (peak - 2.0) * torch.exp(-((ys - 60) ** 2 + (xs - 150) ** 2) / (2 * 8.0 ** 2))
    calibration = Calibration(threshold=4.0, nominal_median=2.0, method="nominal_prediction_bound")
    return Prediction(raw_score=raw_score, score=float(calibration.normalise(raw_score)), threshold=4.0,
                      is_anomalous=raw_score > 4.0, calibration=calibration, smoothed_map=smoothed,
                      size=(448, 448))


def test_a_flagged_image_whose_smoothed_peak_is_under_the_threshold_gets_its_region():
    # One patch at 5.0 decided; smoothing left 3.5 of it in the map (under the threshold 4.0).
    flagged = _prediction(raw_score=5.0, peak=3.5)
    normalised = flagged.normalised_map_at((224, 224))
    assert find_regions(normalised, to_size=flagged.size) == []  # what the service answered before
    regions = find_regions(normalised, to_size=flagged.size, threshold=region_level(flagged, normalised))
    assert len(regions) == 1
    box = regions[0]["bbox"]  # around the peak, on the 448 px photo
    assert box["x"] < 300 < box["x"] + box["width"] and box["y"] < 120 < box["y"] + box["height"]
    assert box["width"] < 200 and box["height"] < 200


def test_the_level_is_the_threshold_otherwise():
    passed = _prediction(raw_score=3.5, peak=3.4)  # not flagged: no region invented
    assert region_level(passed, passed.normalised_map_at((224, 224))) == REGION_THRESHOLD
    clear = _prediction(raw_score=6.0, peak=5.5)  # the map itself crosses the threshold
    assert region_level(clear, clear.normalised_map_at((224, 224))) == REGION_THRESHOLD
