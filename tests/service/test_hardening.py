"""Hardening against careless and hostile clients (issue 10): each test a class of problem."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from app.service.resources import Resources

from .conftest import ADMIN, serving, start_server, stop_server, test_settings

pytestmark = pytest.mark.slow


def test_auth_is_checked_before_the_body(http):
    # Malformed JSON without a key: 401 (the key), not 422 (the body).
    response = http.post("/v1/admin/products/x/builds", content=b"{not json",
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 401
    response = http.post("/v1/admin/products/x/builds", content=b"{not json",
                         headers={"Content-Type": "application/json", **ADMIN})
    assert response.status_code == 422


def test_openapi_declares_the_admin_scheme_and_the_product_pattern(http):
    schema = http.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert any(s.get("in") == "header" and s.get("name") == "X-API-Key" for s in schemes.values())
    build = schema["paths"]["/v1/admin/products/{product}/builds"]["post"]
    assert build.get("security"), "admin operations carry the security requirement"
    param = next(p for p in build["parameters"] if p["name"] == "product")
    assert param["schema"]["pattern"].startswith("^[a-z0-9]")


def test_docs_work_offline(http):
    page = http.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "/docs-assets/swagger-ui-bundle.js" in page.text
    script = http.get("/docs-assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000


def test_an_unexpected_error_keeps_the_connection_open(tmp_path, tile_bank, tile_test, embedder):
    """A 500 answers on the same keep-alive connection and the next request is served on it."""
    from app.storage import LocalBankStore

    LocalBankStore(tmp_path).save("tile", tile_bank, activate=True)
    live = start_server(test_settings(tmp_path))
    try:
        resources: Resources = live.state
        original = resources.predictor.predict

        async def exploding(product, *args, **kwargs):
            if product == "tile" and kwargs.get("client_gone") is not None and exploding.armed:
                exploding.armed = False
                raise RuntimeError("a bug, at /secret/path 0xdeadbeef")
            return await original(product, *args, **kwargs)

        exploding.armed = True
        resources.predictor.predict = exploding  # type: ignore[method-assign]
        host, port = live.url.removeprefix("http://").split(":")
        body = tile_test.read_bytes()
        request = (f"POST /v1/products/tile/predict?heatmap=none HTTP/1.1\r\nHost: {host}\r\n"
                   f"Content-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        with socket.create_connection((host, int(port)), timeout=60) as conn:
            reader = conn.makefile("rb")
            statuses = []
            for _ in range(2):
                conn.sendall(request)
                status_line = reader.readline().decode()
                headers = {}
                while (line := reader.readline().decode().strip()):
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
                payload = reader.read(int(headers["content-length"]))
                statuses.append(int(status_line.split()[1]))
                if statuses[-1] == 500:
                    assert headers.get("connection", "").lower() != "close"
                    assert json.loads(payload)["error"] == {"code": "internal_error",
                                                            "message": "internal server error"}
        assert statuses == [500, 200]
    finally:
        stop_server(live)


def test_slow_body_is_cut_off_with_408(tmp_path):
    live = start_server(test_settings(tmp_path, body_read_timeout_s=1.0))
    try:
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(f"POST /v1/products/demo/predict HTTP/1.1\r\nHost: {host}\r\n"
                         "Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n".encode()
                         + b"\x89PNG")
            started = time.monotonic()
            answer = conn.recv(4096).decode(errors="replace")
            waited = time.monotonic() - started
        # demo is not a product here: the 404 comes before the body is read. Ask for a real one.
        assert answer.startswith("HTTP/1.1 404"), answer[:200]
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(f"POST /v1/admin/products/x/nominal HTTP/1.1\r\nHost: {host}\r\n"
                         f"X-API-Key: {ADMIN['X-API-Key']}\r\n"
                         "Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n".encode()
                         + b"\x89PNG")
            started = time.monotonic()
            answer = conn.recv(4096).decode(errors="replace")
            waited = time.monotonic() - started
        assert answer.startswith("HTTP/1.1 408"), answer[:200]
        assert "request_timeout" in answer and waited < 20
        with httpx.Client(base_url=live.url) as http:
            assert http.get("/health/live").status_code == 200
    finally:
        stop_server(live)


def test_builds_need_enough_images_and_can_stay_inactive(http, bottle_job, bottle_train):
    from .conftest import upload, wait_job

    assert upload(http, "fewimages", bottle_train[:3]).status_code == 201
    refused = http.post("/v1/admin/products/fewimages/builds", headers=ADMIN, json={})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "not_enough_images"
    assert "at least 4" in refused.json()["error"]["message"]
    http.delete("/v1/admin/products/fewimages/nominal", headers=ADMIN)

    before = http.get("/v1/products/bottle").json()["version"]
    job = http.post("/v1/admin/products/bottle/builds", headers=ADMIN,
                    json={"coreset_ratio": 0.05, "activate": False})
    assert job.status_code == 202
    done = wait_job(http, job.json()["id"])
    assert done["state"] == "succeeded" and done["params"]["activate"] is False
    product = http.get("/v1/products/bottle").json()
    assert product["version"] == before and done["version"] in product["versions"]


def test_interrupted_jobs_read_interrupted_after_a_restart(tmp_path):
    jobs = tmp_path / ".jobs"
    jobs.mkdir()
    record = {"id": "a" * 32, "product": "tile", "state": "running", "phase": "coreset",
              "progress": 61.0, "params": {"coreset_ratio": 0.1}, "created_at": time.time() - 60}
    (jobs / f"{'a' * 32}.json").write_text(json.dumps(record))
    (jobs / ".job-xyz.tmp").write_text("{half")
    live = start_server(test_settings(tmp_path))
    try:
        with live.client() as http:
            job = http.get(f"/v1/admin/jobs/{'a' * 32}", headers=ADMIN).json()
            assert job["state"] == "interrupted" and job["error"]["code"] == "interrupted"
    finally:
        stop_server(live)
    assert not (jobs / ".job-xyz.tmp").exists()


def test_heatmaps_are_bounded_and_regions_lie_on_the_photo(tmp_path, tile_bank):
    """A photo larger than max_heatmap_side: the heatmap is scaled to fit (aspect kept),
    region boxes are in the photo's own pixels."""
    from app.storage import LocalBankStore

    LocalBankStore(tmp_path).save("tile", tile_bank, activate=True)
    live = start_server(test_settings(tmp_path, max_heatmap_side=256))
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (600, 1200, 3), dtype=np.uint8)  # noise: anomalous everywhere
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    try:
        with live.client() as http:
            result = http.post("/v1/products/tile/predict", content=buffer.getvalue(),
                               headers={"Content-Type": "image/png"},
                               params={"heatmap": "overlay", "regions": "true"}).json()["results"][0]
        assert (result["width"], result["height"]) == (1200, 600)
        assert (result["heatmap"]["width"], result["heatmap"]["height"]) == (256, 128)
        with Image.open(io.BytesIO(__import__("base64").b64decode(result["heatmap"]["data"]))) as png:
            assert png.size == (256, 128)
        for region in result["regions"]:
            box = region["bbox"]
            assert box["x"] >= 0 and box["x"] + box["width"] <= 1200
            assert box["y"] >= 0 and box["y"] + box["height"] <= 600
    finally:
        stop_server(live)


def test_request_pixel_budget_is_checked_before_decoding(tmp_path, tile_bank):
    from app.storage import LocalBankStore

    LocalBankStore(tmp_path).save("tile", tile_bank, activate=True)
    live = start_server(test_settings(tmp_path, max_image_pixels=1_000_000,
                                      max_request_pixels=1_500_000))
    one = io.BytesIO()
    Image.new("RGB", (1000, 1000)).save(one, format="PNG")
    try:
        with live.client() as http:
            files = [("files", (f"{i}.png", one.getvalue(), "image/png")) for i in range(2)]
            response = http.post("/v1/products/tile/predict", files=files)
            assert response.status_code == 413
            assert response.json()["error"]["code"] == "image_too_large"
            assert "per request" in response.json()["error"]["message"]
            gif = io.BytesIO()
            Image.new("RGB", (8, 8)).save(gif, format="GIF")
            refused = http.post("/v1/products/tile/predict", content=gif.getvalue(),
                                headers={"Content-Type": "image/gif"})
            assert refused.status_code == 400 and "unsupported image format GIF" in refused.text
    finally:
        stop_server(live)


def test_json_logs_are_written_once(tmp_path):
    code = ("import logging\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "from app.service.logging import configure_logging\n"
            "configure_logging('INFO', json_logs=True)\n"
            "logging.getLogger('app.test').info('hello')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    lines = [line for line in result.stderr.splitlines() if "hello" in line]
    assert len(lines) == 1 and json.loads(lines[0])["message"] == "hello", result.stderr


def test_regions_found_on_a_bounded_map_are_given_in_photo_pixels():
    from app.service.rendering import find_regions

    small = np.zeros((100, 200), dtype=np.float32)
    small[10:20, 50:100] = 0.9  # a 50 x 10 blob on a map 1/6 of the photo's size
    (region,) = find_regions(small, to_size=(600, 1200))
    assert region["bbox"] == {"x": 300, "y": 60, "width": 300, "height": 60}
    assert region["area"] == 50 * 10 * 36


def test_a_client_that_hangs_up_while_queued_is_dropped_and_the_worker_goes_on(tmp_path, tile_bank, tile_test,
                                                                                caplog):
    """A queued request whose client closes the socket is noticed without polling (the
    ASGI disconnect message): its image is dropped before compute, counted in
    /metrics, and the next request is served."""
    import threading

    from app.storage import LocalBankStore

    LocalBankStore(tmp_path).save("tile", tile_bank, activate=True)
    live = start_server(test_settings(tmp_path, max_batch_size=1, max_wait_ms=0))
    gate = threading.Event()
    try:
        batcher = live.state.predictor.batcher
        original = batcher._batch_fn

        def held(payloads):  # the first batch waits for the gate: later requests queue
            gate.wait(60)
            return original(payloads)

        batcher._batch_fn = held
        host, port = live.url.removeprefix("http://").split(":")
        body = tile_test.read_bytes()
        request = (f"POST /v1/products/tile/predict?heatmap=none HTTP/1.1\r\nHost: {host}\r\n"
                   f"Content-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        first = socket.create_connection((host, int(port)), timeout=60)
        first.sendall(request)
        time.sleep(0.5)  # the first request holds the worker
        second = socket.create_connection((host, int(port)), timeout=60)
        second.sendall(request)
        time.sleep(0.5)  # the second is queued behind it
        second.close()  # ... and its client hangs up
        time.sleep(0.5)
        gate.set()
        answer = first.makefile("rb").readline()
        first.close()
        assert answer.startswith(b"HTTP/1.1 200")
        with live.client() as http:
            metrics = http.get("/metrics").text
            # Counted once (the worker skipped it), not again by the request that saw it go.
            assert 'patchcore_dropped_images_total{reason="client_gone"} 1.0' in metrics
            assert http.post("/v1/products/tile/predict", content=body, params={"heatmap": "none"},
                             headers={"Content-Type": "image/jpeg"}).status_code == 200
        import gc

        gc.collect()  # an unread gather error is logged when the future is collected
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text
    finally:
        gate.set()
        stop_server(live)


PREDICT_ROUTE = 'route="/v1/products/{product}/predict"'


def _send_and_hang_up(live, body: bytes, sent: bytes, query: str = "", wait_s: float = 0.3) -> None:
    """POST a JPEG predict announcing `body`'s length, send `sent` of it, wait, hang up."""
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(f"POST /v1/products/tile/predict{query} HTTP/1.1\r\nHost: {host}\r\n"
                     f"Content-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n".encode() + sent)
        time.sleep(wait_s)


def _predict_statuses_once_one_of(live, statuses: tuple[str, ...]) -> str:
    """/metrics, once the predict route has answered with one of `statuses` (or after 20 s)."""
    deadline = time.monotonic() + 20
    with live.client() as http:
        while True:
            metrics = http.get("/metrics").text
            if any(f'{PREDICT_ROUTE},status="{s}"' in metrics for s in statuses) or time.monotonic() > deadline:
                return metrics
            time.sleep(0.1)


def _slow_renders(monkeypatch) -> None:
    """Every render takes 3 s more: a CPU pool backed up behind other requests' overlays."""
    import app.service.predictor as predictor_module

    real_render = predictor_module.render

    def slow_render(*args, **kwargs):
        time.sleep(3.0)
        return real_render(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "render", slow_render)


def test_a_client_that_hangs_up_mid_upload_is_a_499_not_a_server_error(tmp_path, tile_bank, tile_test, caplog):
    """Starlette's ClientDisconnect escaped the upload reader as an unhandled error: a 500
    in the metrics and an error with a traceback in the log, for the client's own hang-up."""
    with serving(tmp_path, tile_bank) as live:
        body = tile_test.read_bytes()
        _send_and_hang_up(live, body, body[:1000])
        metrics = _predict_statuses_once_one_of(live, ("499",))
        assert f'{PREDICT_ROUTE},status="499"' in metrics, metrics[-2000:]
        assert f'{PREDICT_ROUTE},status="500"' not in metrics
    assert not [r for r in caplog.records if "unhandled error" in r.getMessage()], caplog.text


def test_the_request_timeout_bounds_the_whole_request(tmp_path, tile_bank, tile_test, monkeypatch):
    """Only the batch queue had a deadline: headers, decodes and renders waited for the CPU
    pool without one (a review saw 200s after 4.7-14.2 s with a 1 s timeout)."""
    _slow_renders(monkeypatch)
    with serving(tmp_path, tile_bank, request_timeout_s=1.0) as live, live.client() as http:
        answer = http.post("/v1/products/tile/predict", content=tile_test.read_bytes(),
                           params={"heatmap": "png"}, headers={"Content-Type": "image/jpeg"})
        # Without a deadline on the render this was a 200, 3 s after the 1 s timeout.
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "timeout", answer.text
        assert http.get("/health/live").status_code == 200


def test_a_client_that_hangs_up_during_its_render_is_let_go(tmp_path, tile_bank, tile_test, monkeypatch):
    """A hang-up was only noticed in the batch queue: decodes and renders went on, and the
    answer was written to the closed socket and counted as a 200. Every wait of the request
    now ends when the client goes (499)."""
    _slow_renders(monkeypatch)
    with serving(tmp_path, tile_bank) as live:
        body = tile_test.read_bytes()
        _send_and_hang_up(live, body, body, query="?heatmap=png", wait_s=1.0)  # scored, render under way
        metrics = _predict_statuses_once_one_of(live, ("499", "200"))
    assert f'{PREDICT_ROUTE},status="499"' in metrics and f'{PREDICT_ROUTE},status="200"' not in metrics, \
        metrics[-1500:]
