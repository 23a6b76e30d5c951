"""Does decoding JPEG bodies at reduced scale (images.decode_for_model) change detection?

Scores the bottle test set (or --category) with an existing bank, every image sent
as a JPEG (quality 95), decoded at full size (decode_image) and at reduced scale
(decode_for_model, min_side = the model's input size); prints image and pixel AUROC
for both (masks at the original resolution), and for the PNG files as they are.

    .venv/bin/python benchmarks/jpeg_auroc.py --bank models/bottle --data ../shared/data
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from app.core.embedding import EmbedderConfig, create_embedder  # noqa: E402
from app.core.evaluation import _pixel_aurocs, read_category  # noqa: E402
from app.core.images import decode_for_model, decode_image  # noqa: E402
from app.core.patchcore import PatchCoreModel  # noqa: E402
from app.storage import LocalBankStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", type=Path, required=True, help="MODELS_DIR/PRODUCT (its active version)")
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("PATCHCORE_TEST_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--quality", type=int, default=95)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    _, bank = LocalBankStore(args.bank.parent).load(args.bank.name)
    embedder = create_embedder(EmbedderConfig.from_dict(bank.embedder), device="cpu")
    model = PatchCoreModel(bank, embedder)
    category = read_category(args.data, args.category)
    size = embedder.config.image_size
    modes = {"png": [], "jpeg-full": [], "jpeg-reduced": []}
    maps: dict[str, list[np.ndarray]] = {m: [] for m in modes}
    masks, labels, types = [], [], []
    for item in category.test:
        png = item.path.read_bytes()
        buffer = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").save(buffer, format="JPEG", quality=args.quality)
        jpeg = buffer.getvalue()
        inputs = {"png": (decode_image(png), None), "jpeg-full": (decode_image(jpeg), None),
                  "jpeg-reduced": decode_for_model(jpeg, min_side=size)}
        for mode, (array, original) in inputs.items():
            sizes = None if original is None else [original]
            prediction = model.predict([array], original_sizes=sizes)[0]
            modes[mode].append(prediction.raw_score)
            maps[mode].append(prediction.anomaly_map)
        height, width = maps["png"][-1].shape
        if item.mask_path is not None:
            mask = np.asarray(Image.open(item.mask_path).convert("L").resize((width, height),
                                                                             Image.Resampling.NEAREST)) > 0
        else:
            mask = np.zeros((height, width), dtype=bool)
        masks.append(mask)
        labels.append(int(item.is_defective))
        types.append(item.defect_type)
    result = {}
    for mode, scores in modes.items():
        pixel = _pixel_aurocs(maps[mode], masks, types, 1 << 16)[0] if category.has_masks else None
        result[mode] = {"image_auroc": float(roc_auc_score(labels, scores)), "pixel_auroc": pixel}
        print(f"{mode:13s} image AUROC {result[mode]['image_auroc']:.4f}  pixel AUROC "
              f"{'n/a' if pixel is None else f'{pixel:.4f}'}")
    if args.json:
        args.json.write_text(json.dumps({"category": args.category, "quality": args.quality, **result},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
