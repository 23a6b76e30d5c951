"""benchmarks/gpu_check.sh in its tiny CPU mode, so the GPU script cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_the_cpu(shared_data, tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--tiny", "--no-install",
         "--out", str(out), "--data", str(shared_data)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for image_format in ("png", "jpeg"):
        report = json.loads((out / f"service_{image_format}.json").read_text())
        assert report["image_format"] == image_format
        levels = {(row["batching"], row["concurrency"]) for row in report["rows"]}
        assert levels == {("on", 1), ("on", 2), ("off", 1), ("off", 2)}
        for row in report["rows"]:
            assert row["failures"] == 0 and row["requests"] > 0
            assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
            assert row["gpu_memory_mb"] is None  # no GPU here: reported as n/a, never made up
            # Concurrency 2 is split over two load-generating processes.
            assert row["clients"] == row["concurrency"]
            # The service's own mean time per request, from its /metrics (warm-up included).
            assert row["server_mean_ms"] > 0
        assert report["engine"]["device"] == "cpu"
        table = (out / f"service_{image_format}.md").read_text()
        assert "| batching | processes | concurrency |" in table and "GPU MB" in table
    # Step 4's JPEG run decodes on the device (here "always", the CPU twin of CUDA's "auto");
    # step 5 is its CPU-decode baseline.
    assert json.loads((out / "service_jpeg.json").read_text())["service"]["device_decode"] == "always"
    assert json.loads((out / "service_png.json").read_text())["service"]["device_decode"] == "always"
    baseline = json.loads((out / "service_jpeg_cpu_decode.json").read_text())
    assert baseline["service"]["device_decode"] == "off" and baseline["engine"] is None
    assert [(row["batching"], row["concurrency"]) for row in baseline["rows"]] == [("on", 2)]
    assert all(row["failures"] == 0 and row["requests"] > 0 for row in baseline["rows"])
    assert "device decode off" in (out / "service_jpeg_cpu_decode.md").read_text()
    # Step 6: two service processes share the device, each client process talks to one.
    shared = json.loads((out / "service_jpeg_processes.json").read_text())
    assert shared["server_processes"] == 2 and shared["engine"] is None
    assert [(row["batching"], row["concurrency"]) for row in shared["rows"]] == [("on", 2)]
    for row in shared["rows"]:
        assert row["failures"] == 0 and row["requests"] > 0 and row["server_processes"] == 2
        assert row["server_mean_ms"] > 0
    # Step 3: the stage profile, with the device-decode row beside the CPU decode.
    profile = json.loads((out / "profile.json").read_text())
    assert [row["batch"] for row in profile["rows"]] == [1, 2]
    for row in profile["rows"]:
        assert row["decode_jpeg_on_device_ms_per_img"] > 0 and row["predict_batch_ms"] > 0
        # The device path's input is the CPU path's up to decoding scale and resampling:
        # about a grey level (1/128 = 0.0078 in normalised units for Lite0) at most.
        assert row["device_vs_service_input_mean_abs"] < 0.01
    assert "faiss gpu" in (out / "environment.txt").read_text()
