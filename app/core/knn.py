"""Exact nearest-neighbour search over a memory bank with faiss (IndexFlatL2).

faiss returns SQUARED L2 distances; this module returns plain Euclidean
distances (sqrt), which is what PatchCore's scores are defined on (Eq. 6).
"""

from __future__ import annotations

import numpy as np

from app.core.errors import BankIncompatible


def _faiss():
    import faiss

    # Below this many queries faiss uses its own SIMD loop, which is several
    # times slower than BLAS at our dimensions (<= a few hundred); one camera
    # image already gives 784 queries, but partial batches and reweighting
    # searches are small.
    faiss.cvar.distance_compute_blas_threshold = 1
    return faiss


def faiss_has_gpu() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class NearestNeighbourIndex:
    """Exact L2 index over bank features (M, D) float32; GPU index when asked and available."""

    def __init__(self, features: np.ndarray, use_gpu: bool = False):
        features = validate_features(features)
        faiss = _faiss()
        self.dim = features.shape[1]
        self.size = features.shape[0]
        index = faiss.IndexFlatL2(self.dim)
        if use_gpu and faiss_has_gpu():
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        index.add(features)
        self._index = index
        self._features = features  # kept for reconstruct(); the bank owns this array anyway

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Bank features for ids (K,) -> (K, D)."""
        return self._features[np.asarray(ids, dtype=np.int64)]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, D) -> (distances (Q, k) Euclidean float32, indices (Q, k) int64)."""
        queries = validate_features(queries, self.dim)
        squared, indices = self._index.search(queries, min(k, self.size))
        return np.sqrt(np.maximum(squared, 0.0)), indices


def validate_features(array: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Refuse anything but a finite 2-D float32 array of the right width (C-contiguous on return)."""
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        raise BankIncompatible(f"features must be a 2-D array, got {getattr(array, 'shape', type(array))}")
    if array.dtype != np.float32:
        raise BankIncompatible(f"features must be float32, got {array.dtype}")
    if dim is not None and array.shape[1] != dim:
        raise BankIncompatible(f"feature dimension {array.shape[1]} does not match the bank's {dim}")
    return np.ascontiguousarray(array)
