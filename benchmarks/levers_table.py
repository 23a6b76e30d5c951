"""Markdown tables of the lever sweep (benchmarks/results/levers/*.json, from sweep_levers.py).

Accuracy only: the sweep ran on 2 CPU cores shared with other work, so its
timings (in the JSONs) are not comparable between runs.

    python benchmarks/levers_table.py benchmarks/results/levers/*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def framing_text(framing: dict) -> str:
    if framing["mode"] == "centre":
        part = f"centre {framing['fraction']:g}"
    elif framing["mode"] == "roi":
        part = "roi " + ",".join(map(str, framing["roi"]))
    else:
        part = "whole"
    # Runs before stop 21 have no "aspect": they squeezed every frame to S x S.
    return part + (", aspect kept" if framing.get("aspect") == "keep" else "")


def row(r: dict) -> str:
    alt = r.get("image_auroc_alternatives", {})
    pixel = "n/a" if r["pixel_auroc"] is None else f"{r['pixel_auroc']:.4f}"
    train = f"{r['train_images']}" + (f" (every {r['train_every']}th)" if r.get("train_every", 1) > 1 else "")
    patch = r.get("patch_size", 3)  # runs before these options existed used 3 and sigma 4
    sigma = r.get("map_sigma", 4.0)  # absent in runs before the option; 0 is a valid setting
    # Absent in runs before the option (dataset) and in one run that started just before the
    # evaluation recorded it (its command says which).
    normalisation = r.get("normalisation") or ("image" if "--normalisation image" in r.get("command", "")
                                                else "dataset")
    return (f"| {r['category']} | {r['name']} | {framing_text(r['framing'])} {r['image_size']} "
            f"| {r['aggregation']} {patch}x{patch}{', stages balanced' if r.get('stage_balance') else ''}"
            f"{', image exposure' if normalisation == 'image' else ''} "
            f"| {sigma:g} "
            f"| {r['feature_dim']} | {r['coreset_ratio']:g} | {train} | {r['image_auroc']:.4f} "
            f"| {alt.get('top10', float('nan')):.4f} | {alt.get('top1pct', float('nan')):.4f} | {pixel} "
            f"| {r['at_threshold']['f1']:.3f} | {r['at_threshold']['false_positive_rate']:.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="+")
    args = parser.parse_args()
    results = [json.loads(Path(p).read_text()) for p in args.results]
    results.sort(key=lambda r: (r["category"], r["name"]))
    print("| category | run | framing, size | neighbourhood | map sigma | dims | coreset | train images "
          "| image AUROC (max) | top-10 mean | top-1% mean | pixel AUROC | F1 @ thr | false alarms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(row(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
