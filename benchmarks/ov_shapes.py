"""OpenVINO with aspect-kept inputs (stop 21): one static compile per input shape, or one
compile with the height and width left dynamic. Memory (resident growth over the S x S
start) and the median backbone time at batch 1 for each of a product's input shapes, in
one process, interleaved.

    PYTHONPATH=. .venv/bin/python benchmarks/ov_shapes.py --data ../shared/data --category magnetic_tile
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from app.core.embedding import EmbedderConfig, create_embedder
from app.core.framing import Framing
from app.core.images import list_images


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import openvino

    embedder = create_embedder(EmbedderConfig(), device="cpu", runtime="openvino", precision="f32")
    stages = embedder.backbone
    size = embedder.config.image_size
    shapes: dict[tuple[int, int], int] = {}
    test = args.data / args.category / "test"
    for path in [p for folder in sorted(test.iterdir()) if folder.is_dir() for p in list_images(folder)]:
        with Image.open(path) as image:
            width, height = image.size
        shape = Framing().input_shape_for((height, width), size)
        shapes[shape] = shapes.get(shape, 0) + 1
    ordered = sorted(shapes)
    # Each compiled model with one inference run (its buffers allocated), as a service holds it.
    start = resident_mb()
    static = {}
    for shape in ordered:
        compiled = stages._compile(shape)
        static[shape] = compiled.create_infer_request()
        static[shape].infer({0: np.zeros((1, 3, *shape), np.float32)})
    static_mb = resident_mb() - start
    middle = resident_mb()
    dynamic = stages._compile(None).create_infer_request()
    for shape in ordered:
        dynamic.infer({0: np.zeros((1, 3, *shape), np.float32)})
    dynamic_mb = resident_mb() - middle
    times: dict[str, list[float]] = {"static": [], "dynamic": []}
    for shape in ordered:
        batch = np.random.default_rng(0).standard_normal((1, 3, *shape)).astype(np.float32)
        for request in (static[shape], dynamic):  # warm-up
            request.infer({0: batch})
        runs: dict[str, list[float]] = {"static": [], "dynamic": []}
        for _ in range(args.repeats):  # interleaved, so the shared host's drift hits both alike
            for name, request in (("static", static[shape]), ("dynamic", dynamic)):
                began = time.perf_counter()
                request.infer({0: batch})
                runs[name].append((time.perf_counter() - began) * 1000)
        for name in runs:
            times[name].append(statistics.median(runs[name]))
    ratio = [d / s for d, s in zip(times["dynamic"], times["static"], strict=True)]
    result = {"openvino": openvino.__version__, "shapes": len(ordered), "images_per_shape": shapes_list(shapes),
              "static_compiles_mb": round(static_mb, 1), "dynamic_compile_mb": round(dynamic_mb, 1),
              "median_ms_static": round(statistics.median(times["static"]), 2),
              "median_ms_dynamic": round(statistics.median(times["dynamic"]), 2),
              "dynamic_over_static_median": round(statistics.median(ratio), 3),
              "dynamic_over_static_range": [round(min(ratio), 3), round(max(ratio), 3)]}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def shapes_list(shapes: dict[tuple[int, int], int]) -> list[list[int]]:
    return [[h, w, n] for (h, w), n in sorted(shapes.items())]


if __name__ == "__main__":
    main()
