import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.core.embedding import EmbedderConfig, create_embedder


def test_patch_features_shape_and_batch_independence(lite0):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(224, 224), (300, 180), (97, 401)]]
    batched = lite0.embed(lite0.preprocess(images))
    assert batched.shape == (3, 28, 28, lite0.feature_dim) and batched.dtype == torch.float32
    assert lite0.feature_dim == 64 + 64  # flatten: 40 x 9 and 112 x 9 values, each pooled to 64
    for i, image in enumerate(images):
        single = lite0.embed(lite0.preprocess([image]))
        torch.testing.assert_close(single[0], batched[i], rtol=1e-4, atol=1e-4)


def test_flatten_pools_before_upsampling_and_that_changes_nothing(lite0):
    """Pooling each position's values and bilinear upsampling act on different axes and
    are both linear: the order does not matter (pooling first upsamples 4x less). The
    reference is the official unfold + pool, the embedder's is one convolution: every
    position, the zero-padded border included, must agree."""
    import math

    import torch.nn.functional as F

    torch.manual_seed(0)
    stage8, stage16 = torch.randn(2, 40, 28, 28), torch.randn(2, 112, 14, 14)
    got = lite0.aggregate([stage8, stage16])
    parts = []
    for stage, kept in zip((stage8, stage16), lite0.stage_dims, strict=True):
        local = F.unfold(stage, kernel_size=3, padding=1).reshape(2, -1, *stage.shape[-2:])
        local = F.interpolate(local, size=(28, 28), mode="bilinear", align_corners=False)  # upsample first
        local = local.permute(0, 2, 3, 1)
        local = F.adaptive_avg_pool1d(local.reshape(-1, 1, local.shape[-1]), kept).reshape(2, 28, 28, kept)
        parts.append(local / math.sqrt(kept))
    torch.testing.assert_close(got, torch.cat(parts, -1), rtol=1e-5, atol=1e-6)


def test_aggregation_is_3x3_average_then_upsample_with_equal_stage_weight(lite0_mean):
    lite0 = lite0_mean
    torch.manual_seed(0)
    stage8, stage16 = torch.randn(2, 40, 28, 28), torch.randn(2, 112, 14, 14)
    features = lite0.aggregate([stage8, stage16])
    assert features.shape == (2, 28, 28, 152)
    # An interior position of the stride-8 stage: the mean of its 3x3 neighbourhood, / sqrt(40).
    expected = stage8[0, :, 4:7, 9:12].mean(dim=(1, 2)) / np.sqrt(40)
    torch.testing.assert_close(features[0, 5, 10, :40], expected)
    # The stride-16 stage is aggregated on its own grid, then upsampled bilinearly.
    pooled = F.avg_pool2d(stage16, 3, 1, 1, count_include_pad=False)
    up = F.interpolate(pooled, size=(28, 28), mode="bilinear", align_corners=False)
    torch.testing.assert_close(features[1, :, :, 40:], up[1].permute(1, 2, 0) / np.sqrt(112))


def test_stage_dim_pools_channels(lite0_small):

    reduced = create_embedder(EmbedderConfig(image_size=128, stage_dim=32), device="cpu")
    assert reduced.feature_dim == 32 + 32
    out = reduced.embed(reduced.preprocess([np.zeros((50, 60, 3), np.uint8)]))
    assert out.shape == (1, 16, 16, 64)


@pytest.mark.parametrize("bad", [{"image_size": 100}, {"patch_size": 2}, {"stage_dim": 0},
                                 {"normalisation": "per-pixel"}])
def test_invalid_config_is_refused(bad):
    with pytest.raises(ValueError):
        EmbedderConfig(**bad).validate()


def test_flatten_aggregation_keeps_the_neighbourhood_layout():
    """The official MeanMapper: each position's C x 3 x 3 patch, channel-major, pooled to stage_dim."""
    from app.core.embedding import create_embedder

    flat = create_embedder(EmbedderConfig(image_size=128, aggregation="flatten", stage_dim=None), device="cpu")
    assert flat.feature_dim == 40 * 9 + 112 * 9
    torch.manual_seed(0)
    stage8, stage16 = torch.randn(1, 40, 16, 16), torch.randn(1, 112, 8, 8)
    features = flat.aggregate([stage8, stage16])
    # Interior position (5, 10): channel c's 3x3 neighbourhood, row-major, then the next channel.
    expected = stage8[0, :, 4:7, 9:12].reshape(-1) / np.sqrt(360)
    torch.testing.assert_close(features[0, 5, 10, :360], expected)
    # Mirroring the neighbourhood changes the flattened vector, not the mean.
    mirrored = stage8.flip(-1)
    assert not torch.allclose(flat.aggregate([mirrored, stage16])[0, 5, 5, :360], features[0, 5, 10, :360])
    pooled = create_embedder(EmbedderConfig(image_size=128, aggregation="flatten", stage_dim=64), device="cpu")
    assert pooled.feature_dim == 128
    out = pooled.aggregate([stage8, stage16])
    torch.testing.assert_close(out[0, 5, 10, :64], F.adaptive_avg_pool1d(expected[None, None] * np.sqrt(360), 64)[0, 0]
                               / np.sqrt(64))


def test_image_normalisation_undoes_exposure_and_gain(shared_data):
    """With normalisation "image" a darker, flatter shot of the same part gives the same
    network input (up to the shot's own rounding to whole grey levels) and features."""
    from app.core.images import decode_image

    image = decode_image(sorted((shared_data / "bottle" / "train" / "good").glob("*.png"))[0])
    shot = np.round(image.astype(np.float32) * 0.7 + 20.0).astype(np.uint8)  # within 0-255: no clipping
    per_image = create_embedder(EmbedderConfig(image_size=128, normalisation="image"), device="cpu")
    dataset = create_embedder(EmbedderConfig(image_size=128, normalisation="dataset"), device="cpu")
    same = per_image.preprocess([image, shot])
    assert float((same[0] - same[1]).abs().mean()) < 0.02
    assert float((same[0].mean() - same[1].mean()).abs()) < 1e-3
    moved = dataset.preprocess([image, shot])
    assert float((moved[0] - moved[1]).abs().mean()) > 0.1
    features = per_image.embed(same)
    assert float((features[0] - features[1]).norm(dim=-1).mean()) < 0.05 * float(features[0].norm(dim=-1).mean())
    # A flat frame is not stretched to full contrast, and a constant one stays finite.
    flat = per_image.preprocess([np.full((64, 64, 3), 128, np.uint8)])
    assert torch.isfinite(flat).all() and float(flat.abs().max()) < 0.5
    # Banks from before the option used the dataset statistics.
    stored = {k: v for k, v in EmbedderConfig().to_dict().items() if k != "normalisation"}
    assert EmbedderConfig.from_dict(stored).normalisation == "dataset"
