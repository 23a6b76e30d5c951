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

An append build continues the selection (`continue_coreset`): the existing bank
entries are the starting centres, the new patches the candidates, and the same
greedy rule adds the new patches farthest from everything chosen so far.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


def projection_matrix(feature_dim: int, dim: int, seed: int) -> np.ndarray | None:
    """The fixed-seed Gaussian (feature_dim, dim) matrix of `random_projection`; None when
    feature_dim <= dim (no projection)."""
    if feature_dim <= dim:
        return None
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((feature_dim, dim)) / np.sqrt(dim)).astype(np.float32)


def random_projection(features: np.ndarray, dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """(N, D) -> (N, dim) with a fixed-seed Gaussian matrix; identity when D <= dim."""
    matrix = projection_matrix(features.shape[1], dim, seed)
    if matrix is None:
        return features
    out = np.empty((features.shape[0], dim), dtype=np.float32)
    for start in range(0, features.shape[0], chunk):  # chunked: no (N, D) float temporaries
        np.matmul(features[start:start + chunk], matrix, out=out[start:start + chunk])
    return out


@dataclass(frozen=True)
class CoresetSelection:
    indices: np.ndarray   # (k,) selected rows, in selection order
    # max over the candidates of the distance to their nearest centre, in the selection space
    # (the projection): what greedy k-center minimises. An append build stops on it.
    radius: float


def select_coreset(
    features: np.ndarray,
    size: int,
    *,
    projection_dim: int | None = 128,
    num_starts: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    projected: bool = False,
) -> CoresetSelection:
    """Greedy k-center coreset of `features` (N, D) float32 and its coverage radius.

    Deterministic for a seed. `projection_dim=None` runs on the full features;
    `projected=True` says `features` already are `random_projection(..., projection_dim,
    seed)` of them (a build that projected each batch as it was embedded).
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be (N, D) with N > 0, got {features.shape}")
    n = features.shape[0]
    size = min(int(size), n)
    points = features if projection_dim is None or projected else random_projection(features, projection_dim, seed)
    rng = np.random.default_rng(seed)
    starts = rng.choice(n, size=min(num_starts, size), replace=False)
    if torch.device(device).type == "cuda":
        indices, radius = _greedy_dense(torch.from_numpy(np.ascontiguousarray(points)).to(device), size, starts,
                                        progress, should_stop)
    else:
        # One BLAS thread: the products here are skinny ((rows x 128) @ (128 x ~10), memory-bound),
        # and on a shared 2-core machine OpenBLAS's thread hand-offs made them 2-3x slower
        # (magnetic_tile, 50k patches: 9 s with one thread, 25 s with two, same run).
        with threadpool_limits(limits=1, user_api="blas"):
            indices, radius = _greedy_batched(np.ascontiguousarray(points), size, starts, progress, should_stop)
    return CoresetSelection(indices, radius)


def greedy_coreset(features: np.ndarray, size: int, *, projection_dim: int | None = 128, num_starts: int = 10,
                   seed: int = 0, device: str | torch.device = "cpu", progress: ProgressFn | None = None,
                   should_stop: StopFn | None = None) -> np.ndarray:
    """Indices (size,) of the greedy k-center coreset of `features` (see `select_coreset`)."""
    return select_coreset(features, size, projection_dim=projection_dim, num_starts=num_starts, seed=seed,
                          device=device, progress=progress, should_stop=should_stop).indices


def continue_coreset(
    centres: np.ndarray,
    candidates: np.ndarray,
    size: int,
    *,
    stop_radius: float | None = None,
    projection_dim: int | None = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> CoresetSelection:
    """Continue a greedy k-center selection from existing `centres` (M, D) over new `candidates` (N, D).

    The existing centres are the starting centres: each candidate's distance to its
    nearest one initialises the greedy state, exactly as if those centres had been
    picked first. Up to `size` candidates are added (farthest first); selection stops
    earlier once every candidate is within `stop_radius`. `projection_dim` and `seed`
    must be those the centres were selected with: the same seeded matrix projects
    both, so distances are comparable with the base bank's recorded radius.
    Returns indices into `candidates` and the candidates' coverage radius.
    """
    if candidates.ndim != 2 or centres.ndim != 2 or candidates.shape[1] != centres.shape[1]:
        raise ValueError(f"centres {centres.shape} and candidates {candidates.shape} must be (M, D) and (N, D)")
    if centres.shape[0] == 0:
        raise ValueError("continue_coreset needs at least one existing centre")
    if candidates.shape[0] == 0 or size <= 0:
        return CoresetSelection(np.zeros(0, dtype=np.int64), 0.0)
    size = min(int(size), candidates.shape[0])
    if projection_dim is None:
        points, base = candidates, centres
    else:
        points = random_projection(candidates, projection_dim, seed)
        base = random_projection(centres, projection_dim, seed)
    points = np.ascontiguousarray(points, dtype=np.float32)
    base = np.ascontiguousarray(base, dtype=np.float32)
    from app.core.knn import NearestNeighbourIndex  # faiss: exact, BLAS-blocked, O(N) memory

    distance, owner = NearestNeighbourIndex(base).search(points, k=1)
    min_dist, owner = distance[:, 0].astype(np.float32), owner[:, 0].astype(np.int64)
    _report(progress, should_stop, 0, size)
    if torch.device(device).type == "cuda":
        return CoresetSelection(*_greedy_dense(torch.from_numpy(points).to(device), size, np.zeros(0, np.int64),
                                               progress, should_stop, torch.from_numpy(min_dist).to(device),
                                               stop_radius))
    with threadpool_limits(limits=1, user_api="blas"):  # see select_coreset
        return CoresetSelection(*_greedy_pruned(points, size, np.zeros(0, np.int64), progress, should_stop,
                                                (base, owner, min_dist), stop_radius))


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
                  progress: ProgressFn | None, should_stop: StopFn | None,
                  min_dist: torch.Tensor | None = None,
                  stop_radius: float | None = None) -> tuple[np.ndarray, float]:
    """`min_dist` (N,): distances to centres chosen before (an append); None starts empty."""
    norms = (points * points).sum(1)
    if min_dist is None:
        min_dist = torch.full((points.shape[0],), float("inf"), device=points.device, dtype=points.dtype)
    else:
        min_dist = min_dist.to(points.dtype).clone()
    selected = [int(s) for s in starts]
    for s in selected:
        torch.minimum(min_dist, _distances_to(points, norms, points[s], norms[s]), out=min_dist)
    step = max(1, size // 100)
    while len(selected) < size:
        nxt = int(torch.argmax(min_dist))
        if stop_radius is not None and float(min_dist[nxt]) <= stop_radius:
            break
        selected.append(nxt)
        torch.minimum(min_dist, _distances_to(points, norms, points[nxt], norms[nxt]), out=min_dist)
        if len(selected) % step == 0:
            _report(progress, should_stop, len(selected), size)
    return np.asarray(selected, dtype=np.int64), float(min_dist.max())


def _greedy_pruned(points: np.ndarray, size: int, starts: np.ndarray,
                   progress: ProgressFn | None, should_stop: StopFn | None,
                   base: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                   stop_radius: float | None = None) -> tuple[np.ndarray, float]:
    """`base` = (centres (M, d), owner (N,), min_dist (N,)): centres chosen before (an append)."""
    n = points.shape[0]
    norms = np.einsum("ij,ij->i", points, points)
    if base is None:
        base_centres = np.empty((0, points.shape[1]), dtype=points.dtype)
        owner = np.zeros(n, dtype=np.int64)                # index of each point's nearest centre
        min_dist = np.full(n, np.inf, dtype=points.dtype)  # distance to that centre
    else:
        base_centres = base[0]
        owner, min_dist = base[1].astype(np.int64), base[2].astype(points.dtype)
    m = base_centres.shape[0]
    centres = np.empty((m + size, points.shape[1]), dtype=points.dtype)
    centre_norms = np.empty(m + size, dtype=points.dtype)
    centres[:m] = base_centres
    centre_norms[:m] = np.einsum("ij,ij->i", base_centres, base_centres)
    selected: list[int] = []

    def add_centre(index: int, rows: np.ndarray | None) -> None:
        """Update the points `rows` (None: all) with the new centre `index`."""
        k = m + len(selected)
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
        if stop_radius is not None and min_dist[nxt] <= stop_radius:
            break
        if min_dist[nxt] <= 0:  # every point coincides with a centre
            if base is None:    # a full build pads with unused points to the asked size
                unused = np.setdiff1d(np.arange(n), np.asarray(selected), assume_unique=True)
                selected.extend(int(i) for i in unused[: size - len(selected)])
            break
        k = m + len(selected)
        if k >= n:  # (an append onto a large bank) reading every point costs less than every centre
            add_centre(nxt, None)
            if len(selected) % step == 0:
                _report(progress, should_stop, len(selected), size)
            continue
        # Triangle inequality: d(x, p) >= d(c_x, p) - d(x, c_x), so x can only move to
        # the new centre p when d(c_x, p) < 2 d(x, c_x). Only scalars are read for this
        # test; the D-dim vectors are read for the few points that pass it.
        to_centres = _distances_to(centres[:k], centre_norms[:k], points[nxt], norms[nxt])
        may_move = np.flatnonzero(to_centres[owner] < 2.0 * min_dist)
        # Gathering rows costs more than a full pass once many points may move.
        add_centre(nxt, None if len(may_move) > n // 4 else may_move)
        if len(selected) % step == 0:
            _report(progress, should_stop, len(selected), size)
    return np.asarray(selected, dtype=np.int64), float(min_dist.max()) if n else 0.0


def _greedy_batched(points: np.ndarray, size: int, starts: np.ndarray,
                    progress: ProgressFn | None, should_stop: StopFn | None,
                    candidates: int = 256, chunk: int = 32768) -> tuple[np.ndarray, float]:
    """The greedy rule, many centres per pass over the points (exactly the same picks).
    Returns the picks and the coverage radius they reach.

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
    return np.asarray(selected[:size], dtype=np.int64), float(np.sqrt(max(float(min_dist.max()), 0.0)))


def coverage_radius(features: np.ndarray, indices: np.ndarray, chunk: int = 8192) -> float:
    """max_x min_c ||x - c||: the quantity greedy k-center minimises (for tests and reports)."""
    centres = torch.from_numpy(np.ascontiguousarray(features[indices]))
    worst = 0.0
    for start in range(0, features.shape[0], chunk):
        block = torch.from_numpy(np.ascontiguousarray(features[start:start + chunk]))
        worst = max(worst, float(torch.cdist(block, centres).min(1).values.max()))
    return worst
