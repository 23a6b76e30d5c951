"""Greedy coreset subsampling of the memory bank (PatchCore, Sec. 3.2, Alg. 1).

Greedy k-center selection (farthest-point sampling) on a random projection of
the features (Johnson-Lindenstrauss; the official code projects to 128 dims),
seeded with a few random starting centres. Memory is O(N): one distance per
point to its nearest chosen centre, never an N x N matrix.

Two exact implementations of the same greedy rule:
- `_greedy_dense` updates every point each step (one N x d product per step);
  on a GPU that is the fastest way.
- `_greedy_pruned` (CPU) skips the points that provably cannot get closer to
  the new centre p: for x owned by centre c, d(x, p) >= d(c, p) - d(x, c), so
  x cannot move when d(c, p) >= 2 d(x, c) (triangle inequality). The test reads
  two scalars per point; only the few points that pass it are read in full.
  It picks the same centres as the dense rule (tested), many times faster on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from app.core.errors import BuildCancelled

ProgressFn = Callable[[float], None]
StopFn = Callable[[], bool]


def coreset_size_for(n_features: int, ratio: float | None = None, size: int | None = None) -> int:
    """Number of bank entries for a ratio (0, 1] or an absolute size, at least 1, at most N."""
    if size is not None:
        if size < 1:
            raise ValueError("coreset size must be >= 1")
        return min(int(size), n_features)
    if ratio is None or not 0.0 < ratio <= 1.0:
        raise ValueError("coreset ratio must be in (0, 1]")
    return max(1, min(n_features, int(round(n_features * ratio))))


def random_projection(features: np.ndarray, dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """(N, D) -> (N, dim) with a fixed-seed Gaussian matrix; identity when D <= dim."""
    if features.shape[1] <= dim:
        return features
    rng = np.random.default_rng(seed)
    matrix = (rng.standard_normal((features.shape[1], dim)) / np.sqrt(dim)).astype(np.float32)
    out = np.empty((features.shape[0], dim), dtype=np.float32)
    for start in range(0, features.shape[0], chunk):  # chunked: no (N, D) float temporaries
        np.matmul(features[start:start + chunk], matrix, out=out[start:start + chunk])
    return out


def greedy_coreset(
    features: np.ndarray,
    size: int,
    *,
    projection_dim: int | None = 128,
    num_starts: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> np.ndarray:
    """Indices (size,) of the greedy k-center coreset of `features` (N, D) float32.

    Deterministic for a seed. `projection_dim=None` runs on the full features.
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be (N, D) with N > 0, got {features.shape}")
    n = features.shape[0]
    size = min(int(size), n)
    points = features if projection_dim is None else random_projection(features, projection_dim, seed)
    rng = np.random.default_rng(seed)
    starts = rng.choice(n, size=min(num_starts, size), replace=False)
    if torch.device(device).type == "cuda":
        return _greedy_dense(torch.from_numpy(np.ascontiguousarray(points)).to(device), size, starts,
                             progress, should_stop)
    # One BLAS thread: the products here are skinny ((rows x 128) @ (128 x ~10), memory-bound),
    # and on a shared 2-core machine OpenBLAS's thread hand-offs made them 2-3x slower
    # (magnetic_tile, 50k patches: 9 s with one thread, 25 s with two, same run).
    with threadpool_limits(limits=1, user_api="blas"):
        return _greedy_batched(np.ascontiguousarray(points), size, starts, progress, should_stop)


def _report(progress: ProgressFn | None, should_stop: StopFn | None, done: int, total: int) -> None:
    if should_stop is not None and should_stop():
        raise BuildCancelled("coreset selection cancelled")
    if progress is not None:
        progress(done / total)


def _distances_to(points: torch.Tensor | np.ndarray, norms, centre, centre_norm):
    """Euclidean distances of rows of `points` to one centre, via the norm identity."""
    squared = norms - 2.0 * (points @ centre) + centre_norm
    if isinstance(squared, torch.Tensor):
        return squared.clamp_min_(0).sqrt_()
    np.maximum(squared, 0, out=squared)
    return np.sqrt(squared, out=squared)


def _greedy_dense(points: torch.Tensor, size: int, starts: np.ndarray,
                  progress: ProgressFn | None, should_stop: StopFn | None) -> np.ndarray:
    norms = (points * points).sum(1)
    min_dist = torch.full((points.shape[0],), float("inf"), device=points.device, dtype=points.dtype)
    selected = [int(s) for s in starts]
    for s in selected:
        torch.minimum(min_dist, _distances_to(points, norms, points[s], norms[s]), out=min_dist)
    step = max(1, size // 100)
    while len(selected) < size:
        nxt = int(torch.argmax(min_dist))
        selected.append(nxt)
        torch.minimum(min_dist, _distances_to(points, norms, points[nxt], norms[nxt]), out=min_dist)
        if len(selected) % step == 0:
            _report(progress, should_stop, len(selected), size)
    return np.asarray(selected, dtype=np.int64)


def _greedy_pruned(points: np.ndarray, size: int, starts: np.ndarray,
                   progress: ProgressFn | None, should_stop: StopFn | None) -> np.ndarray:
    n = points.shape[0]
    norms = np.einsum("ij,ij->i", points, points)
    centres = np.empty((size, points.shape[1]), dtype=points.dtype)
    centre_norms = np.empty(size, dtype=points.dtype)
    owner = np.zeros(n, dtype=np.int64)                # index of each point's nearest centre
    min_dist = np.full(n, np.inf, dtype=points.dtype)  # distance to that centre
    selected: list[int] = []

    def add_centre(index: int, rows: np.ndarray | None) -> None:
        """Update the points `rows` (None: all) with the new centre `index`."""
        k = len(selected)
        centres[k], centre_norms[k] = points[index], norms[index]
        block = points if rows is None else points[rows]
        block_norms = norms if rows is None else norms[rows]
        dist = _distances_to(block, block_norms, points[index], norms[index])
        closer = dist < (min_dist if rows is None else min_dist[rows])
        moved = np.flatnonzero(closer) if rows is None else rows[closer]
        min_dist[moved] = dist[closer]
        owner[moved] = k
        min_dist[index], owner[index] = 0.0, k  # exact zero even with rounding
        selected.append(index)

    for s in starts:
        add_centre(int(s), None)

    step = max(1, size // 100)
    while len(selected) < size:
        nxt = int(np.argmax(min_dist))
        if min_dist[nxt] <= 0:  # every point coincides with a centre: pad with unused points
            unused = np.setdiff1d(np.arange(n), np.asarray(selected), assume_unique=True)
            selected.extend(int(i) for i in unused[: size - len(selected)])
            break
        k = len(selected)
        # Triangle inequality: d(x, p) >= d(c_x, p) - d(x, c_x), so x can only move to
        # the new centre p when d(c_x, p) < 2 d(x, c_x). Only scalars are read for this
        # test; the D-dim vectors are read for the few points that pass it.
        to_centres = _distances_to(centres[:k], centre_norms[:k], points[nxt], norms[nxt])
        may_move = np.flatnonzero(to_centres[owner] < 2.0 * min_dist)
        # Gathering rows costs more than a full pass once many points may move.
        add_centre(nxt, None if len(may_move) > n // 4 else may_move)
        if len(selected) % step == 0:
            _report(progress, should_stop, len(selected), size)
    return np.asarray(selected, dtype=np.int64)


def _greedy_batched(points: np.ndarray, size: int, starts: np.ndarray,
                    progress: ProgressFn | None, should_stop: StopFn | None,
                    candidates: int = 256, chunk: int = 32768) -> np.ndarray:
    """The greedy rule, many centres per pass over the points (exactly the same picks).

    Take the `candidates` points farthest from the centres, in descending order
    q1, q2, ... Greedy would pick q1; then q2 as long as q1 does not come closer
    to q2 than q2's current distance d(q2), since every other point's distance
    is <= d(q2) and can only shrink; and so on: q_j is greedy's next pick while
    d(q_i, q_j) >= d(q_j) for every q_i taken before it in this round. The round
    ends at the first q_j that fails (its distance changed). All points are then
    updated against the round's new centres at once: one (chunk x d) @ (d x B)
    matrix product instead of B matrix-vector passes, which is what makes it fast
    (compute-bound instead of memory-bound).
    """
    n = points.shape[0]
    norms = np.einsum("ij,ij->i", points, points)
    min_dist = np.full(n, np.inf, dtype=points.dtype)  # squared distance to the nearest centre
    owner = np.zeros(n, dtype=np.int64)                # position in `selected` of that centre
    selected: list[int] = []

    def update(new: list[int]) -> None:
        block = points[new]                      # (B, d)
        block_norms = norms[new]
        rows: np.ndarray | None = None
        if selected:
            # Triangle inequality, per old centre c: a point x owned by c can only move to a
            # new centre p when d(c, p) < 2 d(x, c), so when min_p d(c, p)^2 < 4 d(x, c)^2.
            # Only the points that pass are read in full (as the per-step rule did).
            old = points[selected]
            to_new = norms[selected][:, None] + block_norms[None, :] - 2.0 * (old @ block.T)
            nearest_new = np.maximum(to_new.min(axis=1), 0.0)
            may_move = np.flatnonzero(nearest_new[owner] < 4.0 * min_dist)
            if len(may_move) < n // 2:           # gathering rows costs more than a full pass beyond that
                rows = may_move
        total = n if rows is None else len(rows)
        for start in range(0, total, chunk):
            part: slice | np.ndarray = slice(start, start + chunk) if rows is None else rows[start:start + chunk]
            squared = points[part] @ block.T     # (chunk, B)
            squared *= -2.0
            squared += norms[part, None]
            squared += block_norms[None, :]
            best = squared.argmin(axis=1)
            best_dist = squared[np.arange(len(best)), best]
            closer = best_dist < min_dist[part]
            ids = np.flatnonzero(closer) + start if isinstance(part, slice) else part[closer]
            min_dist[ids] = best_dist[closer]
            owner[ids] = len(selected) + best[closer]
        min_dist[new] = 0.0                      # exact zero even with rounding
        owner[new] = len(selected) + np.arange(len(new))
        selected.extend(new)

    update([int(s) for s in starts])
    np.maximum(min_dist, 0.0, out=min_dist)
    reported = len(selected)
    step = max(1, size // 100)
    while len(selected) < size:
        want = size - len(selected)
        m = min(candidates, n)
        top = np.argpartition(min_dist, n - m)[n - m:] if m < n else np.arange(n)
        top = top[np.argsort(-min_dist[top], kind="stable")]
        if min_dist[top[0]] <= 0:  # every point coincides with a centre: pad with unused points
            unused = np.setdiff1d(np.arange(n), np.asarray(selected), assume_unique=True)
            selected.extend(int(i) for i in unused[:want])
            break
        cand = points[top]
        cand_norms = norms[top]
        pair = cand_norms[:, None] + cand_norms[None, :] - 2.0 * (cand @ cand.T)  # squared, (m, m)
        # q_j keeps its distance only if every q_i before it (all are taken, up to the
        # first failure) is at least that far: compare with the column minimum above the diagonal.
        pair[np.tril_indices(m)] = np.inf
        fails = np.flatnonzero((pair.min(axis=0) < min_dist[top]) | (min_dist[top] <= 0))
        taken = min(int(fails[0]) if len(fails) else m, want)
        update([int(i) for i in top[:max(taken, 1)]])
        np.maximum(min_dist, 0.0, out=min_dist)
        if len(selected) - reported >= step:
            reported = len(selected)
            _report(progress, should_stop, len(selected), size)
    return np.asarray(selected[:size], dtype=np.int64)


def coverage_radius(features: np.ndarray, indices: np.ndarray, chunk: int = 8192) -> float:
    """max_x min_c ||x - c||: the quantity greedy k-center minimises (for tests and reports)."""
    centres = torch.from_numpy(np.ascontiguousarray(features[indices]))
    worst = 0.0
    for start in range(0, features.shape[0], chunk):
        block = torch.from_numpy(np.ascontiguousarray(features[start:start + chunk]))
        worst = max(worst, float(torch.cdist(block, centres).min(1).values.max()))
    return worst
