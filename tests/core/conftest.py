"""Fixtures for the engine tests: the real default backbone (real images: tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from app.core.embedding import EmbedderConfig, PatchEmbedder, create_embedder


@pytest.fixture(scope="session")
def lite0() -> PatchEmbedder:
    torch.manual_seed(0)
    return create_embedder(EmbedderConfig(), device="cpu")


@pytest.fixture(scope="session")
def lite0_small() -> PatchEmbedder:
    """Same backbone at 128 px: fast enough for build-and-score tests."""
    return create_embedder(EmbedderConfig(image_size=128), device="cpu")


@pytest.fixture(scope="session")
def lite0_mean() -> PatchEmbedder:
    """The 3x3-average neighbourhood (banks built before the flatten default)."""
    return create_embedder(EmbedderConfig(aggregation="mean", stage_dim=None), device="cpu")
