"""Cluster benchmark: the service on the local Ray Serve stand (scripts/cluster.sh) against the
single process, with bench_service.py's bank, images and client.

1. Throughput and p50/p95 at each concurrency: single process (uvicorn), the stand with
   1 replica, the stand with 2 replicas (same bank, same client, heatmap=none).
2. Bank-swap propagation: 4 clients predict while a second version is activated through the
   admin API; per replica, the time from the activate call to its last answer on the old
   version (repeated, max and median reported).
3. Cold vs warm bank load: the store's load + model build in this process (the code a replica
   runs on a miss), from the store (S3: empty node cache) and again (S3: node cache warm); and
   through the cluster, a product's first request on the stand vs the next ones.
4. Memory per replica: RSS of each replica process with 1 bank loaded and with K more.

    .venv/bin/python benchmarks/bench_cluster.py --json benchmarks/results/cluster.json
    .venv/bin/python benchmarks/bench_cluster.py --quick        # checks the script, not the numbers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.client import PatchCoreClient  # noqa: E402
from app.core.embedding import create_embedder  # noqa: E402
from app.core.patchcore import PatchCoreConfig, build_bank  # noqa: E402
from app.storage import LocalBankStore  # noqa: E402
from benchmarks.bench_service import PRODUCT, load, start_service  # noqa: E402
from tests.cluster.stand import (  # noqa: E402
    CLUSTER_SH,
    new_stand,
    predict_load,
    propagation,
    remove_stand_dir,
    replica_pids,
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stand_store(stand, cache_dir: Path | None = None):
    """The stand's bank store, opened from this process (call it inside the stand's network);
    `cache_dir`: this process's own S3 read-through cache (never the replicas')."""
    from app.service.resources import create_store
    from app.service.settings import Settings

    saved = dict(os.environ)
    os.environ.update(stand.store_settings())
    if cache_dir is not None:
        os.environ["PATCHCORE_S3_CACHE_DIR"] = str(cache_dir)
    try:
        return create_store(Settings(demo=False))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def redeploy(stand, replicas: int) -> None:
    """Change the replica count of the running app (serve.run updates it in place)."""
    subprocess.run(["bash", str(CLUSTER_SH), "exec", sys.executable, "-m", "app", "serve", "--engine", "ray",
                    "--address", f"127.0.0.1:{stand.state['GCS_PORT']}", "--host", "127.0.0.1", "--port",
                    stand.state["HTTP_PORT"], "--replicas", str(replicas), "--num-cpus", "0.5", "--detach"],
                   cwd=REPO, env=stand.env(), check=True, capture_output=True, timeout=600)
    deadline = time.monotonic() + 300
    while len(replica_pids()) != replicas and time.monotonic() < deadline:
        time.sleep(1)


def levels(url: str, images: list[bytes], concurrency: list[int], requests: int, max_s: float,
           label: str) -> list[dict]:
    rows = []
    for c in concurrency:
        row = asyncio.run(load(url, images, c, requests, max_s))
        row["setup"] = label
        rows.append(row)
        print(f"{label:18} c={c:2}: {row['throughput_rps']:.2f} req/s p50 {row['p50_ms']:.0f} ms "
              f"p95 {row['p95_ms']:.0f} ms, {row['requests']} requests, {row['failures']} failed", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("PATCHCORE_TEST_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--train-images", type=int, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-seconds-per-level", type=float, default=20.0)
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--extra-banks", type=int, default=4, help="products loaded for the memory figure")
    parser.add_argument("--no-throughput", action="store_true",
                        help="skip part 1 (the single process and the 1-replica stand): swap, load, memory only")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.requests, args.max_seconds_per_level = [1, 4], 8, 8.0
        args.swaps, args.extra_banks, args.train_images = 1, 1, 6

    train = sorted((args.data / "bottle" / "train" / "good").glob("*.png"))[:args.train_images]
    tests = sorted((args.data / "bottle" / "test").glob("*/*.png"))[::8][:16]
    if not train or not tests:
        sys.exit(f"no bottle images under {args.data}")
    images = [p.read_bytes() for p in tests]
    config = PatchCoreConfig(coreset_ratio=0.1)
    embedder = create_embedder(config.embedder, device="cpu")
    bank = build_bank(train, config, embedder)
    bank2 = build_bank(train, PatchCoreConfig(coreset_ratio=0.1, seed=1), embedder)
    del embedder
    print(f"bank: {len(train)} images, {len(bank.features)} features", flush=True)
    out: dict = {"bank_features": len(bank.features), "train_images": len(train)}
    env_batch = {"PATCHCORE_MAX_BATCH_SIZE": "16", "PATCHCORE_MAX_WAIT_MS": "5", "PATCHCORE_QUEUE_SIZE": "256",
                 "PATCHCORE_DEVICE": "cpu", "PATCHCORE_LOG_LEVEL": "WARNING"}
    rows: list[dict] = []

    # 1a. the single process (again after the stand: the machine is shared, so drift shows)
    def single_process(label: str) -> list[dict]:
        with tempfile.TemporaryDirectory() as tmp:
            models = Path(tmp) / "models"
            LocalBankStore(models).save(PRODUCT, bank, activate=True)
            saved = dict(os.environ)
            os.environ.update(env_batch)
            try:
                process, url = start_service(models, "cpu", 16, 5.0, 256, Path(tmp) / "info.json")
            finally:
                os.environ.clear()
                os.environ.update(saved)
            try:
                return levels(url, images, args.concurrency, args.requests, args.max_seconds_per_level, label)
            finally:
                process.terminate()
                process.wait(30)

    if not args.no_throughput:
        rows += single_process("single process")

    # 1b. the stand
    stand = new_stand()
    # Ray sets OMP_NUM_THREADS to a replica's CPU share (1 thread); the single process's torch
    # uses both cores, so the stand gets the same thread count.
    os.environ.update({**env_batch, "OMP_NUM_THREADS": "2"})
    try:
        os.environ["PATCHCORE_STAND_REPLICAS"] = "1"
        started = time.monotonic()
        stand.up(replicas=2 if args.no_throughput else 1)
        out["stand_up_s"] = time.monotonic() - started
        print(f"stand up in {out['stand_up_s']:.0f} s ({stand.state['STORE']} store)", flush=True)
        out["store"] = stand.state["STORE"]
        with stand.inside():
            store = stand_store(stand)
            v1 = store.save(PRODUCT, bank, activate=True)
            v2 = store.save(PRODUCT, bank2, activate=False)
        for replicas in () if args.no_throughput else (1, 2):
            if replicas == 2:
                redeploy(stand, 2)
            with stand.inside():
                rows += levels(stand.url, images, args.concurrency, args.requests, args.max_seconds_per_level,
                               f"ray, {replicas} replica{'s' if replicas > 1 else ''}")
        out["throughput"] = rows

        # 2. swap propagation (2 replicas)
        figures = []
        for i in range(args.swaps):
            target = v2 if i % 2 == 0 else v1
            switched: dict[str, float] = {}

            def activate(version: str = target, mark: dict = switched) -> None:
                with stand.inside(), PatchCoreClient(stand.url, api_key=stand.api_key) as client:
                    mark["at"] = time.monotonic()
                    client.activate(PRODUCT, version)

            results = predict_load(stand.url, PRODUCT, images[0], seconds=8.0, clients=4, during=activate,
                                   during_at_s=3.0, netns=stand.netns)
            per = propagation(results, target, switched["at"])
            failed = sum(not r.ok for r in results)
            figures.append({"per_replica_s": per, "requests": len(results), "failed": failed})
            print(f"swap {i + 1}: propagation per replica {per}, {len(results)} requests, {failed} failed",
                  flush=True)
        worst = [max(f["per_replica_s"].values()) for f in figures]
        out["swap"] = {"runs": figures, "max_s": max(worst), "median_of_worst_s": statistics.median(worst)}

        # 3. cold vs warm load
        from app.service.registry import ProductRegistry

        cold, warm = [], []
        with stand.inside():  # the store may be the stand's S3 server
            for _ in range(3):
                # A new store with an empty cache: for S3 the first load downloads, the second reads the cache.
                fresh = stand_store(stand, Path(tempfile.mkdtemp(prefix="bench-cache-")))
                registry = ProductRegistry(fresh, lambda c: create_embedder(c, device="cpu"))
                registry.embedder(config.embedder)
                t0 = time.perf_counter()
                registry.load(PRODUCT)
                cold.append(time.perf_counter() - t0)
                registry.remove(PRODUCT)
                t0 = time.perf_counter()
                registry.load(PRODUCT)
                warm.append(time.perf_counter() - t0)
        out["bank_load_s"] = {"cold_median": statistics.median(cold), "again_median": statistics.median(warm)}
        print(f"bank load in-process: first {statistics.median(cold) * 1000:.0f} ms, again "
              f"{statistics.median(warm) * 1000:.0f} ms (median of 3)", flush=True)
        firsts, nexts = [], []
        for k in range(args.extra_banks):
            name = f"extra{k}"
            with stand.inside():
                store.save(name, bank, activate=True)
            with stand.inside(), PatchCoreClient(stand.url) as client:
                t0 = time.perf_counter()
                client.predict(name, images[0], heatmap="none")
                firsts.append(time.perf_counter() - t0)
                for _ in range(3):
                    t0 = time.perf_counter()
                    client.predict(name, images[0], heatmap="none")
                    nexts.append(time.perf_counter() - t0)
        out["first_request_s"] = {"first_median": statistics.median(firsts), "next_median": statistics.median(nexts)}
        print(f"through the cluster: first request of a product {statistics.median(firsts) * 1000:.0f} ms, "
              f"next {statistics.median(nexts) * 1000:.0f} ms (medians)", flush=True)
        # Touch every product on every replica so both hold all banks, then read RSS.
        with stand.inside(), PatchCoreClient(stand.url) as client:
            for _ in range(6):
                for name in [PRODUCT, *(f"extra{k}" for k in range(args.extra_banks))]:
                    client.predict(name, images[0], heatmap="none")
        out["replica_rss_mb"] = {str(pid): rss_mb(pid) for pid in replica_pids()}
        print(f"replica RSS with {1 + args.extra_banks} banks of {len(bank.features)} x "
              f"{bank.features.shape[1]}: {out['replica_rss_mb']}", flush=True)
    finally:
        done = subprocess.run(["bash", str(CLUSTER_SH), "down"], env=stand.env(), capture_output=True, text=True,
                              timeout=120, check=False)
        print(done.stdout.strip() or done.stderr.strip())
        remove_stand_dir(stand)

    if not args.no_throughput:
        rows += single_process("single process, again")
    out["throughput"] = rows

    print("\n| setup | concurrency | req/s | p50 ms | p95 ms | failed |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setup']} | {row['concurrency']} | {row['throughput_rps']:.2f} | {row['p50_ms']:.0f} | "
              f"{row['p95_ms']:.0f} | {row['failures']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
