"""The service on an S3 store that is down at start: alive at once, not ready, ready once the store returns,
not ready again during a later outage. Real service (lifespan, backbone), real SeaweedFS behind a proxy."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import uvicorn

from app.service import resources as resources_module
from app.service.api import create_app
from app.service.settings import Settings

from .conftest import BUCKET, TcpProxy


def _wait_status(client: httpx.Client, path: str, status: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = client.get(path)
        except httpx.TransportError:  # not listening yet
            time.sleep(0.1)
            if time.monotonic() > deadline:
                raise
            continue
        if response.status_code == status:
            return response.json()
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} stayed {response.status_code}: {response.text}")
        time.sleep(0.1)


class _serve:
    """uvicorn on a free loopback port in a thread, stopped on exit (the lifespan runs for real)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.sock.getsockname()[1]}", timeout=30)
        _wait_status(self.client, "/health/live", 200, timeout=30)
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.mark.slow
def test_store_down_at_start_then_back(seaweed, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr(resources_module, "STORE_RETRY_S", 0.2)
    monkeypatch.setattr(resources_module, "STORE_CHECK_S", 0.2)
    proxy = TcpProxy(seaweed.port)  # not up yet: the store is unreachable at start
    settings = Settings(models_dir=tmp_path / "models", store="s3", s3_endpoint_url=proxy.url, s3_bucket=BUCKET,
                        s3_prefix=f"svc-{uuid.uuid4().hex[:8]}", device="cpu", demo=False)
    try:
        with _serve(create_app(settings)) as client:
            assert client.get("/health/live").status_code == 200
            time.sleep(1.0)
            down = client.get("/health/ready")
            assert down.status_code == 503 and "store_reachable" in down.json()["error"]["message"]
            assert "/tmp" not in down.text

            proxy.up()
            ready = _wait_status(client, "/health/ready", 200)
            assert ready["checks"]["store_reachable"] and ready["checks"]["startup_complete"]
            assert client.get("/v1/products").status_code == 200

            proxy.down()  # a later outage: not ready, and back again
            _wait_status(client, "/health/ready", 503)
            proxy.up()
            _wait_status(client, "/health/ready", 200)
    finally:
        proxy.down()


@pytest.mark.slow
def test_broken_pointer_is_reported_failed_never_guessed(tmp_path):
    """Issue 10 #5: an empty ACTIVE after a rollback used to serve the newest version; now the product is failed."""
    from app.storage import LocalBankStore

    from .conftest import tiny_bank

    models = tmp_path / "models"
    store = LocalBankStore(models)
    old = store.save("bottle", tiny_bank(rows=50))
    store.save("bottle", tiny_bank(rows=60))
    store.activate("bottle", old)  # a rollback...
    (models / "bottle" / "ACTIVE").write_text("")  # ...whose pointer was then emptied
    settings = Settings(models_dir=models, device="cpu", demo=False)
    with _serve(create_app(settings)) as client:
        _wait_status(client, "/health/ready", 200)
        listing = client.get("/v1/products").json()
        assert listing["products"] == []
        [failed] = listing["failed"]
        assert failed["name"] == "bottle" and "active pointer" in failed["reason"]
        assert str(tmp_path) not in json.dumps(listing)
        detail = client.get("/v1/products/bottle")
        assert detail.status_code == 200 and detail.json()["status"] == "failed"
        image = Path(__file__).resolve().parents[2] / "app" / "demo" / "images" / "good_test" / "000.png"
        refused = client.post("/v1/products/bottle/predict", content=image.read_bytes(),
                              headers={"Content-Type": "image/png"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "product_unavailable"
        assert str(tmp_path) not in refused.text
