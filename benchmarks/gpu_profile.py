"""Where a batch's time goes in the engine, stage by stage (CUDA-synchronised timers).

For one bank (built from --train-images bottle images at --coreset-ratio) and batch
sizes 1..64: decode (JPEG at reduced scale / PNG), preprocess (resize + normalise),
the backbone, the kNN search (bf16 with exact re-rank, and fp32), the smoothed maps,
and the whole `predict_batch` as the service's batch worker calls it. Medians over
--rounds. Writes a JSON and prints a table.

    python benchmarks/gpu_profile.py --device cuda --data ../shared/data --json out/gpu_profile.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import app  # noqa: E402,F401 - native-thread environment first
from app.core.device_decode import decode_to_network_input, device_jpeg_size  # noqa: E402
from app.core.embedding import EmbedderConfig, create_embedder  # noqa: E402
from app.core.images import decode_for_model  # noqa: E402
from app.core.knn import TorchExactIndex  # noqa: E402
from app.core.patchcore import BatchItem, PatchCoreConfig, PatchCoreModel, build_bank, predict_batch  # noqa: E402
from app.core.scoring import smoothed_maps  # noqa: E402


def timed(fn, device: torch.device, rounds: int) -> float:
    """Median seconds of fn() over rounds, after one warm-up, synchronised on CUDA."""
    fn()
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_decode_resize(bodies: list[bytes], embedder) -> torch.Tensor:
    """JPEG bodies -> (B, 3, S, S) float32 normalised on the embedder's device: the service's
    own device path (app.core.device_decode with the embedder's preprocess_decoded)."""
    jpegs = [(body, device_jpeg_size(body), None) for body in bodies]
    if any(size is None for _, size, _ in jpegs):
        raise ValueError("a body the device decoder does not take (progressive, CMYK, rotated, ...)")
    decoded = decode_to_network_input(jpegs, embedder.device, embedder.preprocess_decoded)  # type: ignore[arg-type]
    if any(tensor is None for tensor in decoded):
        raise RuntimeError("the device decoder refused a body")
    return torch.stack(decoded)  # type: ignore[arg-type]


def profile_batch(batch: int, pngs: list[bytes], jpegs: list[bytes], models: dict, embedder, rounds: int) -> dict:
    device = embedder.device
    size = embedder.config.image_size
    bodies_png = [pngs[i % len(pngs)] for i in range(batch)]
    bodies_jpeg = [jpegs[i % len(jpegs)] for i in range(batch)]
    decoded = [decode_for_model(b, min_side=size) for b in bodies_jpeg]
    arrays = [a for a, _ in decoded]
    sizes = [s for _, s in decoded]
    row: dict = {"batch": batch}
    row["decode_png_ms_per_img"] = timed(lambda b=bodies_png: [decode_for_model(x, min_side=size)
                                                               for x in b], device, rounds) * 1000 / batch
    row["decode_jpeg_ms_per_img"] = timed(lambda b=bodies_jpeg: [decode_for_model(x, min_side=size)
                                                                 for x in b], device, rounds) * 1000 / batch
    # The alternative to the two rows above for JPEG bodies, the service's path on CUDA:
    # decode on the device (nvJPEG, one batched call; full scale, there is no DCT-domain
    # reduction there), then resize and normalise there (app.core.device_decode).
    row["decode_jpeg_on_device_ms_per_img"] = timed(
        lambda b=bodies_jpeg: device_decode_resize(b, embedder), device, rounds) * 1000 / batch
    model = models["bf16"]
    tensors = torch.stack(model.preprocess(arrays, sizes))
    # How far the device path's input is from the CPU path's (reduced-scale decode + PIL
    # resize), in normalised units (one grey level is 1/128 = 0.0078 for the Lite backbones).
    on_device = device_decode_resize(bodies_jpeg, embedder).cpu()
    row["device_vs_service_input_mean_abs"] = float((on_device - tensors).abs().mean())
    row["preprocess_ms_per_img"] = timed(lambda: model.preprocess(arrays, sizes), device,
                                         rounds) * 1000 / batch
    row["embed_ms"] = timed(lambda: embedder.embed(tensors, on_device=True), device, rounds) * 1000
    features = embedder.embed(tensors, on_device=True)
    flat = features.reshape(-1, features.shape[-1])
    for name, m in models.items():
        index = m.index
        if isinstance(index, TorchExactIndex):
            row[f"search_{name}_ms"] = timed(lambda i=index: i.search_tensor(flat), device,
                                             rounds) * 1000
        else:
            host = flat.cpu().numpy()
            row[f"search_{name}_ms"] = timed(lambda i=index, h=host: i.search(h), device,
                                             rounds) * 1000
    patch_scores = torch.rand(batch, size // 8, size // 8).numpy()
    row["maps_ms"] = timed(lambda: smoothed_maps(patch_scores, size, device=device), device,
                           rounds) * 1000
    items = [BatchItem(model, tensors[i], sizes[i]) for i in range(batch)]
    row["predict_batch_ms"] = timed(lambda: predict_batch(items), device, rounds) * 1000
    row["predict_batch_img_per_s"] = batch / (row["predict_batch_ms"] / 1000)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--train-images", type=int, default=21)
    parser.add_argument("--coreset-ratio", type=float, default=1.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    train = sorted((args.data / "bottle" / "train" / "good").glob("*.png"))[:args.train_images]
    tests = sorted((args.data / "bottle" / "test").glob("*/*.png"))
    pngs = [p.read_bytes() for p in tests]
    jpegs = []
    for path in tests:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=95)
        jpegs.append(buffer.getvalue())
    config = PatchCoreConfig(embedder=EmbedderConfig(), coreset_ratio=args.coreset_ratio)
    embedder = create_embedder(config.embedder, device=args.device)
    device = embedder.device
    bank = build_bank(train, config, embedder)
    models = {"bf16": PatchCoreModel(bank, embedder),
              "fp32": PatchCoreModel(bank, embedder, search_precision="fp32")}
    rows = []
    for batch in args.batches:
        row = profile_batch(batch, pngs, jpegs, models, embedder, args.rounds)
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    result = {"device": str(device), "bank_size": int(len(bank.features)), "feature_dim": embedder.feature_dim,
              "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "rows": rows,
              "command": "python " + " ".join(sys.argv)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
