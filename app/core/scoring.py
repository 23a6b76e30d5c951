"""Anomaly scores and maps (PatchCore, Sec. 3.3).

Distances are Euclidean (not squared) everywhere in this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from app.core.framing import Box, paste_box
from app.core.knn import SearchIndex, TorchExactIndex


def score_patches(index: SearchIndex, embeddings: np.ndarray | torch.Tensor,
                  reweight_neighbours: int = 0, top_k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """embeddings (B, h, w, D) -> (patch scores (B, h, w), image scores (B,)).

    Patch score: distance of each patch to its nearest bank feature.
    Image score s*: the maximum patch score (Eq. 6), or with top_k > 1 the mean of
    the top_k patch scores (one stray patch then counts less). With
    reweight_neighbours = b > 0, s* is scaled by Eq. 7:
    w = 1 - exp(||m_test* - m*||) / sum_{m in N_b(m*)} exp(||m_test* - m||),
    which lowers the score when m* sits in a dense region of the bank.
    """
    batch, height, width, dim = embeddings.shape
    if isinstance(embeddings, torch.Tensor) and reweight_neighbours == 0 and isinstance(index, TorchExactIndex):
        # Features already on the index's device (a GPU): only the B x h x w distances
        # come back to the host.
        distances_t, _ = index.search_tensor(embeddings.reshape(-1, dim), k=1)
        patch_scores = distances_t[:, 0].reshape(batch, height * width).cpu().numpy()
        image_scores = image_scores_from(patch_scores, top_k)
        return patch_scores.reshape(batch, height, width), image_scores
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.cpu().numpy()
    flat = np.ascontiguousarray(embeddings.reshape(-1, dim), dtype=np.float32)
    distances, nearest = index.search(flat, k=1)
    patch_scores = distances[:, 0].reshape(batch, height * width)
    worst_patch = patch_scores.argmax(axis=1)                       # m_test* per image
    image_scores = image_scores_from(patch_scores, top_k)
    if reweight_neighbours > 0:
        flat_worst = np.arange(batch) * height * width + worst_patch
        image_scores *= reweighting_factors(index, flat[flat_worst], nearest[flat_worst, 0],
                                            reweight_neighbours)
    return patch_scores.reshape(batch, height, width), image_scores


def image_scores_from(patch_scores: np.ndarray, top_k: int = 1) -> np.ndarray:
    """(B, ...) patch scores -> (B,) float64: the mean of each image's top_k patch scores."""
    flat = np.asarray(patch_scores).reshape(len(patch_scores), -1)
    k = max(1, min(int(top_k), flat.shape[1]))
    if k == 1:
        return flat.max(axis=1).astype(np.float64)
    return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].astype(np.float64).mean(axis=1)


def reweighting_factors(index: SearchIndex, worst_patches: np.ndarray,
                        nearest_bank_ids: np.ndarray, neighbours: int) -> np.ndarray:
    """Eq. 7 weights for each image: worst_patches (B, D) are m_test*, nearest_bank_ids (B,) are m*."""
    bank_features = index.reconstruct(nearest_bank_ids)                     # m* (B, D)
    _, neighbourhood = index.search(bank_features, k=neighbours)            # N_b(m*), m* itself first
    weights = np.empty(len(worst_patches), dtype=np.float64)
    for i, (patch, ids) in enumerate(zip(worst_patches, neighbourhood, strict=True)):
        ids = ids[ids >= 0]
        # Distances from m_test* to m* and to the other members of N_b(m*).
        members = index.reconstruct(np.concatenate([[nearest_bank_ids[i]], ids[ids != nearest_bank_ids[i]]]))
        dist = np.linalg.norm(members.astype(np.float64) - patch.astype(np.float64), axis=1)
        softmax = np.exp(dist - dist.max())
        softmax /= softmax.sum()
        weights[i] = 1.0 - softmax[0]
    return weights


# Patch scores lie on the backbone's stride-8 grid (the finer of its two stages, Sec. 3.1).
PATCH_STRIDE = 8


def input_size_of(patch_scores: np.ndarray) -> tuple[int, int]:
    """(H, W) of the network input that gave patch scores (..., h, w): S x S, or an aspect-kept
    input's own shape."""
    return PATCH_STRIDE * int(patch_scores.shape[-2]), PATCH_STRIDE * int(patch_scores.shape[-1])


def gaussian_kernel(sigma: float, max_radius: int | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian, truncated at 4 sigma (or at max_radius when that is shorter)."""
    radius = int(4.0 * sigma + 0.5)
    if max_radius is not None:
        radius = min(radius, max_radius)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def smoothed_maps(patch_scores: np.ndarray, input_size: int | tuple[int, int], sigma: float = 4.0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """patch scores (B, h, w) -> maps (B, H, W) at the network input's size (S, or (H, W)
    for an aspect-kept input), on the CPU.

    As in the paper, patch scores are upsampled bilinearly to the network input
    and smoothed there with a Gaussian of sigma 4. On a GPU `device` this
    runs there (at batch 64 it took 43 ms on 16 CPU cores, most of a GPU batch's time).
    """
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    scores = torch.from_numpy(np.ascontiguousarray(patch_scores, dtype=np.float32))[:, None].to(device)
    maps = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
    if sigma > 0:
        # Reflect padding needs a radius under the map's side: a large sigma on a small input
        # (sigma 16 at 64 px, both allowed) made every predict fail; the kernel is cut there,
        # on each axis at its own side (an aspect-kept input is narrower one way).
        along_width = gaussian_kernel(sigma, max_radius=width - 1).to(maps.device)
        along_height = (along_width if height == width
                        else gaussian_kernel(sigma, max_radius=height - 1).to(maps.device))
        pad = len(along_width) // 2
        maps = F.conv2d(F.pad(maps, (pad, pad, 0, 0), mode="reflect"), along_width.view(1, 1, 1, -1))
        pad = len(along_height) // 2
        maps = F.conv2d(F.pad(maps, (0, 0, pad, pad), mode="reflect"), along_height.view(1, 1, -1, 1))
    return maps[:, 0].cpu()


def to_original_size(smoothed: torch.Tensor, size: tuple[int, int], box: Box | None = None) -> np.ndarray:
    """One smoothed map (h, w) -> (H, W) float32 over the photo the camera sent.

    The network saw `box` (x0, y0, x1, y1, original pixels; None = the whole frame)
    resized to its input shape, so the map is resized back onto that box, whatever its aspect,
    and is zero outside it.
    """
    height, width = int(size[0]), int(size[1])
    x0, y0, x1, y1 = paste_box(box, height, width) if box is not None else (0, 0, width, height)
    resized = F.interpolate(smoothed[None, None], size=(y1 - y0, x1 - x0), mode="bilinear",
                            align_corners=False)[0, 0].numpy()
    if (x0, y0, x1, y1) == (0, 0, width, height):
        return resized
    full = np.zeros((height, width), dtype=np.float32)
    full[y0:y1, x0:x1] = resized
    return full


def anomaly_maps(patch_scores: np.ndarray, image_size: int | tuple[int, int], original_sizes: Sequence[tuple[int, int]],
                 sigma: float = 4.0, boxes: Sequence[Box | None] | None = None) -> list[np.ndarray]:
    """patch scores (B, h, w) -> one map (H_i, W_i) float32 per image, at its ORIGINAL size."""
    maps = smoothed_maps(patch_scores, image_size, sigma)
    boxes = boxes if boxes is not None else [None] * len(original_sizes)
    return [to_original_size(maps[i], size, box) for i, (size, box) in enumerate(zip(original_sizes, boxes,
                                                                                      strict=True))]
