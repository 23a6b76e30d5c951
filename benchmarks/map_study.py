"""Where a category's pixel AUROC is lost, and what map post-processing does to it (issue 8).

Scores every test image once against a saved bank (the 3 nearest bank rows per patch),
then recomputes the pixel AUROC from those patch scores under other map rules, and
splits the ranking by where the negative pixels lie:

    defect pixels vs the pixels of good test images
    defect pixels vs the defect-free pixels of defective images (all, and those farther
        than 5 / 10 / 20% of the image size from any marked defect)

    .venv/bin/python -m app build --product magnetic_tile \
        --images ../shared/data/magnetic_tile/train/good --models-dir /tmp/m
    PYTHONPATH=. .venv/bin/python benchmarks/map_study.py --bank /tmp/m/magnetic_tile \
        --data ../shared/data --category magnetic_tile
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from app.core.embedding import EmbedderConfig, create_embedder
from app.core.evaluation import _pixel_aurocs, binned_auroc, read_category
from app.core.images import decode_image
from app.core.patchcore import PatchCoreModel
from app.core.scoring import anomaly_maps, input_size_of
from app.storage import LocalBankStore

BINS = 1 << 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", type=Path, required=True, help="MODELS/PRODUCT (its active version)")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    _, bank = LocalBankStore(args.bank.parent).load(args.bank.name)
    model = PatchCoreModel(bank, create_embedder(EmbedderConfig.from_dict(bank.embedder), device="cpu"))
    category = read_category(args.data, args.category)
    mask_threshold = 127 if args.category == "magnetic_tile" else 0  # as `eval`
    grids, types, masks, shapes = [], [], [], []
    for item in category.test:
        image = decode_image(item.path, max_pixels=None)
        features = model.scaled(model.embedder.embed(torch.stack(model.preprocess([image]))).numpy())
        h, w = features.shape[1:3]
        distances, _ = model.index.search(features.reshape(h * w, -1), k=3)
        grids.append(distances.reshape(h, w, 3))
        height, width = image.shape[:2]
        shapes.append((height, width))
        types.append(item.defect_type)
        masks.append(np.asarray(Image.open(item.mask_path).convert("L").resize((width, height),
                                Image.Resampling.NEAREST)) > mask_threshold
                     if item.mask_path is not None else np.zeros((height, width), bool))
    def maps_for(scores: list[np.ndarray], sigma: float) -> list[np.ndarray]:
        # Each image's own input size (S x S, or aspect-kept: grids differ).
        return [anomaly_maps(s[None], input_size_of(s), [shapes[i]], sigma)[0]
                for i, s in enumerate(scores)]

    results: dict[str, float] = {}

    def report(name: str, maps: list[np.ndarray]) -> None:
        results[name] = _pixel_aurocs(maps, masks, types, BINS)[0]
        print(f"{name:40s} pixel AUROC {results[name]:.4f}", flush=True)

    nearest = [g[..., 0] for g in grids]
    default_maps = maps_for(nearest, model.gaussian_sigma)
    report(f"default (nearest row, sigma {model.gaussian_sigma:g})", default_maps)
    for sigma in (0.0, 2.0, 8.0, 12.0):
        report(f"sigma {sigma:g}", maps_for(nearest, sigma))
    report("mean of 3 nearest rows", maps_for([g.mean(-1) for g in grids], model.gaussian_sigma))
    report("per image: minus median", [m - np.median(m) for m in default_maps])
    report("per image: minus mean", [m - m.mean() for m in default_maps])
    report("per image: divided by median", [m / np.median(m) for m in default_maps])

    low = min(float(m.min()) for m in default_maps)
    high = max(float(m.max()) for m in default_maps)

    def hist(values: np.ndarray) -> np.ndarray:
        return np.bincount(((values - low) / (high - low) * (BINS - 1)).astype(np.int64), minlength=BINS)

    positives = sum(hist(m[k]) for m, k in zip(default_maps, masks, strict=True))
    good = sum(hist(m[~k]) for m, k, t in zip(default_maps, masks, types, strict=True) if t == "good")
    results["defect vs good-image pixels"] = binned_auroc(positives, good)
    print(f"{'defect vs good-image pixels':40s} {results['defect vs good-image pixels']:.4f}")
    for fraction in (0.0, 0.05, 0.1, 0.2):
        negatives = np.zeros(BINS, np.int64)
        for m, k, t in zip(default_maps, masks, types, strict=True):
            if t == "good":
                continue
            far = ~k if fraction == 0 or not k.any() else \
                ndimage.distance_transform_edt(~k) > fraction * np.sqrt(k.size)
            negatives += hist(m[far])
        name = f"defect vs defective-image pixels > {fraction:g}"
        results[name] = binned_auroc(positives, negatives)
        print(f"{name:40s} {results[name]:.4f}")
    for kind in sorted(set(types)):
        chosen = [i for i, t in enumerate(types) if t == kind]
        level = float(np.mean([default_maps[i][~masks[i]].mean() for i in chosen]))
        results[f"mean map on defect-free pixels: {kind}"] = level
        print(f"mean map on defect-free pixels, {kind:10s} {level:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bank": str(args.bank), "category": args.category,
                                         "feature_dim": int(bank.features.shape[1]),
                                         "results": results}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
