"""Append builds and false-alarm feedback through real HTTP (issue 11), on real bottle images.

Its own product ("bottle-append"), so the session's "bottle" bank stays as the other tests expect.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import ADMIN, png_bytes, upload, wait_job

PRODUCT = "bottle-append"
BASE = f"/v1/admin/products/{PRODUCT}"


def _staged(http) -> int:
    return http.get(f"{BASE}/nominal", headers=ADMIN).json()["count"]


def _build(http, body: dict) -> dict:
    response = http.post(f"{BASE}/builds", headers=ADMIN, json=body)
    assert response.status_code == 202, response.text
    return wait_job(http, response.json()["id"])


@pytest.fixture(scope="module")
def base_version(http, bottle_train) -> str:
    assert upload(http, PRODUCT, bottle_train[:6]).status_code == 201
    job = _build(http, {"coreset_ratio": 0.1, "seed": 0})
    assert job["state"] == "succeeded", job
    return job["version"]


def test_append_requests_that_cannot_work(http, base_version):
    wrong = http.post(f"{BASE}/builds", headers=ADMIN, json={"mode": "append", "base_version": "nope"})
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "version_not_found"
    backbone = http.post(f"{BASE}/builds", headers=ADMIN,
                         json={"mode": "append", "backbone": "efficientnet_lite1"})
    assert backbone.status_code == 422 and backbone.json()["error"]["code"] == "invalid_build_request"
    # What the base was built and calibrated with is refused by name, never ignored.
    for option in ({"image_size": 320}, {"patch_size": 5}, {"stage_dim": 32}, {"centre_crop": 0.875},
                   {"aspect": "squeeze"}, {"aspect": "keep"},
                   {"false_alarm_rate": 0.001}, {"map_sigma": 8.0}, {"stage_balance": False},
                   {"normalisation": "image"}):
        kept = http.post(f"{BASE}/builds", headers=ADMIN, json={"mode": "append", **option})
        assert kept.status_code == 422 and kept.json()["error"]["code"] == "invalid_build_request", kept.text
        name = next(iter(option))
        assert name in kept.json()["error"]["message"], kept.text
    missing = http.post("/v1/admin/products/never-built/nominal", headers=ADMIN,
                        files=[("files", ("a.png", png_bytes(np.zeros((64, 64, 3), np.uint8)), "image/png"))])
    assert missing.status_code == 201
    none = http.post("/v1/admin/products/never-built/builds", headers=ADMIN, json={"mode": "append"})
    assert none.status_code == 404 and none.json()["error"]["code"] == "product_not_found"
    http.delete("/v1/admin/products/never-built/nominal", headers=ADMIN)


def test_append_flow_versions_rollback_and_delete(http, server, base_version, bottle_train, bottle_good):
    # Everything staged is already in the base: nothing to append, refused at submit.
    nothing = http.post(f"{BASE}/builds", headers=ADMIN, json={"mode": "append"})
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "no_nominal_images", nothing.text

    assert upload(http, PRODUCT, bottle_train[6:8]).status_code == 201
    job = _build(http, {"mode": "append"})
    assert job["state"] == "succeeded", job
    assert job["params"]["mode"] == "append" and job["params"]["base_version"] == base_version
    assert job["image_count"] == 2 and job["progress"] == 100.0
    assert {"features", "coreset", "calibration"} <= set(job["timings_s"]["phases"])
    appended = job["version"]

    info = http.get(f"/v1/products/{PRODUCT}").json()
    assert info["version"] == info["active_version"] == appended
    assert set(info["versions"]) == {base_version, appended}
    root = server.state.settings.models_dir / PRODUCT
    manifest = json.loads((root / appended / "manifest.json").read_text())
    base_manifest = json.loads((root / base_version / "manifest.json").read_text())
    assert manifest["lineage"]["base_versions"] == [base_version]
    assert manifest["lineage"]["images"] == 8 and len(manifest["lineage"]["image_ids"]) == 8
    assert manifest["bank_size"] > base_manifest["bank_size"]
    assert manifest["calibration"]["threshold"] != base_manifest["calibration"]["threshold"]

    image = bottle_good[0].read_bytes()
    scored = http.post(f"/v1/products/{PRODUCT}/predict", content=image,
                       headers={"Content-Type": "image/png"}, params={"heatmap": "none"})
    assert scored.status_code == 200 and scored.json()["results"][0]["bank_version"] == appended

    # Roll back to the base, then forward again: append versions are ordinary versions.
    rolled = http.post(f"{BASE}/activate", headers=ADMIN, json={"version": base_version})
    assert rolled.status_code == 200 and rolled.json()["version"] == base_version
    scored = http.post(f"/v1/products/{PRODUCT}/predict", content=image,
                       headers={"Content-Type": "image/png"}, params={"heatmap": "none"})
    assert scored.json()["results"][0]["bank_version"] == base_version

    # An explicit base (not the active one) and the radius rule; the new staged images only.
    assert upload(http, PRODUCT, bottle_train[8:9]).status_code == 201
    job = _build(http, {"mode": "append", "base_version": appended, "until": "radius", "activate": False})
    assert job["state"] == "succeeded", job
    assert job["params"]["base_version"] == appended and job["image_count"] == 1
    third = json.loads((root / job["version"] / "manifest.json").read_text())
    assert third["lineage"]["base_versions"] == [appended, base_version]
    assert http.get(f"/v1/products/{PRODUCT}").json()["version"] == base_version  # not activated

    assert http.delete(f"/v1/admin/products/{PRODUCT}", headers=ADMIN).status_code == 204
    assert http.get(f"/v1/products/{PRODUCT}").status_code == 404


def test_feedback_is_admin_only_and_stages_only_valid_images(http, bottle_good, bottle_defect):
    # Its own product, so that the append-flow test's delete does not race it.
    product = "bottle-feedback"
    images = sorted(bottle_good[0].parent.parent.parent.joinpath("train", "good").glob("*.png"))[:6]
    assert upload(http, product, images).status_code == 201
    response = http.post(f"/v1/admin/products/{product}/builds", headers=ADMIN, json={"coreset_ratio": 0.1})
    assert wait_job(http, response.json()["id"])["state"] == "succeeded"
    feedback = f"/v1/admin/products/{product}/feedback"
    staged = http.get(f"/v1/admin/products/{product}/nominal", headers=ADMIN).json()["count"]
    good = bottle_good[1].read_bytes()

    assert http.post(feedback, content=good, headers={"Content-Type": "image/png"}).status_code == 401
    assert http.post(feedback, content=good, headers={"Content-Type": "image/png",
                                                      "X-API-Key": "wrong-key-wrong-key-wrong"}).status_code == 403
    broken = http.post(feedback, content=good[: len(good) // 3], headers={**ADMIN, "Content-Type": "image/png"})
    assert broken.status_code == 400, broken.text
    junk = http.post(feedback, content=b"not an image at all", headers={**ADMIN, "Content-Type": "image/png"})
    assert junk.status_code == 400
    mixed = http.post(feedback, headers=ADMIN, files=[("files", ("ok.png", good, "image/png")),
                                                      ("files", ("bad.png", b"\x89PNG broken", "image/png"))])
    assert mixed.status_code == 400  # all or nothing
    count = lambda: http.get(f"/v1/admin/products/{product}/nominal", headers=ADMIN).json()["count"]  # noqa: E731
    assert count() == staged

    added = http.post(feedback, content=good, headers={**ADMIN, "Content-Type": "image/png"})
    assert added.status_code == 201, added.text
    assert added.json() == {"product": product, "added": 1, "count": staged + 1, "source": "upload"}
    again = http.post(feedback, content=good, headers={**ADMIN, "Content-Type": "image/png"})
    assert again.json()["added"] == 0  # same content, staged once

    # By request id: a flagged prediction's image is kept (bounded) and can be staged.
    flagged = http.post(f"/v1/products/{product}/predict", content=bottle_defect[0].read_bytes(),
                        headers={"Content-Type": "image/png", "X-Request-ID": "feedback-test-1"},
                        params={"heatmap": "none"})
    assert flagged.status_code == 200 and flagged.json()["results"][0]["is_anomalous"]
    by_id = http.post(feedback, headers=ADMIN, json={"request_id": "feedback-test-1"})
    assert by_id.status_code == 201, by_id.text
    assert by_id.json()["source"] == "recent" and by_id.json()["count"] == staged + 2
    unknown = http.post(feedback, headers=ADMIN, json={"request_id": "never-seen"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "recent_image_not_found"
    other = http.post("/v1/admin/products/bottle-append/feedback", headers=ADMIN,
                      json={"request_id": "feedback-test-1"})
    assert other.status_code == 404
    assert http.post(feedback, headers=ADMIN, json={"index": 0}).status_code == 400
    # The client chooses X-Request-ID: a second flagged image under the same id (another
    # camera's, or a planted one) makes the id ambiguous, and neither image is staged.
    flagged_under_one_id = 0
    for path in sorted(bottle_defect[0].parent.glob("*.png"))[1:]:
        reused = http.post(f"/v1/products/{product}/predict", content=path.read_bytes(), params={"heatmap": "none"},
                           headers={"Content-Type": "image/png", "X-Request-ID": "feedback-test-2"})
        flagged_under_one_id += reused.json()["results"][0]["is_anomalous"]
        if flagged_under_one_id == 2:
            break
    assert flagged_under_one_id == 2
    ambiguous = http.post(feedback, headers=ADMIN, json={"request_id": "feedback-test-2"})
    assert ambiguous.status_code == 409 and ambiguous.json()["error"]["code"] == "request_id_reused"
    assert count() == staged + 2
    assert http.post("/v1/admin/products/no-such-product/feedback", content=good,
                     headers={**ADMIN, "Content-Type": "image/png"}).status_code == 404

    # The staged feedback is what the next append build adds.
    response = http.post(f"/v1/admin/products/{product}/builds", headers=ADMIN, json={"mode": "append"})
    job = wait_job(http, response.json()["id"])
    assert job["state"] == "succeeded" and job["image_count"] == 2, job
    assert http.delete(f"/v1/admin/products/{product}", headers=ADMIN).status_code == 204
