"""Peak memory of the worst predict request the limits allow, through real HTTP.

Starts `python -m app serve` (from --repo, default this checkout) in a subprocess
with a product saved from a small real bank, warms it up with ordinary requests,
then sends the worst requests the default limits admit, one at a time, and
reads the server's peak RSS (VmHWM in /proc) before and after each:

  png_bombs     max_request_pixels of all-black PNGs at max_image_pixels each
                (a few hundred KB of body, 40 MP per image decoded)
  jpeg_6000     one 6000x6600 JPEG of 0.6 MB (the case in issue 10), heatmap=overlay
  many_small    max_images_per_request camera frames of 900x900, overlay + regions

    .venv/bin/python benchmarks/bench_memory.py --json benchmarks/results/memory.json
    .venv/bin/python benchmarks/bench_memory.py --repo /path/to/old/checkout   # a baseline
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _reset_peak(pid: int) -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _requests(max_image_pixels: int, max_request_pixels: int, max_images: int) -> dict[str, list[bytes]]:
    side = int(max_image_pixels ** 0.5)
    bomb = _encode(np.zeros((side, side, 3), dtype=np.uint8), "PNG", compress_level=9)
    count = max(1, min(max_images, max_request_pixels // (side * side)))
    gradient = np.linspace(0, 255, 6000, dtype=np.float32)
    big = np.repeat(np.stack([np.tile(gradient, (6600, 1))] * 3, axis=2).astype(np.uint8), 1, axis=0)
    jpeg = _encode(big, "JPEG", quality=75)
    frame = np.asarray(Image.open(sorted((DATA / "bottle" / "test" / "broken_large").glob("*.png"))[0]).convert("RGB"))
    frame_png = _encode(frame, "PNG")
    return {"png_bombs": [bomb] * count, "jpeg_6000": [jpeg],
            "many_small": [frame_png] * max_images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from app.core.embedding import EmbedderConfig, create_embedder
    from app.core.patchcore import PatchCoreConfig, build_bank
    from app.storage import LocalBankStore

    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    train = sorted((DATA / "bottle" / "train" / "good").glob("*.png"))[:20]
    bank = build_bank(train, PatchCoreConfig(coreset_ratio=0.1), create_embedder(EmbedderConfig(), device="cpu"))
    LocalBankStore(workdir / "models").save("bottle", bank, activate=True)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PATCHCORE_MODELS_DIR": str(workdir / "models"), "PATCHCORE_DEMO": "false",
           "PATCHCORE_DEVICE": "cpu", "PYTHONPATH": str(args.repo)}
    server = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port)], cwd=args.repo,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    results: dict = {"repo": str(args.repo)}
    try:
        with httpx.Client(base_url=url, timeout=600) as http:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if http.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            frame = _requests(1, 1, 1)["many_small"][0]
            for _ in range(5):  # warm up: allocator pools, thread pools, lazy imports
                http.post("/v1/products/bottle/predict", content=frame, headers={"Content-Type": "image/png"},
                          params={"heatmap": "overlay", "regions": "true"})
            results["idle_rss_mb"] = round(_rss_mb(server.pid), 1)
            for name, images in _requests(40_000_000, 100_000_000, 16).items():
                _reset_peak(server.pid)
                before = _rss_mb(server.pid)
                files = [("files", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)]
                started = time.perf_counter()
                response = http.post("/v1/products/bottle/predict", files=files,
                                     params={"heatmap": "overlay", "regions": "true"})
                elapsed = time.perf_counter() - started
                peak = _peak_rss_mb(server.pid)
                results[name] = {"status": response.status_code, "images": len(images),
                                 "body_mb": round(sum(map(len, images)) / 1e6, 2),
                                 "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
                                 "peak_increase_mb": round(peak - before, 1), "seconds": round(elapsed, 2),
                                 "response_mb": round(len(response.content) / 1e6, 2)}
                print(name, results[name], flush=True)
    finally:
        server.terminate()
        server.wait(30)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
