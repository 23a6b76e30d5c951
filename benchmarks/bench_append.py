"""Append builds (issue 11): speed against a full rebuild, quality of a bank built in steps,
and false alarms on a shifted condition before and after appending it.

    python benchmarks/bench_append.py --data ../shared/data --part speed     # bottle: +10 images vs rebuild
    python benchmarks/bench_append.py --data ../shared/data --part shift     # bottle: brightness/white balance
    python benchmarks/bench_append.py --data ../shared/data --part halves    # magnetic_tile: half + half vs full

Each part writes benchmarks/results/append_<part>.json. Timings are wall-clock on
whatever the machine is doing, so the speed part interleaves full and append builds
and reports medians over repeats and their ratio within the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.embedding import EmbedderConfig, PatchEmbedder, create_embedder  # noqa: E402
from app.core.evaluation import evaluate_bank, read_category  # noqa: E402
from app.core.images import decode_image  # noqa: E402
from app.core.patchcore import (  # noqa: E402
    PatchCoreConfig,
    PatchCoreModel,
    append_config,
    append_to_bank,
    build_bank,
)

# A lighting change: 25% brighter, warmer white balance (red up, blue down).
SHIFT_GAINS = np.asarray([1.25 * 1.08, 1.25, 1.25 * 0.85], dtype=np.float32)


def shifted(path: Path) -> np.ndarray:
    image = decode_image(path, max_pixels=None).astype(np.float32)
    return np.clip(image * SHIFT_GAINS, 0, 255).astype(np.uint8)


def part_speed(data: Path, embedder: PatchEmbedder, config: PatchCoreConfig, repeats: int, new: int) -> dict:
    category = read_category(data, "bottle")
    base_images, new_images = category.train[:-new], category.train[-new:]
    base = build_bank(base_images, config, embedder)
    full_s, append_s, appended = [], [], None
    for _ in range(repeats):  # interleaved, so both see the same machine load
        start = time.perf_counter()
        full = build_bank(category.train, config, embedder)
        full_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        appended = append_to_bank(base, new_images, append_config(base), embedder, base_version="base")
        append_s.append(time.perf_counter() - start)
    assert appended is not None
    return {
        "base_images": len(base_images), "new_images": len(new_images), "repeats": repeats,
        "full_rebuild_s": [round(x, 2) for x in full_s], "append_s": [round(x, 2) for x in append_s],
        "full_rebuild_median_s": round(statistics.median(full_s), 2),
        "append_median_s": round(statistics.median(append_s), 2),
        "append_over_full": round(statistics.median(append_s) / statistics.median(full_s), 4),
        "append_timings": appended.manifest["timings"], "full_timings": full.manifest["timings"],
        "bank_size": {"base": base.size, "append": appended.size, "full": full.size},
        "threshold": {"base": base.threshold, "append": appended.threshold, "full": full.threshold},
    }


def _rates(model: PatchCoreModel, images: list[np.ndarray]) -> tuple[np.ndarray, float]:
    scores = np.asarray([model.predict([image])[0].raw_score for image in images])
    return scores, float((scores > model.calibration.threshold).mean())


def part_shift(data: Path, embedder: PatchEmbedder, config: PatchCoreConfig, new: int) -> dict:
    from sklearn.metrics import roc_auc_score

    category = read_category(data, "bottle")
    base = build_bank(category.train, config, embedder)
    # The appended images: shifted copies of training images. The evaluation images:
    # the shifted test set, never appended (held out).
    step = max(1, len(category.train) // new)
    to_append = [shifted(p) for p in category.train[::step][:new]]
    start = time.perf_counter()
    appended = append_to_bank(base, to_append, append_config(base), embedder, base_version="base")
    append_seconds = time.perf_counter() - start
    good = [t.path for t in category.test if not t.is_defective]
    defect = [t.path for t in category.test if t.is_defective]
    result: dict = {"gains_rgb": SHIFT_GAINS.round(4).tolist(), "appended_images": len(to_append),
                    "append_s": round(append_seconds, 2), "test_good": len(good), "test_defect": len(defect),
                    "bank_size": {"base": base.size, "append": appended.size}}
    for name, bank in (("before", base), ("after", appended)):
        model = PatchCoreModel(bank, embedder)
        row = {"threshold": round(bank.threshold, 4)}
        for condition, load in (("shifted", shifted), ("original", lambda p: decode_image(p, max_pixels=None))):
            good_scores, false_alarms = _rates(model, [load(p) for p in good])
            defect_scores, recall = _rates(model, [load(p) for p in defect])
            labels = np.r_[np.zeros(len(good_scores)), np.ones(len(defect_scores))]
            row[condition] = {"false_alarm_rate": round(false_alarms, 4), "false_alarms": int(
                round(false_alarms * len(good))), "defect_recall": round(recall, 4),
                "image_auroc": round(float(roc_auc_score(labels, np.r_[good_scores, defect_scores])), 4)}
        result[name] = row
    return result


def part_halves(data: Path, embedder: PatchEmbedder, config: PatchCoreConfig, category_name: str,
                full_json: Path | None = None) -> dict:
    category = read_category(data, category_name)
    mask_threshold = 127 if category_name == "magnetic_tile" else 0
    order = np.random.default_rng(0).permutation(len(category.train))
    half = len(order) // 2
    first = [category.train[i] for i in sorted(order[:half])]
    second = [category.train[i] for i in sorted(order[half:])]
    result: dict = {"category": category_name, "images": [len(first), len(second)]}

    if full_json is not None:
        # The full build's figures from an earlier `python -m app eval` run with the same
        # settings (same code path and seed: the same bank), to save its ~10 CPU minutes.
        full_eval = json.loads(full_json.read_text())
        full_size, full_seconds, full_threshold = full_eval["bank_size"], full_eval["build_seconds"], None
        result["full_source"] = str(full_json)
    else:
        start = time.perf_counter()
        full = build_bank(category.train, config, embedder)
        full_seconds = time.perf_counter() - start
        full_eval = evaluate_bank(full, category, embedder, mask_threshold=mask_threshold)
        full_size, full_threshold = full.size, full.threshold
    print(f"full: {full_seconds:.0f} s, {full_eval['image_auroc']:.4f} / {full_eval['pixel_auroc']:.4f}",
          file=sys.stderr, flush=True)

    start = time.perf_counter()
    base = build_bank(first, config, embedder)
    base_seconds = time.perf_counter() - start
    start = time.perf_counter()
    stepped = append_to_bank(base, second, append_config(base), embedder, base_version="half")
    append_seconds = time.perf_counter() - start
    stepped_eval = evaluate_bank(stepped, category, embedder, mask_threshold=mask_threshold)

    def summary(size, threshold, evaluation, seconds):
        return {"bank_size": size, "image_auroc": round(evaluation["image_auroc"], 4),
                "pixel_auroc": round(evaluation["pixel_auroc"], 4),
                "threshold": None if threshold is None else round(threshold, 4),
                "f1": round(evaluation["at_threshold"]["f1"], 4), "build_s": seconds}

    result["full"] = summary(full_size, full_threshold, full_eval, round(full_seconds, 1))
    result["half_then_append"] = summary(stepped.size, stepped.threshold, stepped_eval,
                                         {"half": round(base_seconds, 1), "append": round(append_seconds, 1)})
    result["half_then_append"]["timings"] = {"half": base.manifest["timings"], "append": stepped.manifest["timings"]}
    result["half_bank_size"] = base.size
    result["delta"] = {
        "image_auroc": round(stepped_eval["image_auroc"] - full_eval["image_auroc"], 4),
        "pixel_auroc": round(stepped_eval["pixel_auroc"] - full_eval["pixel_auroc"], 4),
        "bank_size_rel": round(stepped.size / full_size - 1, 4),
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--part", choices=["speed", "shift", "halves"], required=True)
    parser.add_argument("--category", default="magnetic_tile", help="for --part halves")
    parser.add_argument("--full-json", default=None,
                        help="halves: take the full build's figures from this `app eval` JSON (same settings)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--new", type=int, default=None, help="images appended (speed: 10, shift: 20)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    config = PatchCoreConfig(embedder=EmbedderConfig(), coreset_ratio=args.coreset_ratio)
    embedder = create_embedder(config.embedder, device="cpu")
    data = Path(args.data)
    if args.part == "speed":
        result = part_speed(data, embedder, config, args.repeats, args.new or 10)
    elif args.part == "shift":
        result = part_shift(data, embedder, config, args.new or 20)
    else:
        result = part_halves(data, embedder, config, args.category,
                             Path(args.full_json) if args.full_json else None)
    result["command"] = "python " + " ".join(sys.argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.category}" if args.part == "halves" else ""
    (out / f"append_{args.part}{suffix}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
