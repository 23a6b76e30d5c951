"""Every bad input gets a clear 4xx in the stable error shape, and the server keeps serving."""

from __future__ import annotations

import os

import numpy as np
import pytest

from .conftest import ADMIN, png_bytes

pytestmark = pytest.mark.slow


def _bomb() -> bytes:
    # 3000 x 3000 = 9 Mpx, over the test server's 2 Mpx limit, but a few KB of PNG.
    return png_bytes(np.zeros((3000, 3000, 3), dtype=np.uint8))


def _image(seed: int = 0) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


CASES = {
    "not an image": ("bottle", b"this is not an image", "image/png", 400, "invalid_image"),
    "truncated image": ("bottle", None, "image/png", 400, "invalid_image"),
    "decompression bomb": ("bottle", "bomb", "image/png", 413, "image_too_large"),
    "empty body": ("bottle", b"", "image/png", 400, "empty_body"),
    "over the upload limit": ("bottle", "huge", "image/png", 413, "payload_too_large"),
    "unknown product": ("nosuchproduct", "ok", "image/png", 404, "product_not_found"),
    "upper-case product name": ("Bottle", "ok", "image/png", 422, "invalid_product_name"),
    "product name starting with a dash": ("-bottle", "ok", "image/png", 422,
                                          "invalid_product_name"),
    "product name too long": ("a" * 65, "ok", "image/png", 422, "invalid_product_name"),
    "unsupported content type": ("bottle", "ok", "text/plain", 415, "unsupported_media_type"),
    "json body": ("bottle", b'{"image": "x"}', "application/json", 415,
                  "unsupported_media_type"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_predict_input(http, bottle_job, bottle_good, case):
    product, body, content_type, status, code = CASES[case]
    if body is None:
        whole = bottle_good[0].read_bytes()
        body = whole[: len(whole) // 2]
    elif body == "bomb":
        body = _bomb()
    elif body == "huge":
        body = os.urandom(5 * 1024 * 1024)
    elif body == "ok":
        body = bottle_good[0].read_bytes()
    response = http.post(f"/v1/products/{product}/predict", content=body,
                         headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    _still_serving(http, bottle_good)


def test_too_many_images_in_one_request(http, server, bottle_job, bottle_good):
    limit = server.state.settings.max_images_per_request
    files = [("files", (f"{i}.png", _image(i), "image/png")) for i in range(limit + 1)]
    response = http.post("/v1/products/bottle/predict", files=files)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_images"
    _still_serving(http, bottle_good)


def test_chunked_body_over_the_limit(http, bottle_job, bottle_good):
    def chunks():
        for _ in range(6):
            yield os.urandom(1024 * 1024)

    response = http.post("/v1/products/bottle/predict", content=chunks(),
                         headers={"Content-Type": "image/png"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    _still_serving(http, bottle_good)


def test_one_bad_file_among_good_ones_names_it(http, bottle_job, bottle_good):
    files = [("files", ("good.png", bottle_good[0].read_bytes(), "image/png")),
             ("files", ("broken.png", b"\x89PNG\r\n\x1a\nnope", "image/png"))]
    response = http.post("/v1/products/bottle/predict", files=files)
    assert response.status_code == 400
    assert "broken.png" in response.json()["error"]["message"]
    _still_serving(http, bottle_good)


def test_bad_query_and_unknown_route(http, bottle_job, bottle_good):
    bad = http.post("/v1/products/bottle/predict", params={"heatmap": "gif"},
                    content=bottle_good[0].read_bytes(), headers={"Content-Type": "image/png"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"
    missing = http.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_bad_admin_input(http, bottle_job, bottle_good):
    not_image = http.post("/v1/admin/products/bottle/nominal", headers=ADMIN,
                          files=[("files", ("a.txt", b"hello", "text/plain"))])
    assert not_image.status_code == 400 and not_image.json()["error"]["code"] == "invalid_upload"
    bad_ratio = http.post("/v1/admin/products/bottle/builds", headers=ADMIN,
                          json={"coreset_ratio": 2})
    assert bad_ratio.status_code == 422
    bad_backbone = http.post("/v1/admin/products/bottle/builds", headers=ADMIN,
                             json={"backbone": "no-such-net"})
    assert bad_backbone.status_code == 422, bad_backbone.text
    assert bad_backbone.json()["error"]["code"] == "unknown_backbone"
    no_version = http.post("/v1/admin/products/bottle/activate", headers=ADMIN,
                           json={"version": "v-does-not-exist"})
    assert no_version.status_code == 404
    assert no_version.json()["error"]["code"] == "version_not_found"
    gone = http.delete("/v1/admin/products/nosuchproduct", headers=ADMIN)
    assert gone.status_code == 404
    _still_serving(http, bottle_good)


def _still_serving(http, bottle_good):
    assert http.get("/health/live").status_code == 200
    ok = http.post("/v1/products/bottle/predict", content=bottle_good[0].read_bytes(),
                   headers={"Content-Type": "image/png"}, params={"heatmap": "none"})
    assert ok.status_code == 200, ok.text
