"""Decision threshold from nominal images only, and a normalised score.

A new line rarely has defect images, so the default threshold comes from the
scores of held-out NOMINAL images (never the test set; the official code
min-max normalises against the test set, so it cannot score one new image).
With a labelled validation set, the F1-optimal threshold is used instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Calibration:
    threshold: float
    # Reference point mapped to normalised score 0: the median nominal score.
    nominal_median: float
    method: str
    quantile: float | None = None
    margin: float | None = None

    def normalise(self, raw: np.ndarray | float) -> np.ndarray:
        """Piecewise-linear map: nominal median -> 0, threshold -> 0.5, clipped to [0, 1]."""
        spread = max(self.threshold - self.nominal_median, 1e-12)
        return np.clip(0.5 + 0.5 * (np.asarray(raw, dtype=np.float64) - self.threshold) / spread, 0.0, 1.0)

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "nominal_median": self.nominal_median,
                "method": self.method, "quantile": self.quantile, "margin": self.margin}

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(threshold=float(data["threshold"]), nominal_median=float(data["nominal_median"]),
                   method=str(data.get("method", "nominal_quantile")), quantile=data.get("quantile"),
                   margin=data.get("margin"))


def calibrate_from_nominal(scores: np.ndarray, quantile: float = 0.99, margin: float = 0.1) -> Calibration:
    """threshold = q-quantile of held-out nominal scores, raised by `margin` of the
    gap between that quantile and the median (a few held-out images rarely show
    the true tail of the nominal distribution)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no nominal scores to calibrate from")
    median = float(np.median(scores))
    q = float(np.quantile(scores, quantile))
    spread = max(q - median, 0.05 * abs(median), 1e-6)
    return Calibration(threshold=q + margin * spread,
                       nominal_median=median, method="nominal_quantile", quantile=quantile, margin=margin)


def calibrate_f1(scores: np.ndarray, labels: np.ndarray, nominal_scores: np.ndarray) -> Calibration:
    """F1-optimal threshold on a labelled validation set (labels: 1 = defective)."""
    from sklearn.metrics import precision_recall_curve

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min() == labels.max():
        raise ValueError("an F1 threshold needs both nominal and defective validation images")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))
    # sklearn flags score >= t; our decision is score > threshold, so sit halfway
    # between t and the next lower validation score.
    t = float(thresholds[best])
    below = scores[scores < t]
    threshold = 0.5 * (t + float(below.max())) if below.size else t - 1e-6 * max(abs(t), 1.0)
    reference = nominal_scores if len(nominal_scores) else scores[labels == 0]
    return Calibration(threshold=threshold, nominal_median=float(np.median(reference)),
                       method="f1_validation")
