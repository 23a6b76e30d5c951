"""Fixtures for the engine tests: the real default backbone and real images from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from app.core.embedding import EmbedderConfig, PatchEmbedder, create_embedder

REPO_ROOT = Path(__file__).resolve().parents[2]


def _data_root() -> Path | None:
    configured = os.environ.get("PATCHCORE_TEST_DATA")
    root = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    return root if (root / "bottle" / "train" / "good").is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = _data_root()
    if root is None:
        pytest.skip("real images not found: set PATCHCORE_TEST_DATA or provide ../shared/data (MVTec layout)")
    return root


@pytest.fixture(scope="session")
def lite0() -> PatchEmbedder:
    torch.manual_seed(0)
    return create_embedder(EmbedderConfig(), device="cpu")


@pytest.fixture(scope="session")
def lite0_small() -> PatchEmbedder:
    """Same backbone at 128 px: fast enough for build-and-score tests."""
    return create_embedder(EmbedderConfig(image_size=128), device="cpu")
