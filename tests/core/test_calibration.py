import numpy as np
import pytest

from app.core.calibration import Calibration, calibrate_f1, calibrate_from_nominal


def test_threshold_is_a_prediction_bound_from_nominal_scores_only():
    rng = np.random.default_rng(0)
    population = np.exp(rng.normal(0.7, 0.08, 200_000))       # log-normal nominal scores
    calibration = calibrate_from_nominal(population[:25], false_alarm_rate=0.01)
    assert calibration.threshold > population[:25].max()
    # On unseen nominal parts the false alarm rate is near the target, not "1 in n".
    assert (population[25:] > calibration.threshold).mean() < 0.03
    assert calibration.normalise(calibration.threshold) == pytest.approx(0.5)
    assert calibration.normalise(calibration.nominal_median) == pytest.approx(0.0)
    assert calibration.normalise(1e9) == 1.0 and calibration.normalise(-1e9) == 0.0
    assert Calibration.from_dict(calibration.to_dict()) == calibration


def test_heavy_tail_keeps_a_margin_above_the_largest_held_out_score():
    rng = np.random.default_rng(3)
    scores = np.append(rng.normal(2.0, 0.02, 40), 2.56)  # one far-out good part
    calibration = calibrate_from_nominal(scores, tail_margin=0.25)
    assert calibration.threshold >= 2.56 + 0.25 * (2.56 - np.median(scores)) - 1e-9
    assert calibrate_from_nominal(scores, tail_margin=0.0).threshold < calibration.threshold


def test_few_held_out_images_widen_the_bound():
    rng = np.random.default_rng(1)
    scores = np.exp(rng.normal(0.7, 0.08, 40))
    few = calibrate_from_nominal(scores[:4]).threshold - np.exp(0.7)
    many = calibrate_from_nominal(scores).threshold - np.exp(0.7)
    assert few > many > 0
    assert calibrate_from_nominal(np.array([2.0])).threshold == pytest.approx(3.0)
    assert calibrate_from_nominal(np.array([2.0, 2.0, 2.0])).threshold > 2.0


def test_f1_threshold_separates_a_labelled_set():
    scores = np.array([1.0, 1.1, 1.2, 1.3, 2.0, 2.1, 2.5])
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    calibration = calibrate_f1(scores, labels, nominal_scores=np.array([1.0, 1.2]))
    assert 1.3 < calibration.threshold < 2.0
    predicted = scores > calibration.threshold  # the model's decision rule
    assert (predicted == labels.astype(bool)).all()
    with pytest.raises(ValueError):
        calibrate_f1(scores, np.zeros(7, int), np.array([1.0]))


def test_non_finite_nominal_scores_are_refused():
    """A NaN would make the threshold NaN, and nothing would ever be flagged."""
    for scores in ([1.0, float("nan"), 1.2], [1.0, float("inf")]):
        with pytest.raises(ValueError, match="finite"):
            calibrate_from_nominal(np.array(scores))
