"""The batch function with the real engine: one backbone pass for images of different
products that share an EmbedderConfig, then each product's kNN on its slice."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.images import decode_image
from app.core.patchcore import PatchCoreModel
from app.service.inference import prepare, score_prepared
from app.service.registry import LoadedProduct, describe_bank

pytestmark = pytest.mark.slow


class CountingEmbedder:
    """Delegates to the real embedder and counts backbone passes."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[int] = []

    def preprocess(self, images, boxes=None):
        return self.inner.preprocess(images, boxes)

    def embed(self, batch, on_device=False):
        self.calls.append(int(batch.shape[0]))
        return self.inner.embed(batch, on_device=on_device)

    def __getattr__(self, name):  # config, feature_dim, device, ...
        return getattr(self.inner, name)


def test_mixed_products_share_one_backbone_pass(server, bottle_job, tile_bank, embedder,
                                                bottle_good, bottle_defect, tile_test):
    bottle = server.state.predictor.get("bottle")
    counting = CountingEmbedder(embedder)
    tile = LoadedProduct("tile", "v1", PatchCoreModel(tile_bank, counting), describe_bank(tile_bank))
    bottle_counted = LoadedProduct("bottle", bottle.version,
                                   PatchCoreModel(bottle.model.bank, counting), bottle.info)
    inputs = [(bottle_counted, bottle_good[0]), (tile, tile_test), (bottle_counted,
                                                                     bottle_defect[0])]
    items = [prepare(p, path.read_bytes(), 10_000_000, keep_image=False) for p, path in inputs]
    results = score_prepared(items)
    # One backbone pass per input shape, across products: both bottles (224 x 224) in one,
    # the tile at its own aspect-kept shape in the other.
    assert tile.model.input_shapes([decode_image(tile_test)]) != [(224, 224)]
    assert sorted(counting.calls) == [1, 2], "one backbone pass per input shape of the mixed batch"
    for (product, path), result in zip(inputs, results, strict=True):
        alone = product.model.predict([decode_image(path)])[0]
        assert result.raw_score == pytest.approx(alone.raw_score, rel=1e-4)
        assert result.is_anomalous == alone.is_anomalous
        assert result.normalised_map.shape == decode_image(path).shape[:2]
        assert np.allclose(result.normalised_map, alone.normalised_map, rtol=1e-3, atol=1e-4)


def test_a_failing_product_fails_only_its_images(server, bottle_job, bottle_good, tile_test,
                                                 tile_bank, embedder):
    bottle = server.state.predictor.get("bottle")

    class Broken:
        embedder = bottle.embedder
        framing = bottle.model.framing

        def preprocess(self, arrays, original_sizes=None):
            return bottle.model.preprocess(arrays, original_sizes)

        def predict_embeddings(self, embeddings, sizes):
            raise RuntimeError("index exploded")

    broken = LoadedProduct("broken", "v0", Broken(), bottle.info)
    items = [prepare(bottle, bottle_good[0].read_bytes(), 10_000_000, False),
             prepare(broken, bottle_good[0].read_bytes(), 10_000_000, False)]
    good, bad = score_prepared(items)
    assert good.raw_score > 0
    assert isinstance(bad, RuntimeError)
