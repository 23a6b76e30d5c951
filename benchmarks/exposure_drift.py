"""Good parts shot darker, brighter or flatter (lighting drift): false alarms and caught
defects for each bank given, on one category's test set.

    PYTHONPATH=. python benchmarks/exposure_drift.py --data ../shared/data --category bottle \\
        --bank M/bottle --bank MDS/bottle

Each shot is an affine change of all three channels alike, rounded and clipped to 0-255
as a camera would; the banks are scored as they are (their own normalisation).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from app.core.embedding import EmbedderConfig, create_embedder
from app.core.evaluation import read_category
from app.core.images import decode_image
from app.core.patchcore import PatchCoreModel
from app.storage import LocalBankStore

SHOTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "as shot": lambda a: a,
    "x0.8 (darker)": lambda a: a * 0.8,
    "x0.6": lambda a: a * 0.6,
    "+25 (brighter)": lambda a: a + 25.0,
    "x0.7 + 38 (flatter)": lambda a: a * 0.7 + 38.0,
}


def shot(image: np.ndarray, change: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.clip(np.round(change(image.astype(np.float32))), 0, 255).astype(np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--bank", action="append", required=True, help="MODELS_DIR/PRODUCT (its active version)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    category = read_category(args.data, args.category)
    goods = [decode_image(item.path, max_pixels=None) for item in category.test if item.defect_type == "good"]
    defects = [decode_image(item.path, max_pixels=None) for item in category.test if item.defect_type != "good"]
    rows = []
    for bank_path in args.bank:
        path = Path(bank_path)
        _, bank = LocalBankStore(path.parent).load(path.name)
        config = EmbedderConfig.from_dict(bank.embedder)
        model = PatchCoreModel(bank, create_embedder(config, device="cpu"))
        for name, change in SHOTS.items():
            flagged = sum(p.is_anomalous for p in model.predict([shot(a, change) for a in goods]))
            caught = sum(p.is_anomalous for p in model.predict([shot(a, change) for a in defects]))
            rows.append({"bank": f"{path.parent.name}/{path.name}", "normalisation": config.normalisation,
                         "shot": name, "good_flagged": flagged, "good": len(goods), "defects_caught": caught,
                         "defects": len(defects)})
            print(f"| {config.normalisation} | {name} | {flagged} of {len(goods)} | {caught} of {len(defects)} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
