"""Service benchmark: throughput and latency percentiles through real HTTP.

Builds one bank from real MVTec bottle images (in-process, once), then for
micro-batching on and off starts the service with uvicorn in a subprocess on a
loopback port and runs bounded request loops at each concurrency level (httpx,
raw image bodies, heatmap=none). Finally it times the engine in-process at the
same batch sizes (decode + predict) and reports the service's overhead.

    .venv/bin/python benchmarks/bench_service.py --requests 48 --json out/bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.core.embedding import create_embedder  # noqa: E402
from app.core.images import decode_image  # noqa: E402
from app.core.patchcore import PatchCoreConfig, PatchCoreModel, build_bank  # noqa: E402
from app.storage import LocalBankStore  # noqa: E402

PRODUCT = "bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(models: Path, batch: int, wait_ms: float, queue: int) -> tuple:
    port = free_port()
    env = {**os.environ, "PATCHCORE_MODELS_DIR": str(models), "PATCHCORE_DEMO": "false",
           "PATCHCORE_DEVICE": os.environ.get("PATCHCORE_DEVICE", "auto"),
           "PATCHCORE_MAX_BATCH_SIZE": str(batch), "PATCHCORE_MAX_WAIT_MS": str(wait_ms),
           "PATCHCORE_QUEUE_SIZE": str(queue), "PATCHCORE_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen(
        [sys.executable, "-c", f"from app.service.api import serve; serve('127.0.0.1', {port})"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read().decode()[-2000:])
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("service did not become ready")


async def load(url: str, images: list[bytes], concurrency: int, total: int) -> dict:
    latencies: list[float] = []
    batch_sizes: list[int] = []
    failures = 0
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker() -> None:
            nonlocal failures
            for i in counter:
                started = time.perf_counter()
                response = await client.post(
                    f"/v1/products/{PRODUCT}/predict", content=images[i % len(images)],
                    headers={"Content-Type": "image/png"}, params={"heatmap": "none"})
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    failures += 1
                else:
                    batch_sizes.append(response.json()["results"][0]["timings"]["batch_size"])

        # Warm-up outside the measurement.
        for image in images[:2]:
            await client.post(f"/v1/products/{PRODUCT}/predict", content=image,
                              headers={"Content-Type": "image/png"}, params={"heatmap": "none"})
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": total, "failures": failures,
            "throughput_rps": total / elapsed,
            "p50_ms": percentile(latencies, 50) * 1000, "p95_ms": percentile(latencies, 95) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000,
            "mean_batch": statistics.fmean(batch_sizes) if batch_sizes else 0.0}


def in_process(model: PatchCoreModel, images: list[bytes], batch: int, rounds: int) -> float:
    """Seconds per image: decode + predict, `batch` images per call (best of `rounds`)."""
    best = float("inf")
    warm = [decode_image(images[i % len(images)]) for i in range(batch)]
    model.predict(warm)
    model.predict(warm)
    for _ in range(rounds):
        chunk = [images[i % len(images)] for i in range(batch)]
        started = time.perf_counter()
        model.predict([decode_image(data) for data in chunk])
        best = min(best, (time.perf_counter() - started) / batch)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("PATCHCORE_TEST_DATA", REPO.parent / "shared"
                                                    / "data")))
    parser.add_argument("--train-images", type=int, default=10)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--requests", type=int, default=48, help="requests per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--device", default=os.environ.get("PATCHCORE_DEVICE", "auto"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ["PATCHCORE_DEVICE"] = args.device

    train = sorted((args.data / "bottle" / "train" / "good").glob("*.png"))[: args.train_images]
    tests = sorted((args.data / "bottle" / "test").glob("*/*.png"))[::8][:16]
    if not train or not tests:
        sys.exit(f"no bottle images under {args.data}")
    images = [p.read_bytes() for p in tests]

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        config = PatchCoreConfig(coreset_ratio=args.coreset_ratio)
        embedder = create_embedder(config.embedder, device=args.device)
        started = time.perf_counter()
        bank = build_bank(train, config, embedder)
        print(f"bank: {len(train)} images, {len(bank.features)} features, "
              f"built in {time.perf_counter() - started:.1f} s")
        LocalBankStore(models).save(PRODUCT, bank, activate=True)
        model = PatchCoreModel(bank, embedder)

        rows = []
        for mode, batch, wait in (("on", args.max_batch_size, args.max_wait_ms), ("off", 1, 0.0)):
            process, url = start_service(models, batch, wait, queue=256)
            try:
                for concurrency in args.concurrency:
                    row = asyncio.run(load(url, images, concurrency, args.requests))
                    row["batching"] = mode
                    rows.append(row)
                    print(f"batching {mode:3} c={concurrency:2}: {row['throughput_rps']:.2f} req/s"
                          f" p50 {row['p50_ms']:.0f} ms, mean batch {row['mean_batch']:.1f}",
                          flush=True)
            finally:
                process.terminate()
                process.wait(30)

        def same_batch(row: dict) -> int:
            return max(1, round(row["mean_batch"])) if row["batching"] == "on" else 1

        sizes = sorted({same_batch(row) for row in rows})
        engine = {b: in_process(model, images, b, rounds=5) for b in sizes}

    print()
    print("| batching | concurrency | req/s | p50 ms | p95 ms | p99 ms | mean batch | "
          "engine in-process ms/img (same batch) | service ms/img | overhead |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        same = same_batch(row)
        engine_s = engine[same]
        service_s = 1.0 / row["throughput_rps"]
        row["engine_batch"] = same
        row["engine_ms_per_image"] = engine_s * 1000
        row["service_ms_per_image"] = service_s * 1000
        row["overhead"] = service_s / engine_s - 1.0
        print(f"| {row['batching']} | {row['concurrency']} | {row['throughput_rps']:.2f} | "
              f"{row['p50_ms']:.0f} | {row['p95_ms']:.0f} | {row['p99_ms']:.0f} | "
              f"{row['mean_batch']:.1f} | {engine_s * 1000:.1f} (b={same}) | "
              f"{service_s * 1000:.1f} | {row['overhead'] * 100:+.0f}% |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "engine_s_per_image": engine,
                                         "device": args.device}, indent=2))


if __name__ == "__main__":
    main()
