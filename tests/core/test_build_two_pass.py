"""The build keeps only the coreset's projection while selecting, then embeds the chosen
rows again: the same bank as selecting from the full features (real bottle images)."""

import numpy as np
import pytest

from app.core.coreset import select_coreset
from app.core.embedding import EmbedderConfig
from app.core.images import list_images
from app.core.patchcore import PatchCoreConfig, _split_holdout, build_bank, collect_rows, embed_images

CONFIG = PatchCoreConfig(embedder=EmbedderConfig(image_size=128), coreset_ratio=0.1, batch_size=3)


@pytest.fixture(scope="module")
def train(shared_data):
    return list_images(shared_data / "bottle" / "train" / "good")[:10]


@pytest.fixture(scope="module")
def tiles(shared_data):
    """magnetic_tile's frames vary in aspect: with the aspect kept their patch grids differ."""
    return list_images(shared_data / "magnetic_tile" / "train" / "good")[:60:6]


@pytest.mark.parametrize("images", ["train", "tiles"])
def test_two_pass_build_equals_selecting_from_the_full_features(images, lite0_small, request):
    train = request.getfixturevalue(images)
    bank = build_bank(train, CONFIG, lite0_small)
    fit, _ = _split_holdout(len(train), CONFIG)
    grids: list[tuple[int, int]] = []
    full = embed_images(lite0_small, [train[i] for i in fit], CONFIG.batch_size, grids=grids)
    assert full.shape[0] == sum(h * w for h, w in grids)
    if images == "tiles":
        assert len(set(grids)) > 1
    reference = select_coreset(full, bank.size, projection_dim=CONFIG.projection_dim, seed=CONFIG.seed)
    np.testing.assert_allclose(bank.features, full[np.sort(reference.indices)], rtol=1e-5, atol=1e-6)
    assert bank.manifest["coreset"]["coverage_radius"] == pytest.approx(reference.radius, rel=1e-6)
    assert bank.manifest["coreset"]["total_patches"] == full.shape[0]


@pytest.mark.parametrize("images", ["train", "tiles"])
def test_collect_rows_embeds_only_the_images_that_hold_a_chosen_row(images, lite0_small, request):
    sources = request.getfixturevalue(images)[:7]
    grids: list[tuple[int, int]] = []
    full = embed_images(lite0_small, sources, 2, grids=grids)
    starts = np.concatenate([[0], np.cumsum([h * w for h, w in grids])])
    # Rows from images 0, 3 and 6 only (first, middle, last), out of order within an image.
    rows = np.sort(np.array([5, starts[1] - 1, starts[3] + 7, starts[3], starts[6] + 1]))
    calls = []
    embed = lite0_small.embed

    def counting(batch, **kwargs):
        calls.append(int(batch.shape[0]))
        return embed(batch, **kwargs)

    lite0_small.embed = counting
    try:
        got = collect_rows(lite0_small, sources, 2, rows, grids)
    finally:
        del lite0_small.embed
    np.testing.assert_allclose(got, full[rows], rtol=1e-5, atol=1e-6)
    assert sum(calls) == 3  # images 0, 3 and 6, not all 7
