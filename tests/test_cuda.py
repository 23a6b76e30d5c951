"""CUDA paths: run by benchmarks/gpu_check.sh on a GPU host, skipped elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.core.coreset import coverage_radius, greedy_coreset
from app.core.embedding import EmbedderConfig, create_embedder
from app.core.images import decode_image
from app.core.patchcore import PatchCoreConfig, PatchCoreModel, build_bank

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def embedders():
    config = EmbedderConfig()
    return create_embedder(config, device="cpu", runtime="torch"), create_embedder(config, device="cuda")


def test_cuda_embedder_gives_the_cpu_features(embedders, shared_data):
    cpu, cuda = embedders
    assert cuda.device.type == "cuda" and cuda.runtime == "torch"
    images = [decode_image(p) for p in sorted((shared_data / "bottle" / "test" / "good").glob("*.png"))[:4]]
    batch = cpu.preprocess(images)
    want, got = cpu.embed(batch), cuda.embed(batch)
    # cuDNN runs convolutions in TF32 by default (10-bit mantissa): 2.9e-3 measured on an H200.
    assert float((got - want).abs().max() / want.abs().max()) < 1e-2


def test_cuda_coreset_selects_the_same_centres():
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 4, (10, 64))[rng.integers(0, 10, 20000)] + rng.normal(0, 0.5, (20000, 64))).astype(
        np.float32)
    cpu = greedy_coreset(x, 500, projection_dim=None, seed=0, device="cpu")
    gpu = greedy_coreset(x, 500, projection_dim=None, seed=0, device="cuda")
    assert coverage_radius(x, gpu) == pytest.approx(coverage_radius(x, cpu), rel=1e-3)


def test_cuda_model_scores_equal_cpu_scores(embedders, shared_data):
    cpu, cuda = embedders
    train = sorted((shared_data / "bottle" / "train" / "good").glob("*.png"))[:12]
    tests = sorted((shared_data / "bottle" / "test" / "broken_large").glob("*.png"))[:4]
    bank = build_bank(train, PatchCoreConfig(), cpu)
    on_cpu = PatchCoreModel(bank, cpu).predict(tests)
    on_gpu = PatchCoreModel(bank, cuda).predict(tests)
    assert PatchCoreModel(bank, cuda).index.describe()["device"].startswith("cuda")
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert b.raw_score == pytest.approx(a.raw_score, rel=2e-3)
        assert np.abs(b.anomaly_map - a.anomaly_map).max() < 2e-3 * a.anomaly_map.max()


def test_cuda_batch_keeps_features_on_the_device_and_scores_as_the_cpu(embedders, shared_data):
    """predict_batch on CUDA: features stay on the GPU for TorchExactIndex (no round trip
    through the host); scores equal the CPU engine's."""
    from app.core.patchcore import BatchItem, predict_batch

    cpu, cuda = embedders
    train = sorted((shared_data / "bottle" / "train" / "good").glob("*.png"))[:12]
    tests = [decode_image(p) for p in sorted((shared_data / "bottle" / "test" / "broken_large").glob("*.png"))[:4]]
    bank = build_bank(train, PatchCoreConfig(), cpu)
    on_cpu = PatchCoreModel(bank, cpu).predict(tests)
    gpu_model = PatchCoreModel(bank, cuda)
    items = [BatchItem(gpu_model, gpu_model.preprocess([image])[0], image.shape[:2]) for image in tests]
    on_gpu = predict_batch(items)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert not isinstance(b, Exception)
        assert b.raw_score == pytest.approx(a.raw_score, rel=2e-3)


def test_nvjpeg_decodes_to_the_cpu_input_and_scores(embedders, shared_data):
    """JPEG bodies decoded by nvJPEG on the device (app.core.device_decode): the network
    input is the CPU decode's to a fraction of a grey level, and a device-decoded batch,
    mixed with a CPU-prepared PNG, scores as the CPU engine scores the PNGs."""
    import io

    from PIL import Image

    from app.core.device_decode import decode_to_network_input, device_jpeg_size
    from app.core.patchcore import BatchItem, predict_batch

    cpu, cuda = embedders
    paths = sorted((shared_data / "bottle" / "test" / "broken_large").glob("*.png"))[:4]
    frames = [decode_image(p) for p in paths]
    jpegs = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, "JPEG", quality=95)
        jpegs.append(buffer.getvalue())
    sizes = [device_jpeg_size(data) for data in jpegs]
    assert sizes == [(900, 900)] * 4
    on_device = decode_to_network_input([(d, s, None) for d, s in zip(jpegs, sizes, strict=True)],
                                        cuda.device, cuda.preprocess_decoded)
    for data, tensor in zip(jpegs, on_device, strict=True):
        assert tensor is not None and tensor.is_cuda
        want = cpu.preprocess_one(decode_image(data))
        assert float((tensor.cpu() - want).abs().mean()) < 0.02  # nvJPEG's IDCT is not libjpeg's

    train = sorted((shared_data / "bottle" / "train" / "good").glob("*.png"))[:12]
    bank = build_bank(train, PatchCoreConfig(), cpu)
    on_cpu = PatchCoreModel(bank, cpu).predict(frames)
    gpu_model = PatchCoreModel(bank, cuda)
    items = [BatchItem(gpu_model, t, (900, 900)) for t in on_device[:3]]
    items.append(BatchItem(gpu_model, gpu_model.preprocess([frames[3]])[0], (900, 900)))  # on the CPU
    for a, b in zip(on_cpu, predict_batch(items), strict=True):
        assert not isinstance(b, Exception)
        assert b.raw_score == pytest.approx(a.raw_score, rel=0.02)
