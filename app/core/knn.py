"""Exact nearest-neighbour search over a memory bank: faiss (IndexFlatL2) or torch.

Both return plain Euclidean distances (sqrt of the squared L2), which is what
PatchCore's scores are defined on (Eq. 6).

Which one runs (`create_index`, backend "auto"):
1. faiss with a GPU index, when the faiss build has GPUs and the device is CUDA;
2. `TorchExactIndex` on the embedder's CUDA device otherwise (faiss-cpu cannot
   search on the GPU, and a CPU search caps a GPU host near 50 images/s);
3. faiss in fp32 on a CPU. `TorchExactIndex` runs on a CPU too (the tests
   compare it with faiss there), but is not faster there: torch's fp32 GEMM is
   slower than faiss's OpenBLAS on this AMD CPU, and in bf16 the GEMM gets about
   1.5-2x faster but the extra passes over the distance tile that find the
   re-rank candidates (compare + nonzero) cost as much as that saves in eager
   torch (measured on bottle; README).
On CUDA the default precision is bf16 with the exact re-rank (the answer is the
fp32 answer, see `TorchExactIndex`); `precision="fp32"` gives plain fp32 products.
"""

from __future__ import annotations

import os
from typing import Literal, Protocol

import numpy as np
import torch

from app.core.errors import BankIncompatible

SearchBackend = Literal["auto", "faiss", "torch"]
SearchPrecision = Literal["auto", "fp32", "bf16", "fp16"]
SEARCH_BACKENDS: tuple[str, ...] = ("auto", "faiss", "torch")
SEARCH_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")


class SearchIndex(Protocol):
    dim: int
    size: int

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]: ...

    def reconstruct(self, ids: np.ndarray) -> np.ndarray: ...


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
    """Exact L2 index over bank features (M, D) float32 with faiss; GPU index when asked and available."""

    def __init__(self, features: np.ndarray, use_gpu: bool = False):
        features = validate_features(features)
        faiss = _faiss()
        self.dim = features.shape[1]
        self.size = features.shape[0]
        index = faiss.IndexFlatL2(self.dim)
        self.on_gpu = False
        if use_gpu and faiss_has_gpu():
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
            self.on_gpu = True
        index.add(features)
        self._index = index
        self._features = features  # kept for reconstruct(); the bank owns this array anyway

    def describe(self) -> dict:
        return {"backend": "faiss", "device": "cuda" if self.on_gpu else "cpu", "precision": "fp32"}

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Bank features for ids (K,) -> (K, D)."""
        return self._features[np.asarray(ids, dtype=np.int64)]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, D) -> (distances (Q, k) Euclidean float32, indices (Q, k) int64)."""
        queries = validate_features(queries, self.dim)
        squared, indices = self._index.search(queries, min(k, self.size))
        return np.sqrt(np.maximum(squared, 0.0)), indices


# Unit roundoff of the low-precision formats (8 and 11 significand bits).
_UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
_FP16_MAX_PRODUCT = 1.0e4  # |q| |b| above this risks fp16 overflow in the dot products


class TorchExactIndex:
    """Exact L2 search in torch on any device: the bank stays resident on that device.

    Squared distances come from one matrix product per tile plus the norms
    (|q|^2 + |b|^2 - 2 q.b), the minimum is kept per query, and the work is tiled
    over queries and bank rows so memory stays bounded (`max_tile_elements`).
    Bank and queries are centred on the bank mean first: distances do not change,
    the norms shrink, and so does the rounding error of the norm identity.

    precision "bf16"/"fp16" (k = 1 only; k > 1 always runs in fp32): the products run
    in low precision, then every bank row that could still be the nearest is re-ranked
    exactly in fp32. Which rows can: with unit roundoff u, rounding q and b and the
    product to the format changes q.b by at most (3u + u^2)|q||b| (Cauchy-Schwarz), so
    an approximate squared distance is off by at most e_q = 2 (3u + u^2 + D 2^-24)
    |q| max|b| (+ fp32 rounding of the norms). The true nearest row then lies within
    min(approx) + 2 e_q, and all rows in that window are re-ranked with exact fp32
    differences: the answer is the fp32 answer, never an approximation of it. A query
    chunk whose window holds more than `max_candidates` rows per query (degenerate
    banks) is searched in fp32 instead.
    """

    def __init__(self, features: np.ndarray, device: str | torch.device = "cpu",
                 precision: Literal["fp32", "bf16", "fp16"] = "fp32",
                 max_tile_elements: int | None = None, max_candidates: int = 64):
        features = validate_features(features)
        self.device = torch.device(device)
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.dim, self.size = features.shape[1], features.shape[0]
        self._features = features
        bank = torch.from_numpy(features).to(self.device)
        self._mean = bank.mean(0, dtype=torch.float64).float()
        self._bank = (bank - self._mean).contiguous()
        self._bank_sq = (self._bank * self._bank).sum(1)
        self._bank_norm_max = float(self._bank_sq.max().sqrt()) if self.size else 0.0
        self._low: torch.Tensor | None = None
        self._low_dtype: torch.dtype | None = None
        if precision != "fp32":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            self._low_dtype = dtype
            self._low = _augment(self._bank, self._bank_sq, dtype, query_side=False)
        self.precision = precision
        # Tiles of (queries x bank rows): 4M elements (16 MB fp32) on a CPU, where the
        # tile should stay near the caches; 256M on a GPU.
        default = 1 << 28 if self.device.type == "cuda" else 1 << 22
        self.max_tile_elements = int(max_tile_elements or default)
        self.max_candidates = int(max_candidates)
        self.fallback_queries = 0  # queries searched in fp32 because their window was too wide

    def describe(self) -> dict:
        return {"backend": "torch", "device": str(self.device), "precision": self.precision}

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        return self._features[np.asarray(ids, dtype=np.int64)]

    def _tiles(self, n_queries: int) -> tuple[int, int]:
        bank_tile = min(self.size, max(1024, self.max_tile_elements // 256))
        query_tile = max(1, min(n_queries, self.max_tile_elements // max(bank_tile, 1)))
        return query_tile, bank_tile

    @torch.inference_mode()
    def search(self, queries: np.ndarray | torch.Tensor, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, D) -> (distances (Q, k) Euclidean float32, indices (Q, k) int64), as numpy."""
        distances, indices = self.search_tensor(queries, k)
        return distances.cpu().numpy(), indices.cpu().numpy()

    @torch.inference_mode()
    def search_tensor(self, queries: np.ndarray | torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """As `search`, returning tensors on the index's device."""
        if isinstance(queries, np.ndarray):
            queries = torch.from_numpy(validate_features(queries, self.dim))
        elif queries.ndim != 2 or queries.shape[1] != self.dim or queries.dtype != torch.float32:
            raise BankIncompatible(f"queries must be (Q, {self.dim}) float32, got {tuple(queries.shape)} "
                                   f"{queries.dtype}")
        k = min(int(k), self.size)
        centred = queries.to(self.device, non_blocking=True) - self._mean
        query_tile, _ = self._tiles(centred.shape[0])
        out_d, out_i = [], []
        for start in range(0, centred.shape[0], query_tile):
            chunk = centred[start:start + query_tile]
            if k == 1 and self._low is not None:
                squared, ids = self._search_low(chunk)
            else:
                squared, ids = self._search_fp32(chunk, k)
            out_d.append(squared)
            out_i.append(ids)
        squared = torch.cat(out_d) if out_d else torch.zeros(0, k, device=self.device)
        ids = torch.cat(out_i) if out_i else torch.zeros(0, k, dtype=torch.int64, device=self.device)
        return squared.clamp_min_(0).sqrt_(), ids

    def _exact_squared(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """|q - b|^2 from the differences (no cancellation): queries (Q, D), ids (Q, k) -> (Q, k)."""
        diff = queries[:, None, :] - self._bank[ids]
        return (diff * diff).sum(-1)

    def _search_fp32(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, bank_tile = self._tiles(queries.shape[0])
        query_sq = (queries * queries).sum(1, keepdim=True)
        best_d: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for start in range(0, self.size, bank_tile):
            block = self._bank[start:start + bank_tile]
            squared = torch.addmm(query_sq + self._bank_sq[start:start + bank_tile], queries, block.T,
                                  alpha=-2.0)
            if k == 1:
                tile_d, tile_i = squared.min(1, keepdim=True)
            else:
                tile_d, tile_i = squared.topk(min(k, squared.shape[1]), dim=1, largest=False)
            tile_i = tile_i + start
            if best_d is None or best_i is None:
                best_d, best_i = tile_d, tile_i
            elif k == 1:
                better = tile_d < best_d
                best_d = torch.where(better, tile_d, best_d)
                best_i = torch.where(better, tile_i, best_i)
            else:
                merged_d, order = torch.cat([best_d, tile_d], 1).topk(k, dim=1, largest=False)
                best_i = torch.cat([best_i, tile_i], 1).gather(1, order)
                best_d = merged_d
        assert best_d is not None and best_i is not None
        # Report the winners' distances from exact differences (the identity loses digits
        # when the norms are large against the distance), re-sorted for k > 1.
        exact = self._exact_squared(queries, best_i)
        if k > 1:
            exact, order = exact.sort(dim=1, stable=True)
            best_i = best_i.gather(1, order)
        return exact, best_i

    def _search_low(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._low is not None and self._low_dtype is not None
        n, dim = queries.shape
        query_sq = (queries * queries).sum(1)
        query_norm = query_sq.sqrt()
        if self._low_dtype == torch.float16 and float(query_norm.max()) * self._bank_norm_max > _FP16_MAX_PRODUCT:
            return self._search_fp32(queries, 1)
        u = _UNIT_ROUNDOFF[self._low_dtype]
        # [q, |q|^2 hi, |q|^2 lo, 1, 1] . [-2b, 1, 1, |b|^2 hi, |b|^2 lo] = |q - b|^2 in one
        # product, whose small output rounds far less than q.b alone would.
        query_aug = _augment(queries, query_sq, self._low_dtype, query_side=True)
        # |approx - exact| <= E for every row before the final rounding (class docstring).
        bank_max = self._bank_norm_max
        error = (2.0 * (2.0 * u + u * u + (dim + 4) * 2.0 ** -23) * query_norm * bank_max
                 + 2.0 * u * u * (query_sq + bank_max ** 2) + 2.0 ** -22 * (query_sq + bank_max ** 2))
        _, bank_tile = self._tiles(n)
        running = torch.full((n,), float("inf"), device=queries.device)
        pair_q: list[torch.Tensor] = []
        pair_b: list[torch.Tensor] = []
        budget = self.max_candidates * n
        found = 0
        for start in range(0, self.size, bank_tile):
            approx = query_aug @ self._low[start:start + bank_tile].T  # (n, tile), low precision
            torch.minimum(running, approx.amin(1).float(), out=running)
            # With output rounding d~ = s (1 + delta), |delta| <= u, the true nearest row has
            # d~ <= (|min d~| + 2E)(1 + 3u). The running minimum only decreases, so the rows
            # kept now are a superset of the final window. The bound is rounded up into the format.
            limit = ((running.abs() + 2.0 * error) * (1.0 + 5.0 * u)).to(self._low_dtype)
            rows, cols = torch.nonzero(approx <= limit[:, None], as_tuple=True)
            found += rows.numel()
            if found > budget:
                self.fallback_queries += n
                return self._search_fp32(queries, 1)
            pair_q.append(rows)
            pair_b.append(cols + start)
        rows, cols = torch.cat(pair_q), torch.cat(pair_b)
        diff = queries[rows] - self._bank[cols]
        exact = (diff * diff).sum(1)
        # Nearest per query: sort by distance, then (stably) by query; the first of each run wins.
        order = torch.sort(exact, stable=True).indices
        order = order[torch.sort(rows[order], stable=True).indices]
        rows, cols, exact = rows[order], cols[order], exact[order]
        first = torch.ones_like(rows, dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]
        best_i = torch.empty(n, dtype=torch.int64, device=queries.device)
        best_d = torch.empty(n, dtype=torch.float32, device=queries.device)
        best_i[rows[first]] = cols[first]
        best_d[rows[first]] = exact[first]
        return best_d[:, None], best_i[:, None]


def _augment(vectors: torch.Tensor, squared: torch.Tensor, dtype: torch.dtype, query_side: bool) -> torch.Tensor:
    """Rows for the one-product distance: the squared norm split into two low-precision parts
    (hi + lo holds it to about u^2), so the norms add almost exactly inside the product."""
    hi = squared.to(dtype)
    lo = (squared - hi.float()).to(dtype)
    ones = torch.ones_like(hi)
    if query_side:
        parts = [vectors.to(dtype), hi[:, None], lo[:, None], ones[:, None], ones[:, None]]
    else:
        parts = [(-2.0 * vectors).to(dtype), ones[:, None], ones[:, None], hi[:, None], lo[:, None]]
    return torch.cat(parts, dim=1).contiguous()


def resolve_search(device: torch.device | str, backend: SearchBackend = "auto",
                   precision: SearchPrecision = "auto") -> tuple[str, str]:
    """(backend, precision) that `create_index` will use for this device."""
    device = torch.device(device)
    # A deployment picks without code, as for the backbone runtime.
    if backend == "auto":
        backend = os.environ.get("PATCHCORE_SEARCH_BACKEND", "auto") or "auto"  # type: ignore[assignment]
    if precision == "auto":
        precision = os.environ.get("PATCHCORE_SEARCH_PRECISION", "auto") or "auto"  # type: ignore[assignment]
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"search backend must be one of {SEARCH_BACKENDS}, got {backend!r}")
    if precision not in SEARCH_PRECISIONS:
        raise ValueError(f"search precision must be one of {SEARCH_PRECISIONS}, got {precision!r}")
    if backend == "auto":
        if device.type == "cuda":
            backend = "faiss" if faiss_has_gpu() else "torch"
        else:
            backend = "torch" if precision in ("bf16", "fp16") else "faiss"
    if backend == "faiss":
        if precision not in ("auto", "fp32"):
            raise ValueError("the faiss backend searches in fp32 only")
        return "faiss", "fp32"
    if precision == "auto":
        # bf16 products run at the tensor-core rate on a GPU; the re-rank keeps the answer exact.
        precision = "bf16" if device.type == "cuda" else "fp32"
    return "torch", precision


def create_index(features: np.ndarray, device: torch.device | str = "cpu", backend: SearchBackend = "auto",
                 precision: SearchPrecision = "auto") -> SearchIndex:
    """The exact search index for a bank on `device` (see the module docstring for the choice)."""
    device = torch.device(device)
    chosen, chosen_precision = resolve_search(device, backend, precision)
    if chosen == "faiss":
        return NearestNeighbourIndex(features, use_gpu=device.type == "cuda")
    return TorchExactIndex(features, device=device, precision=chosen_precision)  # type: ignore[arg-type]


def validate_features(array: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Refuse anything but a finite 2-D float32 array of the right width (C-contiguous on return)."""
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        raise BankIncompatible(f"features must be a 2-D array, got {getattr(array, 'shape', type(array))}")
    if array.dtype != np.float32:
        raise BankIncompatible(f"features must be float32, got {array.dtype}")
    if dim is not None and array.shape[1] != dim:
        raise BankIncompatible(f"feature dimension {array.shape[1]} does not match the bank's {dim}")
    return np.ascontiguousarray(array)
