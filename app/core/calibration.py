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
    false_alarm_rate: float | None = None
    holdout_images: int | None = None
    tail_margin: float | None = None

    def normalise(self, raw: np.ndarray | float) -> np.ndarray:
        """Piecewise-linear map: nominal median -> 0, threshold -> 0.5, clipped to [0, 1]."""
        spread = max(self.threshold - self.nominal_median, 1e-12)
        return np.clip(0.5 + 0.5 * (np.asarray(raw, dtype=np.float64) - self.threshold) / spread, 0.0, 1.0)

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "nominal_median": self.nominal_median, "method": self.method,
                "false_alarm_rate": self.false_alarm_rate, "holdout_images": self.holdout_images,
                "tail_margin": self.tail_margin}

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(threshold=float(data["threshold"]), nominal_median=float(data["nominal_median"]),
                   method=str(data.get("method", "nominal_prediction_bound")),
                   false_alarm_rate=data.get("false_alarm_rate"), holdout_images=data.get("holdout_images"),
                   tail_margin=data.get("tail_margin"))


# Below about 1e-16, 1 - rate rounds to 1 and the bound is infinite (a bank that never
# flags); one in a million good parts is already far beyond what a held-out set can show.
MIN_FALSE_ALARM_RATE = 1e-6


def calibrate_from_nominal(scores: np.ndarray, false_alarm_rate: float = 0.01,
                           tail_margin: float = 0.25) -> Calibration:
    """Threshold for the NEXT nominal image's score, from held-out nominal scores.

    The larger of two bounds:
    - a one-sided prediction bound on log scores (distances are positive and
      right-skewed): exp(mean + t_{n-1, 1-a} * sd * sqrt(1 + 1/n)). Student's t and
      sqrt(1 + 1/n) widen it when only a few images were held out, where an
      empirical quantile is just their maximum and about 1 new good part in n
      would land above it;
    - the largest held-out score plus `tail_margin` times its distance from the
      median, because real nominal tails are heavier than log-normal (on bottle,
      2 of 21 held-out scores sat far out, and so did 3 of 20 test good parts).
    """
    from scipy.stats import t as student_t

    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no nominal scores to calibrate from")
    if not np.isfinite(scores).all():
        # A NaN would make the threshold NaN, and "score > NaN" never flags anything.
        raise ValueError("nominal scores must be finite")
    median = float(np.median(scores))
    logs = np.log(np.maximum(scores, 1e-12))
    n = scores.size
    if n >= 2:
        sd = max(float(logs.std(ddof=1)), 0.02)  # floor: identical scores must not give a zero-width bound
        bound = float(np.exp(logs.mean() + student_t.ppf(1.0 - false_alarm_rate, n - 1) * sd * np.sqrt(1 + 1 / n)))
    else:
        bound = 1.5 * float(scores[0])  # one image says nothing about the spread
    largest = float(scores.max())
    tail = largest + tail_margin * max(largest - median, 0.0)
    return Calibration(threshold=max(bound, tail, largest * 1.001), nominal_median=median,
                       method="nominal_prediction_bound", false_alarm_rate=false_alarm_rate, holdout_images=n,
                       tail_margin=tail_margin)


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
