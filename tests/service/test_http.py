"""The main path through real HTTP: uvicorn on a loopback port, httpx as the client,
the real engine with real weights, a bank built from real MVTec bottle images."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from app.service.rendering import colourise

from .conftest import ADMIN, metric_value, upload, wait_job

pytestmark = pytest.mark.slow


def predict(http, product, path, **params):
    return http.post(f"/v1/products/{product}/predict", content=path.read_bytes(),
                     headers={"Content-Type": "image/png"}, params={"heatmap": "none", **params})


def test_health_and_request_id(http):
    live = http.get("/health/live")
    assert live.status_code == 200 and live.json()["status"] == "alive"
    generated = live.headers["x-request-id"]
    assert len(generated) >= 16
    ready = http.get("/health/ready", headers={"X-Request-ID": "cam-7.frame-42"})
    assert ready.status_code == 200 and all(ready.json()["checks"].values())
    assert ready.headers["x-request-id"] == "cam-7.frame-42"
    unsafe = http.get("/health/live", headers={"X-Request-ID": "bad id\twith spaces"})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"


def test_build_job_through_admin_api(http, bottle_job, bottle_train):
    assert bottle_job["progress"] == 100.0 and bottle_job["phase"] == "done"
    assert bottle_job["image_count"] == len(bottle_train)
    assert bottle_job["error"] is None and bottle_job["version"]
    assert bottle_job["timings_s"]["running"] > 0
    listed = http.get("/v1/admin/jobs", headers=ADMIN).json()["jobs"]
    assert bottle_job["id"] in [j["id"] for j in listed]
    products = http.get("/v1/products").json()
    bottle = next(p for p in products["products"] if p["name"] == "bottle")
    assert bottle["version"] == bottle_job["version"] and bottle["status"] == "loaded"
    assert bottle["backbone"] and bottle["bank_size"] > 0 and bottle["threshold"] > 0
    assert bottle["created_at"]
    detail = http.get("/v1/products/bottle").json()
    assert bottle_job["version"] in detail["versions"]


def test_predict_from_the_new_bank(http, bottle_job, bottle_good, bottle_defect):
    good = [predict(http, "bottle", p).json()["results"][0] for p in bottle_good]
    bad = [predict(http, "bottle", p).json()["results"][0] for p in bottle_defect]
    for result in good + bad:
        assert result["bank_version"] == bottle_job["version"]
        assert (result["width"], result["height"]) == (900, 900)
        # score: nominal median -> 0 (a good part at or below it scores 0), threshold -> 0.5.
        assert 0 <= result["score"] <= 1 and result["raw_score"] > 0 and result["threshold"] > 0
        assert result["is_anomalous"] == (result["score"] > 0.5)
        timings = result["timings"]
        assert timings["compute_ms"] > 0 and timings["queued_ms"] >= 0
        assert timings["batch_size"] >= 1
    # Broken bottles score above good ones, and above the threshold.
    assert min(r["score"] for r in bad) > max(r["score"] for r in good)
    assert all(r["is_anomalous"] for r in bad)


def test_multipart_and_raw_body_agree(http, bottle_job, bottle_good, bottle_defect):
    paths = [bottle_good[0], bottle_defect[0]]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    many = http.post("/v1/products/bottle/predict", files=files, params={"heatmap": "none"})
    assert many.status_code == 200, many.text
    results = many.json()["results"]
    assert [r["filename"] for r in results] == [p.name for p in paths]
    for path, result in zip(paths, results, strict=True):
        single = predict(http, "bottle", path).json()["results"][0]
        assert single["score"] == pytest.approx(result["score"], rel=1e-4)


def _decode_png(data: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_heatmap_overlay_and_regions(http, bottle_job, bottle_defect):
    path = bottle_defect[0]
    response = predict(http, "bottle", path, heatmap="png", regions="true")
    assert response.status_code == 200
    result = response.json()["results"][0]
    heat = _decode_png(result["heatmap"]["data"])
    assert heat.shape == (900, 900, 3) and result["heatmap"]["kind"] == "png"
    assert result["regions"], "a broken bottle has regions above the threshold"
    for region in result["regions"]:
        box = region["bbox"]
        assert box["x"] >= 0 and box["x"] + box["width"] <= 900
        assert box["y"] >= 0 and box["y"] + box["height"] <= 900
        assert 0 < region["area"] <= box["width"] * box["height"]
        assert region["max_score"] > 0.5
    overlay = predict(http, "bottle", path, heatmap="overlay").json()["results"][0]
    blended = _decode_png(overlay["heatmap"]["data"])
    assert blended.shape == (900, 900, 3) and overlay["heatmap"]["kind"] == "overlay"
    photo = np.asarray(Image.open(path).convert("RGB"))
    # Half photo, half heatmap: neither one alone.
    assert not np.array_equal(blended, heat) and not np.array_equal(blended, photo)
    assert overlay["regions"] is None


def test_concurrent_requests_are_batched_and_equal_one_at_a_time(
        http, server, bottle_job, bottle_good, bottle_defect):
    paths = (bottle_good + bottle_defect) * 2
    expected = {p: predict(http, "bottle", p).json()["results"][0]["score"] for p in set(paths)}
    before = http.get("/metrics").text

    def call(path):
        return path, predict(http, "bottle", path)

    with ThreadPoolExecutor(len(paths)) as pool:
        answers = list(pool.map(call, paths))
    after = http.get("/metrics").text
    for path, response in answers:
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["score"] == pytest.approx(expected[path], rel=1e-4)
    batches = metric_value(after, "patchcore_batch_size_count") - metric_value(
        before, "patchcore_batch_size_count")
    images = metric_value(after, "patchcore_batch_size_sum") - metric_value(
        before, "patchcore_batch_size_sum")
    assert images == len(paths)
    assert batches < len(paths), "some batches held more than one image"
    assert max(r.json()["results"][0]["timings"]["batch_size"] for _, r in answers) > 1


def test_hot_swap_under_a_stream_of_requests(http, server, bottle_job, bottle_good):
    stop = threading.Event()
    statuses: list[int] = []
    versions: set[str] = set()

    def stream():
        while not stop.is_set():
            response = predict(http, "bottle", bottle_good[0])
            statuses.append(response.status_code)
            if response.status_code == 200:
                versions.add(response.json()["results"][0]["bank_version"])

    workers = [threading.Thread(target=stream) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.5)
        started = http.post("/v1/admin/products/bottle/builds", headers=ADMIN,
                            json={"coreset_ratio": 0.05, "seed": 1})
        assert started.status_code == 202, started.text
        job = wait_job(http, started.json()["id"])
        assert job["state"] == "succeeded"
        time.sleep(0.5)
        rolled = http.post("/v1/admin/products/bottle/activate", headers=ADMIN,
                           json={"version": bottle_job["version"]})
        assert rolled.status_code == 200, rolled.text
        time.sleep(0.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert statuses and set(statuses) == {200}
    assert {job["version"], bottle_job["version"]} <= versions
    detail = http.get("/v1/products/bottle").json()
    assert detail["version"] == bottle_job["version"]
    assert {job["version"], bottle_job["version"]} <= set(detail["versions"])
    # Later requests see the rolled-back bank.
    after = predict(http, "bottle", bottle_good[0]).json()["results"][0]
    assert after["bank_version"] == bottle_job["version"]


def test_metrics_exposition(http, bottle_job, bottle_good):
    predict(http, "bottle", bottle_good[0])
    text = http.get("/metrics").text
    assert 'patchcore_http_requests_total{method="POST",route="/v1/products/{product}/predict",' \
           'status="200"}' in text
    for name in ("patchcore_http_request_duration_seconds_bucket", "patchcore_queue_depth",
                 "patchcore_batch_size_bucket", "patchcore_time_queued_seconds_bucket",
                 "patchcore_time_computing_seconds_bucket", "patchcore_bank_size",
                 "patchcore_build_jobs"):
        assert name in text, name
    assert metric_value(text, "patchcore_build_jobs", 'state="succeeded"') >= 1
    assert metric_value(text, "patchcore_bank_size", 'product="bottle"') > 0
    # Every succeeded build's running time (the histogram was once declared and never fed).
    assert metric_value(text, "patchcore_build_duration_seconds_count") >= 1
    assert metric_value(text, "patchcore_build_duration_seconds_sum") > 0


def test_staging_list_clear_and_cancel(http, bottle_job, tile_train):
    assert upload(http, "tile", tile_train).status_code == 201
    listed = http.get("/v1/admin/products/tile/nominal", headers=ADMIN).json()
    assert listed["count"] == len(tile_train)
    started = http.post("/v1/admin/products/tile/builds", headers=ADMIN, json={})
    assert started.status_code == 202
    again = http.post("/v1/admin/products/tile/builds", headers=ADMIN, json={})
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_conflict"
    # The running build reads the staging set: clearing it under the build is refused.
    busy = http.delete("/v1/admin/products/tile/nominal", headers=ADMIN)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "job_conflict", busy.text
    cancelled = http.delete(f"/v1/admin/jobs/{started.json()['id']}", headers=ADMIN)
    assert cancelled.status_code == 202 and cancelled.json()["cancel_requested"]
    job = wait_job(http, started.json()["id"])
    assert job["state"] == "cancelled"
    assert http.get("/v1/products/tile").status_code == 404
    cleared = http.delete("/v1/admin/products/tile/nominal", headers=ADMIN).json()
    assert cleared["removed"] == len(tile_train)
    nothing = http.post("/v1/admin/products/tile/builds", headers=ADMIN, json={})
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "no_nominal_images"
    assert http.get("/v1/admin/jobs/nope", headers=ADMIN).status_code == 404


def test_a_product_deleted_under_its_build_cancels_it(http, tile_train, monkeypatch):
    """DELETE cancels the build and removes the staged files it was reading: the job ends
    cancelled, not failed with "cannot read image file"."""
    import threading

    import app.service.jobs as jobs_module

    reading, deleted = threading.Event(), threading.Event()
    real_build = jobs_module.build_bank

    def build_after_the_delete(*args, **kwargs):
        reading.set()
        assert deleted.wait(60)
        return real_build(*args, **kwargs)  # its staged files are gone now

    monkeypatch.setattr(jobs_module, "build_bank", build_after_the_delete)
    assert upload(http, "tile-deleted", tile_train).status_code == 201
    started = http.post("/v1/admin/products/tile-deleted/builds", headers=ADMIN, json={})
    assert started.status_code == 202 and reading.wait(60)
    try:
        assert http.delete("/v1/admin/products/tile-deleted", headers=ADMIN).status_code == 204
    finally:
        deleted.set()
    job = wait_job(http, started.json()["id"])
    assert job["state"] == "cancelled" and job.get("error") is None, job
    assert http.get("/v1/products/tile-deleted").status_code == 404


def test_full_queue_answers_429_with_retry_after(server, bottle_job, bottle_good):
    from .conftest import start_server, stop_server, test_settings

    settings = test_settings(server.state.settings.models_dir, queue_size=1, max_batch_size=1,
                             max_wait_ms=0, decode_threads=4)
    small = start_server(settings)
    try:
        body = bottle_good[0].read_bytes()
        with small.client() as client:
            def call(_):
                return client.post("/v1/products/bottle/predict", content=body,
                                   headers={"Content-Type": "image/png"},
                                   params={"heatmap": "none"})

            with ThreadPoolExecutor(12) as pool:
                answers = list(pool.map(call, range(12)))
            codes = sorted(r.status_code for r in answers)
            assert set(codes) == {200, 429}, codes
            refused = next(r for r in answers if r.status_code == 429)
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "overloaded"
            assert call(0).status_code == 200  # and it keeps serving
            assert metric_value(client.get("/metrics").text,
                                "patchcore_rejected_requests_total") == codes.count(429)
    finally:
        stop_server(small)


def test_openapi_documents_every_endpoint(http):
    schema = http.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/products/{product}/predict", "/v1/products", "/v1/products/{product}",
                 "/v1/admin/products/{product}/nominal", "/v1/admin/products/{product}/builds",
                 "/v1/admin/jobs", "/v1/admin/jobs/{job_id}",
                 "/v1/admin/products/{product}/activate", "/v1/admin/products/{product}",
                 "/health/live", "/health/ready", "/metrics"):
        assert path in paths, path
    predict_body = paths["/v1/products/{product}/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "image/jpeg"} <= set(predict_body)
    assert "ErrorResponse" in schema["components"]["schemas"]


def test_framing_through_the_admin_api(http, bottle_job, bottle_train, bottle_defect):
    """A product's framing, false-alarm budget, map smoothing and neighbourhood: set at build, listed,
    applied at predict."""
    refused = http.post("/v1/admin/products/framed/builds", headers=ADMIN,
                        json={"roi": [500, 100, 400, 800]})
    assert refused.status_code == 422, refused.text
    refused = http.post("/v1/admin/products/framed/builds", headers=ADMIN,
                        json={"roi": [0, 0, 10, 10], "centre_crop": 0.5})
    assert refused.status_code == 422, refused.text
    assert upload(http, "framed", bottle_train).status_code == 201
    roi = [250, 200, 650, 700]
    started = http.post("/v1/admin/products/framed/builds", headers=ADMIN,
                        json={"roi": roi, "image_size": 128, "coreset_ratio": 0.1, "false_alarm_rate": 0.001,
                              "map_sigma": 8.0, "patch_size": 5, "stage_dim": 32, "stage_balance": True,
                              "normalisation": "image"})
    assert started.status_code == 202, started.text
    assert started.json()["params"]["framing"] == {"mode": "roi", "fraction": 1.0, "roi": roi, "aspect": "keep"}
    job = wait_job(http, started.json()["id"])
    assert job["state"] == "succeeded", job
    listed = http.get("/v1/products/framed").json()
    assert listed["framing"] == {"mode": "roi", "fraction": 1.0, "roi": roi, "aspect": "keep"}
    assert listed["image_size"] == 128 and listed["false_alarm_rate"] == 0.001 and listed["map_sigma"] == 8.0
    assert listed["patch_size"] == 5 and listed["feature_dim"] == 64  # 32 values from each of 2 stages
    assert listed["stage_balance"] is True and http.get("/v1/products/bottle").json()["stage_balance"] is False
    assert listed["normalisation"] == "image"
    refused = http.post("/v1/admin/products/framed/builds", headers=ADMIN, json={"normalisation": "histogram"})
    assert refused.status_code == 422, refused.text
    response = predict(http, "framed", bottle_defect[0], heatmap="png", regions="true")
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert (result["heatmap"]["width"], result["heatmap"]["height"]) == (900, 900)
    for region in result["regions"]:  # regions lie on the photo, inside the framed box
        box = region["bbox"]
        assert roi[0] - 2 <= box["x"] and box["x"] + box["width"] <= roi[2] + 2
        assert roi[1] - 2 <= box["y"] and box["y"] + box["height"] <= roi[3] + 2
    # The heatmap covers the photo; outside the box it is the colour of a zero score.
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["heatmap"]["data"]))).convert("RGB"))
    zero = colourise(np.zeros((1, 1), np.float32))[0, 0]
    outside = np.ones(heat.shape[:2], dtype=bool)
    outside[roi[1] - 2:roi[3] + 2, roi[0] - 2:roi[2] + 2] = False
    assert (heat[outside] == zero).all()
    assert (heat[roi[1] + 2:roi[3] - 2, roi[0] + 2:roi[2] - 2] != zero).any()
    assert http.delete("/v1/admin/products/framed", headers=ADMIN).status_code in (200, 204)


def test_a_product_stored_behind_the_service_is_listed_as_stored(server, http, tile_bank):
    """A bank another process put in the store (the CLI, another service, a Ray build) is
    listed as `stored` until this process loads it; activating a version serves it."""
    from app.storage import LocalBankStore

    version = str(LocalBankStore(server.state.settings.models_dir).save("sideways", tile_bank))
    try:
        listing = http.get("/v1/products").json()
        assert {"name": "sideways", "status": "stored"} in listing["stored"]
        assert "sideways" not in [p["name"] for p in listing["products"] + listing["failed"]]
        assert all(s["name"] not in ("bottle", "demo") for s in listing["stored"])
        detail = http.get("/v1/products/sideways").json()
        assert detail["status"] == "stored" and detail["versions"] == [version]
        assert detail["active_version"] == version

        activated = http.post("/v1/admin/products/sideways/activate", headers=ADMIN, json={"version": version})
        assert activated.status_code == 200, activated.text
        listing = http.get("/v1/products").json()
        assert "sideways" in [p["name"] for p in listing["products"]]
        assert "sideways" not in [s["name"] for s in listing["stored"]]
    finally:
        assert http.delete("/v1/admin/products/sideways", headers=ADMIN).status_code == 204
    assert "sideways" not in str(http.get("/v1/products").json())


def test_image_headers_are_read_off_the_event_loop(http, bottle_job, bottle_good, monkeypatch):
    """PIL parses every chunk before the pixels: a body of millions of empty PNG chunks took
    7 s to probe, and on the event loop that stalled every other request and the probes."""
    import threading

    import app.service.predictor as predictor_module

    threads = []
    real_probe = predictor_module.probe_image
    monkeypatch.setattr(predictor_module, "probe_image",
                        lambda data: threads.append(threading.current_thread()) or real_probe(data))
    answer = predict(http, "bottle", bottle_good[0], heatmap="none")
    assert answer.status_code == 200, answer.text
    assert threads and all(t.name.startswith("prepare") for t in threads), threads  # the CPU pool's
