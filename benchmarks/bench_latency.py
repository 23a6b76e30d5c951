"""CPU latency at batch 1, baseline and new paths in ONE run (interleaved, medians, ratios).

bottle, default settings (Lite0, 224 px, 10% coreset), 900x900 test images, from the
encoded body to the decision and the full-size anomaly map:

    decode -> preprocess + backbone -> kNN search + scores + smoothed map -> map at 900x900

Variants (one bank, shared by all):
    baseline       torch backbone, faiss fp32 search, PNG body, decode_image (main before issue 9)
    ov-f32         OpenVINO f32 backbone (the new CPU default), faiss, PNG body
    ov-f32-jpeg    as ov-f32, JPEG body (quality 95) decoded at reduced scale (decode_for_model)
    ov-f32-jpegfull  as ov-f32, the same JPEG body decoded at full size (what draft saves)
    ov-bf16        OpenVINO bf16 backbone, PNG body
    ov-f32-tbf16   OpenVINO f32, torch bf16 search with exact re-rank, PNG body

`--also-bank MODELS/PRODUCT` adds the ov-f32 and ov-f32-jpeg paths on a second bank
(other embedder settings allowed, e.g. --stage-dim 64) to the same interleaved run.

Every variant sees every image once per round, in rotating order, on one worker
thread (as the service's batch worker), so machine noise hits all of them alike.

    .venv/bin/python benchmarks/bench_latency.py --json benchmarks/results/latency.json
    .venv/bin/python benchmarks/bench_latency.py --images 4 --rounds 1 --train-images 10   # quick check
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from app.core.embedding import EmbedderConfig, PatchEmbedder, create_embedder  # noqa: E402
from app.core.images import decode_for_model, decode_image  # noqa: E402
from app.core.patchcore import PatchCoreConfig, PatchCoreModel, build_bank  # noqa: E402
from app.storage import LocalBankStore  # noqa: E402


@dataclass
class Variant:
    name: str
    runtime: str
    precision: str
    search: tuple[str, str]
    body: str          # png | jpeg
    reduced: bool      # decode_for_model(min_side=image size) instead of decode_image
    bank: str = "main"  # "main", or "also" for the --also-bank bank


VARIANTS = [
    Variant("baseline", "torch", "f32", ("faiss", "fp32"), "png", False),
    Variant("ov-f32", "openvino", "f32", ("faiss", "fp32"), "png", False),
    Variant("ov-f32-jpeg", "openvino", "f32", ("faiss", "fp32"), "jpeg", True),
    Variant("ov-f32-jpegfull", "openvino", "f32", ("faiss", "fp32"), "jpeg", False),
    Variant("ov-bf16", "openvino", "bf16", ("faiss", "fp32"), "png", False),
    Variant("ov-f32-tbf16", "openvino", "f32", ("torch", "bf16"), "png", False),
]


def jpeg_bytes(path: Path, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def one_image(model: PatchCoreModel, embedder: PatchEmbedder, body: bytes, reduced: bool) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    if reduced:
        array, original = decode_for_model(body, min_side=embedder.config.image_size)
    else:
        array = decode_image(body)
        original = (array.shape[0], array.shape[1])
    t1 = time.perf_counter()
    embeddings = embedder.embed(embedder.preprocess([array]))
    t2 = time.perf_counter()
    prediction = model.predict_embeddings(embeddings, [original])[0]
    t3 = time.perf_counter()
    full_map = prediction.anomaly_map
    _ = prediction.is_anomalous
    t4 = time.perf_counter()
    assert full_map.shape == original
    return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0], prediction.raw_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("PATCHCORE_TEST_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--train-images", type=int, default=None, help="default: all of bottle/train/good")
    parser.add_argument("--images", type=int, default=20, help="test images (every 4th of bottle/test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=[v.name for v in VARIANTS])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch (and OpenVINO) threads; default torch's own (the core count)")
    parser.add_argument("--bank", type=Path, default=None,
                        help="load this product's active bank from a models dir (MODELS/PRODUCT) instead of "
                             "building one from bottle/train/good")
    parser.add_argument("--also-bank", type=Path, default=None,
                        help="a second bank (MODELS/PRODUCT, any embedder settings): adds its ov-f32 and "
                             "ov-f32-jpeg variants to the same run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    train = sorted((args.data / "bottle" / "train" / "good").glob("*.png"))[: args.train_images]
    tests = sorted((args.data / "bottle" / "test").glob("*/*.png"))[::4][: args.images]
    if not train or not tests:
        sys.exit(f"no bottle images under {args.data}")
    variants = [v for v in VARIANTS if v.name in args.variants]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bank is not None:
        _, bank = LocalBankStore(args.bank.parent).load(args.bank.name)
        print(f"bank: loaded {args.bank}, {bank.size} features", flush=True)
    else:
        config = PatchCoreConfig()
        builder = create_embedder(config.embedder, device="cpu", runtime="openvino", precision="f32")
        started = time.perf_counter()
        bank = build_bank(train, config, builder)
        print(f"bank: {len(train)} images, {bank.size} features, built in {time.perf_counter() - started:.1f} s",
              flush=True)

    banks = {"main": bank}
    if args.also_bank is not None:
        _, banks["also"] = LocalBankStore(args.also_bank.parent).load(args.also_bank.name)
        label = f"{args.also_bank.name}"
        variants += [Variant(f"ov-f32 [{label}]", "openvino", "f32", ("faiss", "fp32"), "png", False, "also"),
                     Variant(f"ov-f32-jpeg [{label}]", "openvino", "f32", ("faiss", "fp32"), "jpeg", True, "also")]
        print(f"also-bank: loaded {args.also_bank}, {banks['also'].size} features", flush=True)
    embedder_keys = {v.name: (v.runtime, v.precision, EmbedderConfig.from_dict(banks[v.bank].embedder))
                     for v in variants}
    embedders: dict[tuple[str, str, EmbedderConfig], PatchEmbedder] = {}
    models: dict[str, PatchCoreModel] = {}
    for v in variants:
        key = embedder_keys[v.name]
        if key not in embedders:
            embedders[key] = create_embedder(key[2], device="cpu", runtime=v.runtime, precision=v.precision)
        models[v.name] = PatchCoreModel(banks[v.bank], embedders[key], *v.search)  # type: ignore[arg-type]
    bodies = {"png": [p.read_bytes() for p in tests], "jpeg": [jpeg_bytes(p) for p in tests]}
    times: dict[str, list[list[float]]] = {v.name: [] for v in variants}
    scores: dict[str, list[float]] = {v.name: [] for v in variants}
    errors: list[BaseException] = []

    def measure() -> None:
        try:
            for v in variants:  # warm-up: first calls allocate and pick kernels
                one_image(models[v.name], embedders[embedder_keys[v.name]], bodies[v.body][0], v.reduced)
            for round_index in range(args.rounds):
                for i in range(len(tests)):
                    shift = (i + round_index) % len(variants)
                    for v in variants[shift:] + variants[:shift]:
                        split, score = one_image(models[v.name], embedders[embedder_keys[v.name]],
                                                 bodies[v.body][i], v.reduced)
                        times[v.name].append(split)
                        if round_index == 0:
                            scores[v.name].append(score)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            errors.append(exc)

    worker = threading.Thread(target=measure, name="latency-worker")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]

    names = ["decode", "backbone", "search", "map", "total"]
    result: dict = {"torch_threads": torch.get_num_threads(), "bank_size": bank.size,
                    "test_images": len(tests), "rounds": args.rounds, "variants": {}}
    base_total = np.asarray([t[4] for t in times[variants[0].name]])
    lines = ["| variant | body | backbone | search | ms/img median (decode+backbone+search+map) "
             f"| vs {variants[0].name} | max raw-score diff vs {variants[0].name} |",
             "|---|---|---|---|---|---|---|"]
    for v in variants:
        split = np.asarray(times[v.name]) * 1000.0
        medians = {n: float(np.median(split[:, k])) for k, n in enumerate(names)}
        # Per-image ratio in the same round and slot, then the median: robust to drifting load.
        ratio = float(np.median(split[:, 4] / (base_total * 1000.0)))
        diff = float(np.max(np.abs(np.asarray(scores[v.name]) - np.asarray(scores[variants[0].name]))))
        result["variants"][v.name] = {"median_ms": medians, "ratio_to_baseline": ratio,
                                      "max_raw_score_diff": diff, "runtime": v.runtime,
                                      "precision": v.precision, "search": list(v.search), "body": v.body,
                                      "reduced_decode": v.reduced,
                                      "samples": len(split), "p90_total_ms": float(np.percentile(split[:, 4], 90))}
        lines.append(f"| {v.name} | {v.body}{' (reduced)' if v.reduced else ''} | {v.runtime} {v.precision} "
                     f"| {v.search[0]} {v.search[1]} | {medians['total']:.1f} ({medians['decode']:.1f}+"
                     f"{medians['backbone']:.1f}+{medians['search']:.1f}+{medians['map']:.1f}) "
                     f"| {ratio:.2f}x | {diff:.2g} |")
    mean_score = statistics.fmean(scores[variants[0].name])
    text = "\n".join([f"bottle, {bank.size}-feature bank, {len(tests)} images x {args.rounds} rounds, "
                      f"torch threads {torch.get_num_threads()}, mean raw score {mean_score:.3f}", "", *lines])
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n", encoding="utf-8")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
