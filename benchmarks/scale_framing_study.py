"""Squeeze every image to S x S (the default) vs keep a constant pixel scale (issue 8).

magnetic_tile's tiles range from 0.37 to 2.6 in aspect, so squeezing each to 224x224
stretches its texture differently. This builds two banks in torch from the same
training images (every N-th), one per rule, and scores the whole test set:

    squeeze   each image resized to S x S
    scale     each image resized by one factor (S / sqrt(median training area)), aspect
              kept, sides rounded to 16 px; maps go back onto the original photo
    aspect    each image resized to about S x S pixels in all, its aspect kept (sides
              rounded to 16 px)

    PYTHONPATH=. .venv/bin/python benchmarks/scale_framing_study.py --data ../shared/data \\
        --category magnetic_tile --train-every 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

from app.core.coreset import select_coreset
from app.core.embedding import EmbedderConfig, create_embedder, standardise_exposure
from app.core.evaluation import _pixel_aurocs, read_category
from app.core.images import decode_image
from app.core.patchcore import PatchCoreConfig, _split_holdout
from app.core.scoring import gaussian_kernel


def run(mode: str, args: argparse.Namespace) -> dict:
    embedder = create_embedder(EmbedderConfig(stage_dim=args.stage_dim, normalisation=args.normalisation),
                               device="cpu", runtime="torch")
    size = embedder.config.image_size
    category = read_category(args.data, args.category)
    train = category.train[::args.train_every]
    if args.holdout_fraction > 0:  # the bank's images as the engine picks them (patchcore._split_holdout)
        config = PatchCoreConfig(holdout_fraction=args.holdout_fraction)
        train = [train[i] for i in _split_holdout(len(train), config)[0]]
    factor = size / np.sqrt(np.median([np.prod(Image.open(p).size) for p in train]))

    def target(height: int, width: int) -> tuple[int, int]:
        if mode == "squeeze":
            return size, size
        if mode == "aspect":  # each image to about S x S pixels in all, its aspect kept
            ratio = size / np.sqrt(height * width)
            return max(32, int(round(height * ratio / 16)) * 16), max(32, int(round(width * ratio / 16)) * 16)
        return max(32, int(round(height * factor / 16)) * 16), max(32, int(round(width * factor / 16)) * 16)

    def features(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        th, tw = target(*image.shape[:2])
        resized = np.asarray(Image.fromarray(image).resize((tw, th), Image.Resampling.BILINEAR), np.float32)
        pixels = torch.from_numpy(resized.transpose(2, 0, 1).copy())
        if embedder.config.normalisation == "image":  # the default since stop 19
            standardise_exposure(pixels, *embedder._reference)
        batch = ((pixels - embedder._mean_t) * embedder._inv_std_t)[None]
        with torch.inference_mode():
            return embedder.aggregate(embedder.backbone(batch)).float()[0].numpy(), (th, tw)

    started = time.perf_counter()
    rows = np.concatenate([features(decode_image(p, max_pixels=None))[0].reshape(-1, embedder.feature_dim)
                           for p in train])
    chosen = select_coreset(rows, int(args.coreset_ratio * len(rows)), seed=0)
    bank = np.ascontiguousarray(rows[chosen.indices])
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    kernel = gaussian_kernel(4.0)
    pad = len(kernel) // 2
    mask_threshold = 127 if args.category == "magnetic_tile" else 0
    maps, masks, types, scores, labels = [], [], [], [], []
    for item in category.test:
        image = decode_image(item.path, max_pixels=None)
        feats, (th, tw) = features(image)
        distances, _ = index.search(np.ascontiguousarray(feats.reshape(-1, feats.shape[-1])), 1)
        grid = torch.from_numpy(np.sqrt(np.maximum(distances, 0)).reshape(1, 1, *feats.shape[:2]).astype(np.float32))
        amap = F.interpolate(grid, size=(th, tw), mode="bilinear", align_corners=False)
        amap = F.conv2d(F.pad(amap, (pad, pad, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
        amap = F.conv2d(F.pad(amap, (0, 0, pad, pad), mode="reflect"), kernel.view(1, 1, -1, 1))
        height, width = image.shape[:2]
        maps.append(F.interpolate(amap, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy())
        masks.append(np.asarray(Image.open(item.mask_path).convert("L").resize((width, height),
                                Image.Resampling.NEAREST)) > mask_threshold
                     if item.mask_path else np.zeros((height, width), bool))
        types.append(item.defect_type)
        scores.append(float(grid.max()))
        labels.append(int(item.is_defective))
    pixel, by_type = _pixel_aurocs(maps, masks, types, 1 << 16) if any(m.any() for m in masks) else (None, {})
    return {"mode": mode, "train_images": len(train), "bank": len(bank), "scale_factor": float(factor),
            "image_auroc": float(roc_auc_score(labels, scores)), "pixel_auroc": pixel,
            "pixel_auroc_by_type": by_type, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--train-every", type=int, default=4)
    parser.add_argument("--holdout-fraction", type=float, default=0.0,
                        help="leave out this share of the training images as the engine's calibration holdout does")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--stage-dim", type=int, default=EmbedderConfig().stage_dim)
    parser.add_argument("--normalisation", default=EmbedderConfig().normalisation, choices=("image", "dataset"))
    parser.add_argument("--modes", nargs="+", default=["squeeze", "scale"], choices=("squeeze", "scale", "aspect"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = [run(mode, args) for mode in args.modes]
    for r in results:
        print(json.dumps(r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
