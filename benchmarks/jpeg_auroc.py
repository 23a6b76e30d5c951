"""Do the service's JPEG decode paths change detection?

Scores the bottle test set (or --category) with an existing bank, every image sent
as a JPEG (quality 95), decoded at full size (decode_image), at reduced scale
(decode_for_model, min_side = the model's input size: the CPU path) and by the device
path (app.core.device_decode: nvJPEG on CUDA, torchvision's libjpeg on a CPU; full
size, resized on the device); prints image and pixel AUROC for each (masks at the
original resolution), for the PNG files as they are, and how far each JPEG path moves
an image's score from its PNG's (what a stored threshold sees).

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

from app.core.device_decode import decode_to_network_input, device_jpeg_size  # noqa: E402
from app.core.embedding import EmbedderConfig, create_embedder  # noqa: E402
from app.core.evaluation import _pixel_aurocs, read_category  # noqa: E402
from app.core.images import decode_for_model, decode_image  # noqa: E402
from app.core.patchcore import BatchItem, PatchCoreModel, predict_batch  # noqa: E402
from app.storage import LocalBankStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", type=Path, required=True, help="MODELS_DIR/PRODUCT (its active version)")
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("PATCHCORE_TEST_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--quality", type=int, default=95)
    parser.add_argument("--device", default="cpu", help="the embedder's device (cuda: nvJPEG)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    _, bank = LocalBankStore(args.bank.parent).load(args.bank.name)
    embedder = create_embedder(EmbedderConfig.from_dict(bank.embedder), device=args.device)
    model = PatchCoreModel(bank, embedder)
    category = read_category(args.data, args.category)
    size = embedder.config.image_size
    modes: dict[str, list[float]] = {"png": [], "jpeg-full": [], "jpeg-reduced": [], "jpeg-device": []}
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
        header_size = device_jpeg_size(jpeg)
        if header_size is None:
            raise SystemExit(f"{item.path.name}: the device path does not take this JPEG")
        [tensor] = decode_to_network_input([(jpeg, header_size, None)], embedder.device,
                                           embedder.preprocess_decoded,
                                           shapes=[model.framing.input_shape_for(header_size, size)])
        if tensor is None:
            raise SystemExit(f"{item.path.name}: the device decoder refused it")
        [on_device] = predict_batch([BatchItem(model, tensor, header_size)])
        if isinstance(on_device, Exception):
            raise on_device
        modes["jpeg-device"].append(on_device.raw_score)
        maps["jpeg-device"].append(on_device.anomaly_map)
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
    png_scores = np.asarray(modes["png"])
    for mode, scores in modes.items():
        pixel = _pixel_aurocs(maps[mode], masks, types, 1 << 16)[0] if category.has_masks else None
        moved = np.abs(np.asarray(scores) / png_scores - 1.0)
        result[mode] = {"image_auroc": float(roc_auc_score(labels, scores)), "pixel_auroc": pixel,
                        "score_vs_png_median": float(np.median(moved)),
                        "score_vs_png_max": float(moved.max())}
        print(f"{mode:13s} image AUROC {result[mode]['image_auroc']:.4f}  pixel AUROC "
              f"{'n/a' if pixel is None else f'{pixel:.4f}'}  score vs PNG: median "
              f"{result[mode]['score_vs_png_median']:.2%}, max {result[mode]['score_vs_png_max']:.2%}")
    if args.json:
        args.json.write_text(json.dumps({"category": args.category, "quality": args.quality,
                                         "device": str(embedder.device), "bank": str(args.bank),
                                         "feature_dim": int(bank.features.shape[1]), **result},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
