"""kill -9 of a real server process in the middle of a build: after a restart the
previous bank serves, the job reads `interrupted`, and nothing half-written is loaded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.storage import LocalBankStore

from .conftest import ADMIN, ADMIN_KEY

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _serve(models: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PATCHCORE_MODELS_DIR": str(models), "PATCHCORE_DEMO": "false",
           "PATCHCORE_DEVICE": "cpu", "PATCHCORE_ADMIN_API_KEY": ADMIN_KEY,
           "PATCHCORE_MIN_BUILD_IMAGES": "4"}
    process = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    with httpx.Client(base_url=url, timeout=5) as http:
        while time.monotonic() < deadline:
            try:
                if http.get("/health/ready").status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
            if process.poll() is not None:
                break
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready")


@pytest.mark.parametrize("phase", ["coreset", "saving"])
def test_kill_9_during_a_build_keeps_the_previous_bank(tmp_path, tile_bank, tile_train, tile_test,
                                                       phase):
    models = tmp_path / "models"
    first = LocalBankStore(models).save("tile", tile_bank, activate=True)
    process, url = _serve(models)
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in tile_train[:8]]
            assert http.post("/v1/admin/products/tile/nominal", files=files,
                             headers=ADMIN).status_code == 201
            job = http.post("/v1/admin/products/tile/builds", headers=ADMIN,
                            json={"coreset_ratio": 0.05}).json()
            deadline = time.monotonic() + 300
            order = ["queued", "loading", "features", "coreset", "calibration", "saving", "done"]
            seen = "queued"
            while time.monotonic() < deadline:
                seen = http.get(f"/v1/admin/jobs/{job['id']}", headers=ADMIN).json()["phase"]
                if seen not in order or order.index(seen) >= order.index(phase):
                    break
                time.sleep(0.005)
            assert seen in order and order.index(seen) >= order.index(phase), seen
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    process, url = _serve(models)
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            record = http.get(f"/v1/admin/jobs/{job['id']}", headers=ADMIN).json()
            product = http.get("/v1/products/tile").json()
            if record["state"] == "succeeded":  # the kill came after the save and the swap
                assert product["version"] == record["version"]
            else:
                assert record["state"] == "interrupted", record
                # Killed before the pointer moved: the previous bank. Killed between the
                # (atomic) pointer move and the job's record: the new, complete bank.
                assert product["version"] == first or (
                    product["version"] in product["versions"] and product["version"] > first)
            versions = product["versions"]
            assert all(not v.startswith(".") for v in versions)
            ok = http.post("/v1/products/tile/predict", content=tile_test.read_bytes(),
                           headers={"Content-Type": "image/jpeg"}, params={"heatmap": "none"})
            assert ok.status_code == 200
    finally:
        process.terminate()
        process.wait(30)
