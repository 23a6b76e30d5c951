"""Torch exact search (the GPU path, run here on the CPU) against faiss and a float64 reference."""

import numpy as np
import pytest
import torch

from app.core.errors import BankIncompatible
from app.core.knn import NearestNeighbourIndex, TorchExactIndex, create_index, resolve_search
from app.core.scoring import score_patches


def _clustered(rng: np.random.Generator, n: int, dim: int, centres: int = 40, offset: float = 3.0) -> np.ndarray:
    """Patch-feature-like data: tight clusters far from the origin (large norms, small distances),
    the case where low-precision products lose the most."""
    means = rng.normal(size=(centres, dim)) + offset
    return (means[rng.integers(0, centres, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def _reference(queries: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    dist = torch.cdist(torch.from_numpy(queries).double(), torch.from_numpy(bank).double())
    d, i = dist.topk(k, largest=False)
    return d.numpy(), i.numpy()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_torch_search_equals_faiss_and_float64(precision):
    rng = np.random.default_rng(0)
    bank = _clustered(rng, 5000, 152)
    queries = _clustered(rng, 700, 152)
    # Small tiles so several query and bank tiles (and the running minimum) are exercised.
    index = TorchExactIndex(bank, precision=precision, max_tile_elements=1 << 16)
    distances, ids = index.search(queries, k=1)
    faiss_d, faiss_i = NearestNeighbourIndex(bank).search(queries, k=1)
    ref_d, ref_i = _reference(queries, bank, 1)
    np.testing.assert_allclose(distances, faiss_d, rtol=1e-4)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-5)
    # The winners are the true nearest rows wherever the runner-up is not a near-tie.
    assert (ids == ref_i).mean() > 0.999
    assert (ids == faiss_i).mean() > 0.999
    assert index.fallback_queries == 0  # the certified window stayed narrow


def test_low_precision_reranks_rows_the_products_misorder():
    """Rows whose bf16 distances tie or swap with the winner's must still give the exact winner."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=152).astype(np.float32) + 5.0
    # Two clusters at +-base (so |b| ~ 60 after centring); rows differ by ~0.01: below
    # bf16's resolution of the products at that norm.
    sign = np.where(np.arange(2000) % 2 == 0, 1.0, -1.0)[:, None]
    bank = (sign * base + 1e-2 * rng.normal(size=(2000, 152))).astype(np.float32)
    queries = (base + 1e-2 * rng.normal(size=(64, 152))).astype(np.float32)
    index = TorchExactIndex(bank, precision="bf16", max_candidates=2000)
    distances, ids = index.search(queries)
    assert index.fallback_queries == 0
    ref_d, ref_i = _reference(queries, bank, 1)
    # bf16 products alone pick the wrong row for most of these queries ...
    q, b = torch.from_numpy(queries - bank.mean(0)), torch.from_numpy(bank - bank.mean(0))
    plain = ((b * b).sum(1)[None] - 2 * (q.bfloat16() @ b.bfloat16().T).float()).argmin(1).numpy()
    assert (plain != ref_i[:, 0]).mean() > 0.5
    # ... the re-rank gives the exact answer.
    np.testing.assert_allclose(distances, ref_d, rtol=1e-4)
    np.testing.assert_array_equal(ids, ref_i)


def test_wide_windows_fall_back_to_fp32():
    rng = np.random.default_rng(2)
    # Two clusters far apart: norms stay ~100 after centring, distances ~2, so
    # every row of the near cluster lies within the error bound of the products.
    sign = np.where(np.arange(500) % 2 == 0, 1.0, -1.0)[:, None]
    bank = (sign * 100.0 + rng.normal(size=(500, 16)) * 0.3).astype(np.float32)
    queries = (100.0 + rng.normal(size=(20, 16)) * 0.3).astype(np.float32)
    index = TorchExactIndex(bank, precision="bf16", max_candidates=4)
    distances, ids = index.search(queries)
    ref_d, ref_i = _reference(queries, bank, 1)
    assert index.fallback_queries == 20
    np.testing.assert_allclose(distances, ref_d, rtol=1e-3)


def test_torch_search_top_k_and_scores_match_faiss():
    rng = np.random.default_rng(3)
    bank = _clustered(rng, 3000, 64)
    queries = _clustered(rng, 300, 64)
    for precision in ("fp32", "bf16"):
        index = TorchExactIndex(bank, precision=precision, max_tile_elements=1 << 15)
        distances, ids = index.search(queries, k=5)  # k > 1 always runs in fp32
        ref_d, ref_i = _reference(queries, bank, 5)
        np.testing.assert_allclose(distances, ref_d, rtol=1e-5)
        assert (ids == ref_i).mean() > 0.999
        embeddings = queries.reshape(3, 10, 10, 64)
        patch, image = score_patches(index, embeddings, reweight_neighbours=3)
        patch_f, image_f = score_patches(NearestNeighbourIndex(bank), embeddings, reweight_neighbours=3)
        np.testing.assert_allclose(patch, patch_f, rtol=1e-4)
        np.testing.assert_allclose(image, image_f, rtol=1e-4)


def test_torch_index_refuses_wrong_arrays():
    index = TorchExactIndex(np.zeros((4, 8), np.float32))
    with pytest.raises(BankIncompatible, match="dimension"):
        index.search(np.zeros((2, 9), np.float32))
    with pytest.raises(BankIncompatible, match="float32"):
        index.search(np.zeros((2, 8), np.float64))
    with pytest.raises(ValueError, match="precision"):
        TorchExactIndex(np.zeros((4, 8), np.float32), precision="int8")  # type: ignore[arg-type]


def test_selection(monkeypatch):
    monkeypatch.delenv("PATCHCORE_SEARCH_BACKEND", raising=False)
    monkeypatch.delenv("PATCHCORE_SEARCH_PRECISION", raising=False)
    assert resolve_search("cpu") == ("faiss", "fp32")
    assert resolve_search("cpu", "torch") == ("torch", "fp32")
    assert resolve_search("cpu", precision="bf16") == ("torch", "bf16")
    with pytest.raises(ValueError, match="fp32 only"):
        resolve_search("cpu", "faiss", "bf16")
    bank = np.zeros((4, 8), np.float32)
    assert isinstance(create_index(bank, "cpu"), NearestNeighbourIndex)
    assert isinstance(create_index(bank, "cpu", "torch"), TorchExactIndex)
    # A deployment's choice through the environment (the service has no other knob).
    monkeypatch.setenv("PATCHCORE_SEARCH_BACKEND", "torch")
    monkeypatch.setenv("PATCHCORE_SEARCH_PRECISION", "bf16")
    assert resolve_search("cpu") == ("torch", "bf16")
    assert resolve_search("cpu", "faiss", "fp32") == ("faiss", "fp32")  # an explicit choice wins


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_search_equals_faiss():
    rng = np.random.default_rng(4)
    bank = _clustered(rng, 20000, 152)
    queries = _clustered(rng, 3136, 152)
    backend, precision = resolve_search("cuda")
    assert backend in ("faiss", "torch")
    index = create_index(bank, "cuda")
    distances, _ = index.search(queries)
    faiss_d, _ = NearestNeighbourIndex(bank).search(queries)
    np.testing.assert_allclose(distances, faiss_d, rtol=1e-4)
    for forced in ("fp32", "bf16", "fp16"):
        d, _ = TorchExactIndex(bank, "cuda", precision=forced).search(queries)
        np.testing.assert_allclose(d, faiss_d, rtol=1e-4)
