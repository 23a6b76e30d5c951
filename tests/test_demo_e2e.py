"""The embedded demo, end to end: a fresh service builds it at first start from the
packaged images, it tells the defective parts from held-out good ones, and the
camera-line simulator drives it without a single failed request.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from app.client import PatchCoreClient
from app.demo import demo_defect_images, demo_test_nominal_images
from app.service.api import create_app
from app.service.settings import Settings
from app.simulate import run_simulation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory) -> Iterator[str]:
    settings = Settings(
        models_dir=tmp_path_factory.mktemp("models"),
        device="cpu",
        demo=True,
        max_batch_size=8,
        max_wait_ms=10,
        decode_threads=2,
        request_timeout_s=120,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = create_app(settings)
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 300  # the demo bank is built before "ready"
        ready = False
        with httpx.Client(base_url=url, timeout=5) as http:
            while not ready and time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError):
                    ready = http.get("/health/ready").status_code == 200
                resources = app.state.resources
                if resources is not None:
                    assert resources.startup.error is None, resources.startup.error
                if not ready:
                    time.sleep(0.2)
        assert ready, "service with the demo product did not become ready"
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_demo_product_is_built_at_first_start(demo_url):
    with PatchCoreClient(demo_url, timeout=120) as client:
        names = str(client.products())
    assert "demo" in names


@pytest.fixture(scope="module")
def answers(demo_url) -> dict[str, list[dict]]:
    """The demo's answers, one request per image, for held-out good parts and defects."""
    with PatchCoreClient(demo_url, timeout=120) as client:
        return {
            "good": [client.predict("demo", p, heatmap="none") for p in demo_test_nominal_images()],
            "bad": [client.predict("demo", p, heatmap="none") for p in demo_defect_images()],
        }


def test_demo_flags_every_defect(answers):
    assert all(r["is_anomalous"] for r in answers["bad"]), [r["score"] for r in answers["bad"]]


def test_demo_images_separate_defects_from_held_out_good_parts(answers):
    # Whatever the threshold rule, the images themselves must leave a wide gap:
    # the weakest defect scores well above the worst held-out good part.
    good = [r["raw_score"] for r in answers["good"]]
    bad = [r["raw_score"] for r in answers["bad"]]
    assert min(bad) > 1.5 * max(good), (good, bad)


def test_demo_passes_held_out_good_parts(answers):
    assert not any(r["is_anomalous"] for r in answers["good"]), [
        (r["raw_score"], r["threshold"]) for r in answers["good"]
    ]


def test_simulator_against_the_real_service(demo_url, answers):
    images = demo_test_nominal_images() + demo_defect_images()
    result = run_simulation(demo_url, "demo", images, 3.0, 2, duration_s=2.0, max_in_flight=8)
    # 6 frames per camera; camera i sends images i, i + 2, i + 4, ...: each image once,
    # so the simulator must count exactly the anomalies the one-by-one answers show.
    assert (result.sent, result.skipped, result.failed) == (12, 0, 0), result.errors
    assert result.ok == 12
    flagged = sum(r["is_anomalous"] for r in answers["good"] + answers["bad"])
    assert result.anomalous == flagged
    assert result.latency_ms(0.99) > 0
