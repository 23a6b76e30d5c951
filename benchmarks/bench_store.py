"""Bank store timings: save, cold load (another node, empty cache) and warm load (cache hit) of one bank,
for LocalBankStore and for S3BankStore on a local SeaweedFS (`weed server -s3`, started here on 127.0.0.1).

The bank has the shape of bottle's default bank (14,739 x 152 float32, 9 MB) filled with random
numbers; timing does not depend on the values. Medians over --repeats; both stores in one run, so
compare the rows with each other rather than with other machines.

    .venv/bin/python benchmarks/bench_store.py --json benchmarks/results/store.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.storage import LocalBankStore  # noqa: E402
from app.storage_s3 import S3BankStore  # noqa: E402
from tests.storage.conftest import BUCKET, running_seaweed, tiny_bank  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 1)


def measure(make_store, repeats: int, rows: int, dim: int) -> dict:
    bank = tiny_bank(rows=rows, dim=dim)
    writer = make_store("writer")
    save_ms = median_ms(lambda: writer.save("bench", bank), repeats)
    fresh = iter([make_store(f"cold-{i}") for i in range(repeats)])  # clients made outside the timing

    def cold() -> None:
        next(fresh).load("bench")  # a fresh node: empty cache

    cold_ms = median_ms(cold, repeats)
    warm_store = make_store("warm")
    warm_store.load("bench")
    warm_ms = median_ms(lambda: warm_store.load("bench"), repeats)
    return {"save_ms": save_ms, "cold_load_ms": cold_ms, "warm_load_ms": warm_ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=14_739)
    parser.add_argument("--dim", type=int, default=152)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {"rows": args.rows, "dim": args.dim, "megabytes": round(args.rows * args.dim * 4 / 1e6, 1),
                     "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        root = Path(tmp)
        local_root = root / "local"
        results["local"] = measure(lambda _name: LocalBankStore(local_root), args.repeats, args.rows, args.dim)
        with running_seaweed() as seaweed:
            def make_s3(name: str) -> S3BankStore:
                return S3BankStore(bucket=BUCKET, prefix="bench", endpoint_url=seaweed.endpoint_url,
                                   session=seaweed.session(), cache_dir=root / "s3" / name)

            results["s3_seaweedfs"] = measure(make_s3, args.repeats, args.rows, args.dim)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
