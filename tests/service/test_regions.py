"""Regions agree with the decision: a flagged image always has one, around the patch that decided."""

from __future__ import annotations

import pytest
import torch

from app.core.calibration import Calibration
from app.core.patchcore import Prediction
from app.service.inference import region_map
from app.service.rendering import find_regions


def _prediction(raw_score: float, peak: float, base: float = 2.0) -> Prediction:
    """A 224 px map at `base` with one smoothed bump of height `peak` at (row 60, col 150)."""
    ys, xs = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    smoothed = base + (peak - base) * torch.exp(-((ys - 60) ** 2 + (xs - 150) ** 2) / (2 * 8.0 ** 2))
    calibration = Calibration(threshold=4.0, nominal_median=2.0, method="nominal_prediction_bound")
    return Prediction(raw_score=raw_score, score=float(calibration.normalise(raw_score)), threshold=4.0,
                      is_anomalous=raw_score > 4.0, calibration=calibration, smoothed_map=smoothed,
                      size=(448, 448))


def _regions(prediction: Prediction) -> list[dict]:
    normalised = prediction.normalised_map_at((224, 224))
    return find_regions(region_map(prediction, normalised, (224, 224)), to_size=prediction.size)


@pytest.mark.parametrize(("peak", "base"), [(3.5, 2.0), (1.5, 1.0)],
                         ids=["peak-under-threshold", "peak-under-the-nominal-median"])
def test_a_flagged_image_whose_smoothed_peak_is_under_the_threshold_gets_its_region(peak, base):
    # One patch at 5.0 decided; smoothing left `peak` of it in the map, under the threshold 4.0
    # (and in the second case under the nominal median 2.0, where the normalised map is all 0).
    flagged = _prediction(raw_score=5.0, peak=peak, base=base)
    assert find_regions(flagged.normalised_map_at((224, 224)), to_size=flagged.size) == []  # before
    regions = _regions(flagged)
    assert len(regions) == 1
    box = regions[0]["bbox"]  # around the peak, on the 448 px photo, never the whole frame
    assert box["x"] < 300 < box["x"] + box["width"] and box["y"] < 120 < box["y"] + box["height"]
    assert box["width"] < 200 and box["height"] < 200
    assert regions[0]["max_score"] == pytest.approx(flagged.score, abs=1e-3)  # the image's own score


def test_the_heatmap_is_cut_as_it_is_otherwise():
    assert _regions(_prediction(raw_score=3.5, peak=3.4)) == []  # not flagged: no region invented
    clear = _prediction(raw_score=6.0, peak=5.5)  # the map itself crosses the threshold
    normalised = clear.normalised_map_at((224, 224))
    assert region_map(clear, normalised, (224, 224)) is normalised and len(_regions(clear)) == 1
