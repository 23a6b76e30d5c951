"""Fixtures for the service tests: real data, a real uvicorn server, a real bank.

The server starts once per session on a loopback port; its "bottle" bank is
built once, through the admin API, from a handful of real MVTec images.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from app.service.api import create_app
from app.service.settings import Settings

ADMIN_KEY = "test-admin-key-0123456789abcdef"
ADMIN = {"X-API-Key": ADMIN_KEY}
TRAIN_IMAGES = 10


@pytest.fixture(scope="session")
def data(shared_data) -> Path:
    return shared_data


@pytest.fixture(scope="session")
def bottle_train(data) -> list[Path]:
    return sorted((data / "bottle" / "train" / "good").glob("*.png"))[:TRAIN_IMAGES]


@pytest.fixture(scope="session")
def bottle_good(data) -> list[Path]:
    return sorted((data / "bottle" / "test" / "good").glob("*.png"))[:3]


@pytest.fixture(scope="session")
def bottle_defect(data) -> list[Path]:
    return sorted((data / "bottle" / "test" / "broken_large").glob("*.png"))[:3]


@pytest.fixture(scope="session")
def tile_train(data) -> list[Path]:
    return sorted((data / "magnetic_tile" / "train" / "good").glob("*.jpg"))[:TRAIN_IMAGES]


def test_settings(models_dir: Path, **overrides) -> Settings:
    values = {"models_dir": models_dir, "admin_api_key": ADMIN_KEY, "device": "cpu",
              "demo": False, "max_batch_size": 8, "max_wait_ms": 25, "queue_size": 64,
              "max_upload_mb": 4, "max_image_pixels": 2_000_000, "max_images_per_request": 8,
              "decode_threads": 2, "request_timeout_s": 120,
              "min_build_images": 4}
    values.update(overrides)
    return Settings(**values)


test_settings.__test__ = False  # a helper, not a test


@dataclass
class LiveServer:
    url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def state(self):
        """The resources the lifespan opened (app.service.resources.Resources)."""
        return self.app.state.resources

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)


def start_server(settings: Settings, ready_timeout: float = 300) -> LiveServer:
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{port}", app, server, thread)
    deadline = time.monotonic() + ready_timeout
    with httpx.Client(base_url=live.url, timeout=5) as http:
        while time.monotonic() < deadline:
            try:
                if http.get("/health/ready").status_code == 200:
                    return live
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    stop_server(live)
    raise RuntimeError("server did not become ready")


def stop_server(live: LiveServer) -> None:
    live.server.should_exit = True
    live.thread.join(30)


@contextlib.contextmanager
def serving(models_dir: Path, bank, product: str = "tile", **overrides) -> Iterator[LiveServer]:
    """A live server on a fresh store holding `bank` as `product`, stopped afterwards."""
    from app.storage import LocalBankStore

    LocalBankStore(models_dir).save(product, bank, activate=True)
    live = start_server(test_settings(models_dir, **overrides))
    try:
        yield live
    finally:
        stop_server(live)


@pytest.fixture(scope="session")
def server(tmp_path_factory, data) -> Iterator[LiveServer]:
    live = start_server(test_settings(tmp_path_factory.mktemp("models")))
    yield live
    stop_server(live)


@pytest.fixture(scope="session")
def http(server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def wait_job(http: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/admin/jobs/{job_id}", headers=ADMIN).json()
        if job["state"] in ("succeeded", "failed", "cancelled", "interrupted"):
            return job
        time.sleep(0.1)
    raise TimeoutError(job_id)


def upload(http: httpx.Client, product: str, paths: list[Path]) -> httpx.Response:
    """Upload in requests of 4 (the test server's body limit is 4 MB)."""
    response = None
    for start in range(0, len(paths), 4):
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths[start:start + 4]]
        response = http.post(f"/v1/admin/products/{product}/nominal", files=files, headers=ADMIN)
        if response.status_code != 201:
            return response
    return response


@pytest.fixture(scope="session")
def bottle_job(http, bottle_train) -> dict:
    """The bottle bank, built once through the admin API from real images."""
    assert upload(http, "bottle", bottle_train).status_code == 201
    response = http.post("/v1/admin/products/bottle/builds", headers=ADMIN,
                         json={"coreset_ratio": 0.1, "seed": 0})
    assert response.status_code == 202, response.text
    job = wait_job(http, response.json()["id"])
    assert job["state"] == "succeeded", job
    return job


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Sum of a sample's values in Prometheus text, matching name and label substring."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="session")
def embedder():
    from app.core.embedding import EmbedderConfig, create_embedder

    return create_embedder(EmbedderConfig(), device="cpu")


@pytest.fixture(scope="session")
def tile_bank(tile_train, embedder):
    """A real bank built in-process from a handful of magnetic_tile images."""
    from app.core.patchcore import PatchCoreConfig, build_bank

    return build_bank(tile_train, PatchCoreConfig(coreset_ratio=0.1), embedder)


@pytest.fixture(scope="session")
def tile_test(data) -> Path:
    return sorted((data / "magnetic_tile" / "test" / "good").glob("*.jpg"))[0]
