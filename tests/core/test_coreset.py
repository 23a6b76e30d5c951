import numpy as np
import pytest
import torch

from app.core.coreset import (
    _greedy_batched,
    _greedy_dense,
    _greedy_pruned,
    continue_coreset,
    coreset_size_for,
    coverage_radius,
    greedy_coreset,
    random_projection,
    select_coreset,
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
    pruned, pruned_radius = _greedy_pruned(x, 300, starts, None, None)
    dense, dense_radius = _greedy_dense(torch.from_numpy(x), 300, starts, None, None)
    np.testing.assert_array_equal(pruned, dense)
    assert len(set(pruned.tolist())) == 300
    assert pruned_radius == pytest.approx(dense_radius, rel=1e-9)
    assert pruned_radius == pytest.approx(coverage_radius(x, pruned), rel=1e-6)


@pytest.mark.parametrize("candidates", [2, 16, 256])
def test_batched_selection_equals_dense_greedy(candidates):
    x = _clustered(seed=3).astype(np.float64)  # both in float64: no rounding ties
    starts = np.array([5, 600, 3001])
    batched, batched_radius = _greedy_batched(x, 400, starts, None, None, candidates=candidates, chunk=1000)
    dense, dense_radius = _greedy_dense(torch.from_numpy(x), 400, starts, None, None)
    np.testing.assert_array_equal(batched, dense)
    assert batched_radius == pytest.approx(dense_radius, rel=1e-6)


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


def test_continuing_from_the_first_centres_gives_the_rest_of_the_greedy_sequence():
    """Continuation = the same greedy rule with the base centres already chosen."""
    x = _clustered()
    full = greedy_coreset(x, 300, projection_dim=None, seed=3)
    rest = continue_coreset(x[full[:120]], x, 180, projection_dim=None)
    np.testing.assert_array_equal(rest.indices, full[120:])


@pytest.mark.parametrize("candidates", [1500, 100])  # 100 < existing centres: every step a full pass
def test_continuation_dense_equals_pruned_and_respects_the_projection(candidates):
    x = _clustered(dim=160)
    base, new = x[:2500], x[2500:2500 + candidates]
    first = select_coreset(base, 150, projection_dim=128, seed=5)
    pruned = continue_coreset(base[first.indices], new, 60, projection_dim=128, seed=5)
    # The dense rule on the same projected state (what CUDA runs).
    points = random_projection(new, 128, 5)
    centres = random_projection(base[first.indices], 128, 5)
    init = torch.cdist(torch.from_numpy(points).double(), torch.from_numpy(centres).double()).min(1).values
    dense, dense_radius = _greedy_dense(torch.from_numpy(points).double(), 60, np.zeros(0, np.int64), None, None,
                                        init)
    # float32 (faiss) vs float64 state: near-ties may swap order, never the chosen set.
    assert len(pruned.indices) == 60 and set(pruned.indices.tolist()) == set(dense.tolist())
    assert pruned.radius == pytest.approx(dense_radius, rel=1e-5)
    # A different projection seed selects differently: the lineage's seed matters.
    assert not np.array_equal(continue_coreset(base[first.indices], new, 60, seed=6).indices, pruned.indices)


def test_continuation_stops_at_the_radius_and_covers_the_candidates():
    x = _clustered()
    base, new = x[:3000], x[3000:]
    first = select_coreset(base, 200, projection_dim=None)
    capped = continue_coreset(base[first.indices], new, 1000, stop_radius=first.radius, projection_dim=None)
    assert 0 < len(capped.indices) < 1000
    assert capped.radius <= first.radius
    centres = np.concatenate([base[first.indices], new[capped.indices]])
    assert coverage_radius(np.concatenate([centres, x]), np.arange(len(centres))) <= first.radius * (1 + 1e-5)
    sized = continue_coreset(base[first.indices], new, 100, projection_dim=None)
    assert len(capped.indices) < 100 and len(sized.indices) == 100 and sized.radius < capped.radius
    assert len(continue_coreset(base[first.indices], new[:0], 10).indices) == 0
