"""Accuracy / speed / memory table of the engine on an MVTec-layout root.

Each configuration runs `python -m app eval` in its own process (so peak RSS is
that run's own), and the JSON results are gathered into a Markdown table.

    python benchmarks/bench_engine.py --data ../shared/data --out benchmarks/results
    python benchmarks/bench_engine.py --data ../shared/data --category bottle --sweep

Timings are medians over the test set at batch 1; on a shared machine compare
rows of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DEFAULT_RUNS = [("default", [])]
SWEEP_RUNS = [
    ("default", []),
    ("stage-dim 40 (80-d)", ["--stage-dim", "40"]),
    ("no projection", ["--projection-dim", "0"]),
    ("coreset 1%", ["--coreset-ratio", "0.01"]),
    ("coreset 25%", ["--coreset-ratio", "0.25"]),
    ("reweight b=3", ["--reweight", "3"]),
    ("lite1", ["--backbone", "efficientnet_lite1"]),
    ("lite2", ["--backbone", "efficientnet_lite2"]),
]


def run(data: str, category: str, name: str, extra: list[str], out: Path) -> dict:
    target = out / f"{category}__{name.replace(' ', '_').replace('%', 'pct').replace('/', '')}.json"
    command = [sys.executable, "-m", "app", "eval", "--data", data, "--category", category,
               "--json", str(target), *extra]
    print("$", " ".join(command[1:]), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(target.read_text())
    result["run"] = name
    result["command"] = "python " + " ".join(command[1:])
    return result


def table(results: list[dict]) -> str:
    lines = ["| category | run | dims | bank | image AUROC | pixel AUROC | F1 @ thr | build s "
             "| ms/img (decode+backbone+search+map) | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["predict_ms_split"]
        pixel = "n/a" if r["pixel_auroc"] is None else f"{r['pixel_auroc']:.4f}"
        lines.append(
            f"| {r['category']} | {r['run']} | {r['feature_dim']} | {r['bank_size']} | {r['image_auroc']:.4f} "
            f"| {pixel} | {r['at_threshold']['f1']:.3f} | {r['build_seconds']:.1f} "
            f"| {s['total']:.1f} ({s['decode']:.1f}+{s['backbone']:.1f}+{s['search']:.1f}+{s['map']:.1f}) "
            f"| {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", action="append", help="repeatable; default: bottle and magnetic_tile")
    parser.add_argument("--sweep", action="store_true", help="also the design-lever variants")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run(args.data, category, name, extra, out)
               for category in (args.category or ["bottle", "magnetic_tile"])
               for name, extra in (SWEEP_RUNS if args.sweep else DEFAULT_RUNS)]
    text = table(results)
    (out / "table.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
