import numpy as np
import pytest

from app.core.calibration import Calibration, calibrate_f1, calibrate_from_nominal


def test_threshold_from_nominal_scores_only():
    scores = np.linspace(1.0, 2.0, 101)
    calibration = calibrate_from_nominal(scores, quantile=0.99, margin=0.1)
    q = np.quantile(scores, 0.99)
    assert calibration.threshold == pytest.approx(q + 0.1 * (q - 1.5))
    assert calibration.threshold > scores.max() - 1e-9
    assert calibration.normalise(calibration.threshold) == pytest.approx(0.5)
    assert calibration.normalise(calibration.nominal_median) == pytest.approx(0.0)
    assert calibration.normalise(1e9) == 1.0 and calibration.normalise(-1e9) == 0.0
    assert Calibration.from_dict(calibration.to_dict()) == calibration


def test_f1_threshold_separates_a_labelled_set():
    scores = np.array([1.0, 1.1, 1.2, 1.3, 2.0, 2.1, 2.5])
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    calibration = calibrate_f1(scores, labels, nominal_scores=np.array([1.0, 1.2]))
    assert 1.3 < calibration.threshold < 2.0
    predicted = scores > calibration.threshold  # the model's decision rule
    assert (predicted == labels.astype(bool)).all()
    with pytest.raises(ValueError):
        calibrate_f1(scores, np.zeros(7, int), np.array([1.0]))
