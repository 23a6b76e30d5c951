"""Faster kNN search on the CPU? Exact faiss against approximate alternatives, on a real bank.

For the active bank of one product (MODELS/PRODUCT) and the patch features of a few bottle
test images: the exact faiss search (the reference), faiss HNSW at several efSearch values,
and a PCA pre-search with an exact re-rank of its candidates. For each: ms per image
(784 queries, median of 5, all in one run), recall of the exact nearest neighbour, and how
far each image's score (its largest patch distance) moved.

    python benchmarks/search_alternatives.py --bank models/bottle --json benchmarks/results/search_alternatives.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

import app  # noqa: E402,F401 - native-thread environment first
from app.core.embedding import EmbedderConfig, create_embedder  # noqa: E402
from app.core.images import decode_image  # noqa: E402
from app.storage import LocalBankStore  # noqa: E402


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", type=Path, required=True, help="MODELS/PRODUCT")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    _, bank = LocalBankStore(args.bank.parent).load(args.bank.name)
    features = np.ascontiguousarray(bank.features, dtype=np.float32)
    embedder = create_embedder(EmbedderConfig.from_dict(bank.manifest["embedder"]), device="cpu")
    tests = sorted((args.data / "bottle" / "test").glob("*/*.png"))[::8][:args.images]
    per_image = embedder.grid_size ** 2
    queries = embedder.embed(embedder.preprocess([decode_image(p) for p in tests])).numpy()
    queries = np.ascontiguousarray(queries.reshape(-1, features.shape[1]))
    one_image = queries[:per_image]

    exact = faiss.IndexFlatL2(features.shape[1])
    exact.add(features)
    exact_sq, exact_ids = exact.search(queries, 1)
    exact_image = np.sqrt(exact_sq[:, 0]).reshape(-1, per_image).max(1)
    rows = [{"method": "exact faiss (reference)", "ms_per_image": median_ms(lambda: exact.search(one_image, 1)),
             "recall": 1.0, "max_image_score_change": 0.0}]

    def compare(method: str, ms: float, ids: np.ndarray, distances: np.ndarray, extra: dict) -> None:
        image = distances.reshape(-1, per_image).max(1)
        rows.append({"method": method, "ms_per_image": ms, "recall": float((ids == exact_ids[:, 0]).mean()),
                     "max_image_score_change": float(np.abs(image / exact_image - 1).max()), **extra})

    for ef in (32, 64, 128):
        hnsw = faiss.IndexHNSWFlat(features.shape[1], 32)
        hnsw.hnsw.efConstruction = 80
        start = time.perf_counter()
        hnsw.add(features)
        build_s = time.perf_counter() - start
        hnsw.hnsw.efSearch = ef
        squared, ids = hnsw.search(queries, 1)
        compare(f"faiss HNSW M32 efSearch {ef}", median_ms(lambda h=hnsw: h.search(one_image, 1)), ids[:, 0],
                np.sqrt(squared[:, 0]), {"index_build_s": build_s})

    for dim, candidates in ((128, 8), (64, 16)):
        pca = faiss.PCAMatrix(features.shape[1], dim)
        pca.train(features)
        projected = faiss.IndexFlatL2(dim)
        projected.add(pca.apply(features))

        def search(q: np.ndarray, pca=pca, projected=projected, candidates=candidates):
            _, ids = projected.search(pca.apply(q), candidates)
            squared = ((q[:, None, :] - features[ids]) ** 2).sum(-1)
            best = squared.argmin(1)
            return ids[np.arange(len(q)), best], np.sqrt(squared[np.arange(len(q)), best])

        ids, distances = search(queries)
        compare(f"PCA {dim} + exact re-rank of {candidates}", median_ms(lambda s=search: s(one_image)), ids,
                distances, {})

    reference = rows[0]["ms_per_image"]
    for row in rows:
        row["speed_vs_exact"] = reference / row["ms_per_image"]
        print(f"{row['method']:40s} {row['ms_per_image']:7.1f} ms/img  x{row['speed_vs_exact']:.2f}  "
              f"recall {row['recall']:.4f}  max image-score change {row['max_image_score_change']:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"bank": str(args.bank), "bank_size": int(features.shape[0]),
                                         "dim": int(features.shape[1]), "images": len(tests), "rows": rows,
                                         "command": "python " + " ".join(sys.argv)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
