import numpy as np
import pytest
import torch

from app.core.errors import BankIncompatible
from app.core.knn import NearestNeighbourIndex
from app.core.scoring import anomaly_maps, reweighting_factors, score_patches


def test_knn_distances_match_brute_force():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(3000, 152)).astype(np.float32)
    queries = rng.normal(size=(500, 152)).astype(np.float32)
    distances, ids = NearestNeighbourIndex(bank).search(queries, k=3)
    reference = torch.cdist(torch.from_numpy(queries).double(), torch.from_numpy(bank).double())
    ref_d, ref_i = reference.topk(3, largest=False)
    np.testing.assert_allclose(distances, ref_d.numpy(), rtol=1e-4, atol=1e-4)  # Euclidean, not squared
    assert (ids[:, 0] == ref_i[:, 0].numpy()).mean() > 0.999


def test_index_refuses_wrong_arrays():
    index = NearestNeighbourIndex(np.zeros((4, 8), np.float32))
    with pytest.raises(BankIncompatible, match="dimension"):
        index.search(np.zeros((2, 9), np.float32))
    with pytest.raises(BankIncompatible, match="float32"):
        index.search(np.zeros((2, 8), np.float64))


def test_image_score_is_max_patch_distance():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(200, 8)).astype(np.float32)
    embeddings = rng.normal(size=(2, 4, 5, 8)).astype(np.float32)
    embeddings[1, 2, 3] += 10.0  # one far-away patch
    patch, image = score_patches(NearestNeighbourIndex(bank), embeddings)
    brute = torch.cdist(torch.from_numpy(embeddings.reshape(-1, 8)), torch.from_numpy(bank)).min(1).values
    np.testing.assert_allclose(patch.ravel(), brute.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(image, patch.reshape(2, -1).max(1), rtol=1e-6)
    assert np.unravel_index(patch[1].argmax(), patch[1].shape) == (2, 3)


def test_reweighting_matches_equation_7():
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(100, 6)).astype(np.float32)
    index = NearestNeighbourIndex(bank)
    test_patch = rng.normal(size=(1, 6)).astype(np.float32) * 2
    _, nearest = index.search(test_patch, k=1)
    m_star = nearest[0, 0]
    b = 4
    weight = reweighting_factors(index, test_patch, nearest[:, 0], b)[0]
    # By hand: N_b(m*) = the b nearest bank features of m* (m* itself first).
    d_bank = np.linalg.norm(bank.astype(np.float64) - bank[m_star], axis=1)
    neighbourhood = np.argsort(d_bank)[:b]
    assert neighbourhood[0] == m_star
    dist = np.linalg.norm(bank[neighbourhood].astype(np.float64) - test_patch[0], axis=1)
    expected = 1.0 - np.exp(dist[0]) / np.exp(dist).sum()
    assert weight == pytest.approx(expected, rel=1e-5)

    embeddings = test_patch.reshape(1, 1, 1, 6)
    _, plain = score_patches(index, embeddings)
    _, reweighted = score_patches(index, embeddings, reweight_neighbours=b)
    assert reweighted[0] == pytest.approx(plain[0] * expected, rel=1e-5)


def test_maps_come_back_at_the_original_size_and_place():
    patch = np.zeros((2, 28, 28), np.float32)
    patch[0, 2, 25] = 5.0   # top-right corner of the frame
    maps = anomaly_maps(patch, 224, [(300, 900), (51, 37)], sigma=4.0)
    assert maps[0].shape == (300, 900) and maps[1].shape == (51, 37)
    y, x = np.unravel_index(maps[0].argmax(), maps[0].shape)
    assert y < 0.2 * 300 and x > 0.8 * 900
    assert maps[0].dtype == np.float32 and np.isfinite(maps[0]).all()
    assert maps[0].max() < 5.0  # smoothed


def test_device_tensor_path_scores_as_the_host_path():
    """Features handed over as a tensor (a GPU embedder's output) are searched in place by
    TorchExactIndex; patch and image scores equal faiss's on the same numbers."""
    from app.core.knn import TorchExactIndex

    rng = np.random.default_rng(3)
    bank = rng.normal(size=(500, 24)).astype(np.float32)
    embeddings = rng.normal(size=(3, 5, 5, 24)).astype(np.float32)
    want_patches, want_images = score_patches(NearestNeighbourIndex(bank), embeddings, top_k=3)
    got_patches, got_images = score_patches(TorchExactIndex(bank), torch.from_numpy(embeddings), top_k=3)
    np.testing.assert_allclose(got_patches, want_patches, rtol=1e-4)
    np.testing.assert_allclose(got_images, want_images, rtol=1e-4)


@pytest.mark.parametrize(("image_size", "sigma"), [(32, 7.9), (64, 16.0), (128, 32.0)])
def test_a_large_sigma_on_a_small_input_still_gives_a_map(image_size, sigma):
    """Both values are allowed at build time; the reflect padding of a 4-sigma kernel longer
    than the map failed every predict of such a product (500)."""
    scores = np.random.default_rng(0).random((2, image_size // 8, image_size // 8)).astype(np.float32)
    maps = anomaly_maps(scores, image_size, [(100, 80), (50, 50)], sigma=sigma)
    assert [m.shape for m in maps] == [(100, 80), (50, 50)]
    assert all(np.isfinite(m).all() for m in maps)


def test_a_thin_input_is_smoothed_along_its_long_side_as_far_as_that_side_allows():
    """An aspect-kept input (32 x 128 at S = 64): sigma 16 is cut at 31 px across the 32-px side,
    and runs its full 4 sigma (64 px) along the 128-px side."""
    from app.core.scoring import gaussian_kernel, smoothed_maps

    scores = np.zeros((1, 4, 16), np.float32)
    scores[0, :, 8] = 1.0  # one column of patches: the map spreads along the long side only
    row = smoothed_maps(scores, (32, 128), sigma=16.0)[0, 16].numpy()
    impulse = torch.nn.functional.interpolate(torch.from_numpy(scores)[:, None], size=(32, 128),
                                              mode="bilinear", align_corners=False)[0, 0, 16]
    kernel = gaussian_kernel(16.0, max_radius=127)
    pad = len(kernel) // 2
    want = torch.nn.functional.conv1d(torch.nn.functional.pad(impulse[None, None], (pad, pad), mode="reflect"),
                                      kernel.view(1, 1, -1))[0, 0].numpy()
    np.testing.assert_allclose(row, want, rtol=1e-4, atol=1e-6)
    assert len(kernel) == 2 * 64 + 1
