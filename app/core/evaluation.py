"""Accuracy and speed of a bank on an MVTec-AD-layout dataset.

    <root>/<category>/train/good/*            nominal images (the bank is built from these)
    <root>/<category>/test/<type>/*           test images, type "good" = nominal
    <root>/<category>/ground_truth/<type>/<stem>_mask.png
Thresholds and normalisation never look at the test set; AUROC is threshold-free.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.core.bank import MemoryBank
from app.core.embedding import PatchEmbedder
from app.core.images import decode_image, list_images
from app.core.patchcore import PatchCoreConfig, PatchCoreModel, build_bank
from app.core.scoring import anomaly_maps, input_size_of, score_patches


@dataclass
class TestImage:
    path: Path
    defect_type: str
    mask_path: Path | None

    @property
    def is_defective(self) -> bool:
        return self.defect_type != "good"


@dataclass
class Category:
    root: Path
    name: str
    train: list[Path]
    test: list[TestImage] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        return any(t.mask_path is not None for t in self.test if t.is_defective)


def read_category(root: Path | str, name: str) -> Category:
    base = Path(root) / name
    if not (base / "train" / "good").is_dir():
        raise FileNotFoundError(f"{base}/train/good not found: not an MVTec-layout category")
    category = Category(Path(root), name, list_images(base / "train" / "good"))
    for type_dir in sorted(p for p in (base / "test").iterdir() if p.is_dir()):
        for path in list_images(type_dir):
            mask = base / "ground_truth" / type_dir.name / f"{path.stem}_mask.png"
            category.test.append(TestImage(path, type_dir.name, mask if mask.is_file() else None))
    return category


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def binned_auroc(positive_hist: np.ndarray, negative_hist: np.ndarray) -> float:
    """AUROC from score histograms over the same bins (ties within a bin count one half)."""
    pos_total, neg_total = positive_hist.sum(), negative_hist.sum()
    if pos_total == 0 or neg_total == 0:
        return float("nan")
    negatives_below = np.cumsum(negative_hist) - negative_hist
    wins = (positive_hist * (negatives_below + 0.5 * negative_hist)).sum()
    return float(wins / (pos_total * neg_total))


def evaluate_category(
    category: Category,
    config: PatchCoreConfig,
    embedder: PatchEmbedder,
    mask_threshold: int = 0,
    progress: Callable[[str, float], None] | None = None,
    bins: int = 1 << 16,
    search: tuple[str, str] = ("auto", "auto"),
    extra_scores: dict[str, Callable[[np.ndarray], float]] | None = None,
) -> dict:
    """Build from train/good, score test/ one image at a time, return metrics and timings.

    `extra_scores` maps a name to another image-score rule on an image's (h, w)
    patch scores; their image AUROCs come back under `image_auroc_alternatives`.
    """

    start = time.perf_counter()
    bank = build_bank(category.train, config, embedder, progress=progress)
    build_seconds = time.perf_counter() - start
    result = evaluate_bank(bank, category, embedder, mask_threshold=mask_threshold, progress=progress, bins=bins,
                           search=search, extra_scores=extra_scores)
    result.update({"coreset_ratio": config.coreset_ratio, "seed": config.seed,
                   "build_seconds": round(build_seconds, 2)})
    return result


def evaluate_bank(
    bank: MemoryBank,
    category: Category,
    embedder: PatchEmbedder,
    mask_threshold: int = 0,
    progress: Callable[[str, float], None] | None = None,
    bins: int = 1 << 16,
    search: tuple[str, str] = ("auto", "auto"),
    extra_scores: dict[str, Callable[[np.ndarray], float]] | None = None,
) -> dict:
    """Score test/ one image at a time against a built bank; metrics and timings."""
    from sklearn.metrics import roc_auc_score

    build_peak = peak_rss_mb()
    model = PatchCoreModel(bank, embedder, search[0], search[1])  # type: ignore[arg-type]
    config = bank.manifest.get("config") or {}

    has_masks = category.has_masks
    scores, labels, types, maps, masks, decisions = [], [], [], [], [], []
    alternatives: dict[str, list[float]] = {}
    split: dict[str, list[float]] = {"decode": [], "backbone": [], "search": [], "map": [], "total": []}
    for i, item in enumerate(category.test):
        t0 = time.perf_counter()
        image = decode_image(item.path, max_pixels=None)
        t1 = time.perf_counter()
        embeddings = embedder.embed(torch.stack(model.preprocess([image]))).numpy()
        t2 = time.perf_counter()
        patch_scores, image_scores = score_patches(model.index, model.scaled(embeddings), model.reweight_neighbours,
                                                   model.top_k)
        t3 = time.perf_counter()
        box = None if model.framing.is_whole() else model.framing.box(*image.shape[:2])
        amap = anomaly_maps(patch_scores, input_size_of(patch_scores), [image.shape[:2]], model.gaussian_sigma,
                            [box])[0]
        decisions.append(bool(image_scores[0] > model.calibration.threshold))
        t4 = time.perf_counter()
        for key, value in zip(split, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
            value_ms = value * 1000.0
            split[key].append(value_ms)
        scores.append(float(image_scores[0]))
        if extra_scores:
            for name, rule in extra_scores.items():
                alternatives.setdefault(name, []).append(float(rule(patch_scores[0])))
        labels.append(int(item.is_defective))
        types.append(item.defect_type)
        if has_masks:
            maps.append(amap)
            if item.mask_path is not None:
                mask = np.asarray(Image.open(item.mask_path).convert("L").resize(
                    (image.shape[1], image.shape[0]), Image.Resampling.NEAREST)) > mask_threshold
            else:
                mask = np.zeros(image.shape[:2], dtype=bool)
            masks.append(mask)
        if progress is not None:
            progress("test", (i + 1) / len(category.test))

    score_array, label_array = np.asarray(scores), np.asarray(labels)
    threshold = model.calibration.threshold
    predicted = np.asarray(decisions, dtype=bool)
    tp = int((predicted & (label_array == 1)).sum())
    fp = int((predicted & (label_array == 0)).sum())
    fn = int((~predicted & (label_array == 1)).sum())
    result = {
        "category": category.name,
        "backbone": embedder.config.backbone,
        "image_size": embedder.config.image_size,
        "aggregation": embedder.config.aggregation,
        "normalisation": embedder.config.normalisation,
        "patch_size": embedder.config.patch_size,
        "stage_dim": embedder.config.stage_dim,
        "framing": model.framing.to_dict(),
        "top_k": config.get("top_k", 1),
        "map_sigma": model.gaussian_sigma,
        "stage_balance": bank.manifest.get("stage_balance"),
        "holdout_fraction": config.get("holdout_fraction"),
        "feature_dim": embedder.feature_dim,
        "backbone_runtime": embedder.runtime,
        "backbone_precision": embedder.precision,
        "search": model.index.describe() if hasattr(model.index, "describe") else None,
        "coreset_ratio": (bank.manifest.get("coreset") or {}).get("ratio"),
        "seed": config.get("seed"),
        "test_images": len(scores),
        "image_auroc": float(roc_auc_score(label_array, score_array)),
        "image_auroc_by_type": {
            kind: float(roc_auc_score(label_array[mask], score_array[mask]))
            for kind in sorted(set(types) - {"good"})
            for mask in [np.isin(np.asarray(types), ["good", kind])]
        },
        "image_auroc_alternatives": {name: float(roc_auc_score(label_array, values))
                                     for name, values in alternatives.items()},
        "pixel_auroc": None,
        "pixel_auroc_by_type": None,
        "threshold": threshold,
        "at_threshold": {
            "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
            "f1": 2 * tp / max(2 * tp + fp + fn, 1),
            "false_positive_rate": fp / max(int((label_array == 0).sum()), 1),
        },
        "nominal_holdout_scores": [round(float(x), 4) for x in bank.nominal_scores],
        "test_scores": [{"image": str(t.path.relative_to(category.root)), "type": kind, "score": round(score, 4)}
                        for t, kind, score in zip(category.test, types, scores, strict=True)],
        "bank_size": bank.size,
        "build_seconds": None,
        "build_timings": bank.manifest["timings"],
        "predict_ms_per_image": round(float(np.median(split["total"])), 2),
        "predict_ms_split": {k: round(float(np.median(v)), 2) for k, v in split.items()},
        "peak_rss_mb": round(build_peak, 1),
        "peak_rss_mb_eval": None,
    }
    if has_masks:
        result["pixel_auroc"], result["pixel_auroc_by_type"] = _pixel_aurocs(maps, masks, types, bins)
    result["peak_rss_mb_eval"] = round(peak_rss_mb(), 1)
    return result


def _pixel_aurocs(maps: list[np.ndarray], masks: list[np.ndarray], types: list[str],
                  bins: int) -> tuple[float, dict[str, float]]:
    """Pixel AUROC at each image's original resolution, over 2^16 score bins (exact to ~1e-5)."""
    low = min(float(m.min()) for m in maps)
    high = max(float(m.max()) for m in maps)
    scale = (bins - 1) / max(high - low, 1e-12)
    empty = np.zeros(bins, dtype=np.int64)
    per_type: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for amap, mask, kind in zip(maps, masks, types, strict=True):
        index = ((amap - low) * scale).astype(np.int64).ravel()
        flat_mask = mask.ravel()
        pos = np.bincount(index[flat_mask], minlength=bins)
        neg = np.bincount(index[~flat_mask], minlength=bins)
        old_pos, old_neg = per_type.get(kind, (empty, empty))
        per_type[kind] = (old_pos + pos, old_neg + neg)
    total_pos = np.sum([p for p, _ in per_type.values()], axis=0)
    total_neg = np.sum([n for _, n in per_type.values()], axis=0)
    good_neg = per_type.get("good", (empty, empty))[1]
    by_type = {kind: binned_auroc(pos, neg + good_neg)
               for kind, (pos, neg) in sorted(per_type.items()) if kind != "good" and pos.sum() > 0}
    return binned_auroc(total_pos, total_neg), by_type
