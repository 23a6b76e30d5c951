"""Which batcher inside a Ray Serve replica: Ray's `@serve.batch` or the project's MicroBatcher?

Both wrap the same batch function (`score_prepared`: one backbone pass + kNN search for a
list of prepared images) on the same bank and images; C asyncio callers each submit one
image at a time for a fixed time, as concurrent requests do in a replica. `@serve.batch`
runs its function on the event loop, so the torch work is handed to a thread
(`asyncio.to_thread`) as a replica must do to keep answering; MicroBatcher has its own
worker thread. Same max batch size (16) and wait (5 ms).

    .venv/bin/python benchmarks/bench_serve_batch.py --json benchmarks/results/serve_batch.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.core.embedding import create_embedder  # noqa: E402
from app.core.patchcore import PatchCoreConfig, PatchCoreModel, build_bank  # noqa: E402
from app.service.batching import MicroBatcher  # noqa: E402
from app.service.inference import prepare, score_prepared  # noqa: E402
from app.service.registry import LoadedProduct, describe_bank  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def drive(submit, items: list, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    await asyncio.gather(*(submit(items[i % len(items)]) for i in range(concurrency)))  # warm-up
    stop = time.perf_counter() + seconds
    started = time.perf_counter()

    async def caller(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await submit(items[i % len(items)])
            latencies.append(time.perf_counter() - t0)
            i += concurrency

    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"images_per_s": len(latencies) / elapsed, "p50_ms": percentile(latencies, 50) * 1000,
            "p95_ms": percentile(latencies, 95) * 1000, "requests": len(latencies)}


class BatchBench:
    """Runs inside a Serve replica: `@serve.batch` needs the replica context."""

    def __init__(self, data: str) -> None:
        root = Path(data)
        train = sorted((root / "bottle" / "train" / "good").glob("*.png"))[:10]
        tests = sorted((root / "bottle" / "test").glob("*/*.png"))[::8][:16]
        config = PatchCoreConfig(coreset_ratio=0.1)
        embedder = create_embedder(config.embedder, device="cpu")
        bank = build_bank(train, config, embedder)
        product = LoadedProduct("bench", "v", PatchCoreModel(bank, embedder), describe_bank(bank))
        self.items = [prepare(product, p.read_bytes(), 40_000_000, False) for p in tests]

    async def run(self, concurrencies: list[int], seconds: float, repeats: int) -> list[dict]:
        from ray import serve

        batcher = MicroBatcher(score_prepared, max_batch_size=16, max_wait_ms=5.0, queue_size=512)
        batcher.start()

        async def micro(item):
            return (await batcher.submit_many([item], 60.0))[0]

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def ray_batched(batch: list) -> list:
            return await asyncio.to_thread(score_prepared, batch)

        rows = []
        try:
            for concurrency in concurrencies:
                for repeat in range(repeats):  # alternate, so drift hits both alike
                    for name, submit in (("MicroBatcher", micro), ("@serve.batch", ray_batched)):
                        row = await drive(submit, self.items, concurrency, seconds)
                        row.update(batcher=name, concurrency=concurrency, repeat=repeat)
                        rows.append(row)
        finally:
            batcher.stop()
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("PATCHCORE_TEST_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Token authentication with a token of this run (Ray would otherwise write one to ~/.ray).
    token = Path(tempfile.mkdtemp(prefix="raytoken-")) / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}})
    try:
        deployment = serve.deployment(BatchBench, max_ongoing_requests=4, ray_actor_options={"num_cpus": 1})
        handle = serve.run(deployment.bind(str(args.data.resolve())), name="batchbench", route_prefix=None)
        rows = handle.run.remote(args.concurrency, args.seconds, args.repeats).result(timeout_s=3600)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(token.parent, ignore_errors=True)
    for row in rows:
        print(f"{row['batcher']:13} c={row['concurrency']:2} #{row['repeat']}: {row['images_per_s']:.2f} img/s "
              f"p50 {row['p50_ms']:.0f} ms p95 {row['p95_ms']:.0f} ms")
    print("\n| batcher | concurrency | img/s (median) | p50 ms | p95 ms |")
    print("|---|---|---|---|---|")
    summary = []
    for concurrency in args.concurrency:
        for name in ("MicroBatcher", "@serve.batch"):
            mine = [r for r in rows if r["batcher"] == name and r["concurrency"] == concurrency]
            line = {"batcher": name, "concurrency": concurrency,
                    "images_per_s": statistics.median(r["images_per_s"] for r in mine),
                    "p50_ms": statistics.median(r["p50_ms"] for r in mine),
                    "p95_ms": statistics.median(r["p95_ms"] for r in mine)}
            summary.append(line)
            print(f"| {name} | {concurrency} | {line['images_per_s']:.2f} | {line['p50_ms']:.0f} | "
                  f"{line['p95_ms']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
