"""A full disk: staging uploads, activation and builds answer 507 insufficient_storage,
leave no partial files, and the service keeps serving the bank it had.

Runs on a real, small tmpfs (needs root to mount; skipped with the reason otherwise)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from app.storage import LocalBankStore

from .conftest import ADMIN, start_server, stop_server, test_settings, wait_job

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path) -> Path:
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip() or result.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(disk: Path) -> Path:
    """Write until the disk is full; returns the filler file."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    return filler


def _debris(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith((".tmp", ".active-", ".job-")) or p.name.endswith(".tmp"))


def test_disk_full_answers_507_and_leaves_nothing_half_written(small_disk, tile_bank, tile_train,
                                                               tile_test):
    models = small_disk / "models"
    store = LocalBankStore(models)
    first = store.save("tile", tile_bank, activate=True)
    second = store.save("tile", tile_bank, activate=False)
    live = start_server(test_settings(models))
    try:
        with live.client() as http:
            files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in tile_train[:4]]
            assert http.post("/v1/admin/products/tile/nominal", files=files,
                             headers=ADMIN).status_code == 201
            filler = _fill(small_disk)

            more = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in tile_train[4:8]]
            upload = http.post("/v1/admin/products/tile/nominal", files=more, headers=ADMIN)
            assert upload.status_code == 507, upload.text
            assert upload.json()["error"]["code"] == "insufficient_storage"
            staged = http.get("/v1/admin/products/tile/nominal", headers=ADMIN).json()
            assert staged["count"] == 4  # the failed upload added nothing

            activate = http.post("/v1/admin/products/tile/activate", json={"version": second},
                                 headers=ADMIN)
            assert activate.status_code == 507, activate.text
            assert http.get("/v1/products/tile").json()["version"] == first
            assert store.active_version("tile") == first

            build = http.post("/v1/admin/products/tile/builds", json={"coreset_ratio": 0.05},
                              headers=ADMIN)
            assert build.status_code == 202, build.text
            job = wait_job(http, build.json()["id"])
            assert job["state"] == "failed" and job["error"]["code"] == "insufficient_storage", job
            assert "/" not in job["error"]["message"]
            assert _debris(models) == []

            ok = http.post("/v1/products/tile/predict", content=tile_test.read_bytes(),
                           headers={"Content-Type": "image/jpeg"}, params={"heatmap": "none"})
            assert ok.status_code == 200 and ok.json()["results"][0]["bank_version"] == first

            filler.unlink()
            activate = http.post("/v1/admin/products/tile/activate", json={"version": second},
                                 headers=ADMIN)
            assert activate.status_code == 200, activate.text
            assert http.get("/v1/products/tile").json()["version"] == second
    finally:
        stop_server(live)
