import numpy as np
import pytest
import torch

from app.core.coreset import (
    _greedy_batched,
    _greedy_dense,
    _greedy_pruned,
    coreset_size_for,
    coverage_radius,
    greedy_coreset,
)
from app.core.errors import BuildCancelled


def _clustered(n=4000, dim=32, seed=0):
    """Patch-feature-like data: a few dense clusters plus a sparse tail."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (12, dim))
    x = centres[rng.integers(0, 12, n)] + rng.normal(0, 0.6, (n, dim))
    x[: n // 50] += rng.normal(0, 5, (n // 50, dim))
    return x.astype(np.float32)


def test_pruned_selection_equals_dense_greedy():
    x = _clustered().astype(np.float64)
    starts = np.array([3, 77, 1024])
    pruned = _greedy_pruned(x, 300, starts, None, None)
    dense = _greedy_dense(torch.from_numpy(x), 300, starts, None, None)
    np.testing.assert_array_equal(pruned, dense)
    assert len(set(pruned.tolist())) == 300


@pytest.mark.parametrize("candidates", [2, 16, 256])
def test_batched_selection_equals_dense_greedy(candidates):
    x = _clustered(seed=3).astype(np.float64)  # both in float64: no rounding ties
    starts = np.array([5, 600, 3001])
    batched = _greedy_batched(x, 400, starts, None, None, candidates=candidates, chunk=1000)
    dense = _greedy_dense(torch.from_numpy(x), 400, starts, None, None)
    np.testing.assert_array_equal(batched, dense)


def test_greedy_covers_better_than_random():
    x = _clustered()
    greedy = greedy_coreset(x, 200, projection_dim=None, seed=0)
    randoms = [coverage_radius(x, np.random.default_rng(s).choice(len(x), 200, replace=False)) for s in range(5)]
    assert coverage_radius(x, greedy) < 0.7 * min(randoms)


def test_projected_selection_is_close_to_full_dimensional():
    x = _clustered(dim=256)
    exact = coverage_radius(x, greedy_coreset(x, 200, projection_dim=None, seed=0))
    approximate = coverage_radius(x, greedy_coreset(x, 200, projection_dim=128, seed=0))
    assert approximate <= 1.25 * exact


def test_deterministic_for_a_seed_and_seed_matters():
    x = _clustered()
    a = greedy_coreset(x, 100, seed=1)
    np.testing.assert_array_equal(a, greedy_coreset(x, 100, seed=1))
    assert not np.array_equal(a, greedy_coreset(x, 100, seed=2))


def test_progress_and_cancel():
    x = _clustered()
    seen = []
    greedy_coreset(x, 400, progress=seen.append)
    assert seen and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    with pytest.raises(BuildCancelled):
        greedy_coreset(x, 400, should_stop=lambda: True)


def test_duplicates_do_not_loop_forever():
    x = np.zeros((50, 4), np.float32)
    x[:5] = np.eye(5, 4)
    picked = greedy_coreset(x, 20, projection_dim=None)
    assert len(set(picked.tolist())) == 20


def test_size_from_ratio_or_absolute():
    assert coreset_size_for(1000, ratio=0.1) == 100
    assert coreset_size_for(1000, size=5000) == 1000
    assert coreset_size_for(3, ratio=0.01) == 1
    with pytest.raises(ValueError):
        coreset_size_for(1000, ratio=0.0)
