"""One run of the accuracy-lever sweep (issue 8): `python -m app eval` plus other image-score rules.

Takes every engine option of `python -m app eval`, and:
    --train-every N   build from every N-th training image only (a cheap proxy for big categories)
    --name NAME       result file benchmarks/results/levers/<category>__<NAME>.json

Besides the configured image score it reports, from the same patch scores, the
image AUROC of other rules that need no defect images (`image_auroc_alternatives`):
max (Eq. 6), the mean of the top 3 / 10 / 1% / 5% patch scores.

    python benchmarks/sweep_levers.py --data ../shared/data --category transistor --name centre --centre-crop 0.875
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from app.cli import _add_engine_options, _config_from
from app.core.embedding import create_embedder
from app.core.evaluation import evaluate_category, read_category
from app.core.scoring import image_scores_from


def _top_fraction(fraction: float):
    def rule(patch_scores: np.ndarray) -> float:
        k = max(1, int(round(fraction * patch_scores.size)))
        return float(image_scores_from(patch_scores[None], k)[0])
    return rule


RULES = {
    "max": lambda p: float(p.max()),
    "top3": lambda p: float(image_scores_from(p[None], 3)[0]),
    "top10": lambda p: float(image_scores_from(p[None], 10)[0]),
    "top1pct": _top_fraction(0.01),
    "top5pct": _top_fraction(0.05),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--train-every", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/levers")
    _add_engine_options(parser)
    args = parser.parse_args()
    config = _config_from(args)
    category = read_category(args.data, args.category)
    category.train = category.train[::args.train_every]
    embedder = create_embedder(config.embedder, device=args.device, weights_path=args.weights)
    started = time.perf_counter()
    mask_threshold = 127 if args.category == "magnetic_tile" else 0  # as `eval`: anti-aliased masks
    result = evaluate_category(category, config, embedder, mask_threshold=mask_threshold, extra_scores=RULES)
    result.update(name=args.name, train_images=len(category.train), train_every=args.train_every,
                  wall_seconds=round(time.perf_counter() - started, 1),
                  command="python benchmarks/sweep_levers.py " + " ".join(sys.argv[1:]))
    out = Path(args.out) / f"{args.category}__{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    summary = {k: result[k] for k in ("image_auroc", "pixel_auroc", "image_auroc_by_type", "at_threshold",
                                      "image_auroc_alternatives", "bank_size", "build_seconds")}
    print(args.category, args.name, json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
