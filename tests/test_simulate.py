"""Camera-line simulator against a live local HTTP server: the counts must add up.

The stub speaks the service's wire protocol for POST /v1/products/{p}/predict
(raw image body in, {"results": [...]} or {"error": {...}} out) and keeps its
own tally, so every request the simulator counts is checked against what the
server actually received.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.demo import demo_defect_images, demo_nominal_images
from app.simulate import SimulationError, SimulationResult, check_target, main, run_simulation


@dataclass
class StubState:
    reject_every: int = 0  # answer 429 to every n-th request (0: never)
    delay_s: float = 0.0
    tally: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_stub(state: StubState) -> Starlette:
    async def predict(request: Request) -> JSONResponse:
        body = await request.body()
        with state.lock:
            state.tally["received"] += 1
            n = state.tally["received"]
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        if request.path_params["product"] != "demo":
            state.tally["404"] += 1
            return JSONResponse(
                {"error": {"code": "product_not_found", "message": "no such product"}}, 404
            )
        if state.reject_every and n % state.reject_every == 0:
            state.tally["429"] += 1
            return JSONResponse(
                {"error": {"code": "overloaded", "message": "queue full"}},
                429,
                headers={"Retry-After": "1"},
            )
        anomalous = hashlib.sha256(body).digest()[0] % 2 == 1
        state.tally["200"] += 1
        state.tally["anomalous"] += anomalous
        result = {"score": 0.7 if anomalous else 0.2, "is_anomalous": anomalous}
        return JSONResponse({"product": "demo", "results": [result]})

    return Starlette(routes=[Route("/v1/products/{product}/predict", predict, methods=["POST"])])


@pytest.fixture
def stub() -> Iterator[tuple[str, StubState]]:
    state = StubState()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_stub(state), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        threading.Event().wait(0.01)
    assert server.started, "stub server did not start"
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


IMAGES = demo_nominal_images()[:4] + demo_defect_images()[:2]


def assert_consistent(result: SimulationResult, state: StubState) -> None:
    assert result.sent == state.tally["received"]
    assert result.ok == state.tally["200"]
    assert result.anomalous == state.tally["anomalous"]
    assert result.ok + result.failed == result.sent
    assert len(result.latencies_s) == result.ok


def test_counts_add_up_with_errors_by_status(stub):
    url, state = stub
    state.reject_every = 4
    # Room for every frame in flight, so none is skipped even on a loaded machine.
    result = run_simulation(
        url, "demo", IMAGES, rate_per_camera=20, cameras=3, duration_s=1.0, max_in_flight=64
    )
    # Frames are due at start + i/60 + k/20 s while before the 1 s deadline: 20 per camera.
    assert result.sent + result.skipped == 60
    assert result.skipped == 0
    assert_consistent(result, state)
    assert result.errors == Counter({"429 overloaded": state.tally["429"]})
    assert state.tally["429"] == 60 // 4
    assert 0 < result.latency_ms(0.5) <= result.latency_ms(0.95) <= result.latency_ms(0.99)
    assert result.throughput > 0
    assert "p95" in result.summary()


def test_throughput_never_exceeds_the_offered_rate_on_a_short_run(stub):
    """N frames span N periods of their camera: counted from the first frame to the last
    answer alone, 2 frames at 2/s once reported about 4 answers per second."""
    url, _ = stub
    result = run_simulation(url, "demo", IMAGES, rate_per_camera=2, cameras=1, duration_s=1.0)
    assert result.ok == 2 and result.duration_s >= 1.0
    assert result.throughput <= 2.0 + 1e-9


def test_total_requests_stops_early(stub):
    url, state = stub
    result = run_simulation(url, "demo", IMAGES, 50, 5, duration_s=30, total_requests=25)
    assert result.sent + result.skipped == 25
    assert result.duration_s < 5  # 25 frames at 250/s, not the 30 s duration
    assert_consistent(result, state)


def test_slow_service_makes_cameras_skip_frames_not_pile_up(stub):
    url, state = stub
    state.delay_s = 0.3
    result = run_simulation(url, "demo", IMAGES, 20, 2, duration_s=1.0, max_in_flight=1)
    assert result.sent + result.skipped == 40
    # At most one request in flight per camera, each taking 0.3 s: about 4 each.
    assert 2 <= result.sent <= 12
    assert result.skipped == 40 - result.sent
    assert_consistent(result, state)
    assert result.latency_ms(0.5) >= 300


def test_cli_reports_json_and_fails_on_errors(stub, capsys):
    url, state = stub
    argv = f"--url {url} --product nope --cameras 2 --rate 10 --requests 6 --json".split()
    assert main(argv) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["sent"] + report["skipped"] == 6
    assert report["errors"] == {"404 product_not_found": report["sent"]}
    assert report["ok"] == 0
    assert state.tally["404"] == report["sent"]


def test_cli_succeeds_on_demo_images_folder(stub, capsys, tmp_path):
    url, state = stub
    for path in IMAGES[:3]:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    argv = f"--url {url} --images {tmp_path} --cameras 1 --rate 2 --requests 5".split()
    assert main(argv) == 0
    assert "ok 5" in capsys.readouterr().out
    assert state.tally["200"] == 5


def test_connection_refused_is_counted_not_raised():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_simulation(
        f"http://127.0.0.1:{port}", "demo", IMAGES, 20, 2, total_requests=6, timeout=2.0
    )
    assert result.ok == 0
    assert result.sent + result.skipped == 6
    assert result.errors == Counter({"connection": result.sent})


@pytest.mark.parametrize(
    "url", ["http://192.0.2.7:8000", "http://10.1.2.3", "ftp://127.0.0.1/", "127.0.0.1:8000"]
)
def test_refuses_targets_that_are_not_loopback_http(url):
    with pytest.raises(SimulationError):
        check_target(url)


def test_accepts_loopback_and_explicit_remote():
    check_target("http://127.0.0.1:8000")
    check_target("http://localhost:8000")
    check_target("http://[::1]:8000")
    check_target("http://192.0.2.7:8000", allow_remote=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"duration_s": None, "total_requests": None},
        {"cameras": 0},
        {"rate_per_camera": 0},
        {"total_requests": 0},
        {"max_in_flight": 0},
    ],
)
def test_refuses_unbounded_or_bad_runs(kwargs):
    args = {"rate_per_camera": 1.0, "cameras": 1, "duration_s": 1.0, **kwargs}
    with pytest.raises(SimulationError):
        run_simulation("http://127.0.0.1:9", "demo", IMAGES, **args)


def test_latency_quantiles_nearest_rank():
    result = SimulationResult(cameras=1, rate_per_camera=1, duration_s=1.0)
    result.latencies_s = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert result.latency_ms(0.5) == pytest.approx(50)
    assert result.latency_ms(0.95) == pytest.approx(95)
    assert result.latency_ms(0.99) == pytest.approx(99)
    assert result.latency_ms(1.0) == pytest.approx(100)


def test_cli_refuses_a_folder_without_images_of_its_own(tmp_path, capsys):
    (tmp_path / "mask").mkdir()
    (tmp_path / "mask" / "a_mask.png").write_bytes(IMAGES[0].read_bytes())
    assert main(["--url", "http://127.0.0.1:9", "--images", str(tmp_path), "--requests", "1"]) == 2
    assert "no images" in capsys.readouterr().err
