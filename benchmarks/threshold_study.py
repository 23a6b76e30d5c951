"""Nominal-only threshold rules against the test sets (issue 8), from eval / sweep result JSONs.

Each result JSON holds the held-out nominal scores the bank was calibrated on
(`nominal_holdout_scores`) and every test image's score (`test_scores`); this
recomputes the threshold under other rules and false-alarm budgets from the
held-out scores alone and reports precision / recall / F1 / false-alarm rate
on the test set. Nothing here tunes a threshold on the test set.

    python benchmarks/threshold_study.py benchmarks/results/levers/transistor__base.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from app.core.calibration import calibrate_from_nominal


def rules(nominal: np.ndarray) -> dict[str, float]:
    out = {}
    for budget in (0.01, 0.001):
        out[f"stored rule, budget {budget:g}"] = calibrate_from_nominal(nominal, budget).threshold
        out[f"log-t bound only, budget {budget:g}"] = calibrate_from_nominal(nominal, budget, tail_margin=0).threshold
    out["max held-out"] = float(nominal.max()) * 1.001
    return out


def at(threshold: float, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    flagged = scores > threshold
    tp, fp = int((flagged & labels).sum()), int((flagged & ~labels).sum())
    fn = int((~flagged & labels).sum())
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
            "f1": 2 * tp / max(2 * tp + fp + fn, 1), "false_alarm_rate": fp / max(int((~labels).sum()), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+")
    args = parser.parse_args()
    print("| result | rule | threshold | precision | recall | F1 | false alarms (test good) |")
    print("|---|---|---|---|---|---|---|")
    for path in args.results:
        result = json.loads(Path(path).read_text())
        nominal = np.asarray(result["nominal_holdout_scores"], dtype=np.float64)
        scores = np.asarray([t["score"] for t in result["test_scores"]])
        labels = np.asarray([t["type"] != "good" for t in result["test_scores"]])
        for name, threshold in rules(nominal).items():
            m = at(threshold, scores, labels)
            print(f"| {Path(path).stem} | {name} | {threshold:.3f} | {m['precision']:.3f} | {m['recall']:.3f} "
                  f"| {m['f1']:.3f} | {m['false_alarm_rate']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
