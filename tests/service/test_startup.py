"""Startup: every bank under the models directory is loaded; a corrupt one is reported
as failed while the others serve; the demo bank is built on a fresh machine."""

from __future__ import annotations

import pytest

from app.storage import LocalBankStore
from tests.bank_edit import edit_manifest

from .conftest import ADMIN, start_server, stop_server, test_settings

pytestmark = pytest.mark.slow


def _corrupt(folder):
    """Truncate the largest file of the product (the features): a half-written disk."""
    largest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = largest.read_bytes()
    largest.write_bytes(data[: len(data) // 2])


def test_corrupt_bank_is_reported_while_others_serve(tmp_path, tile_bank, tile_test):
    store = LocalBankStore(tmp_path)
    store.save("tile", tile_bank, activate=True)
    broken = store.save("broken", tile_bank, activate=True)
    before = {p for p in (tmp_path / "broken").rglob("*") if p.is_file()}
    assert before, "the store wrote files for the broken product"
    _corrupt(tmp_path / "broken")
    live = start_server(test_settings(tmp_path))
    try:
        with live.client() as http:
            products = http.get("/v1/products").json()
            assert [p["name"] for p in products["products"]] == ["tile"]
            failed = products["failed"]
            assert [f["name"] for f in failed] == ["broken"]
            assert failed[0]["reason"] and failed[0]["status"] == "failed"
            assert failed[0]["version"] in (None, str(broken))
            detail = http.get("/v1/products/broken")
            assert detail.status_code == 200 and detail.json()["status"] == "failed"
            refused = http.post("/v1/products/broken/predict", content=tile_test.read_bytes(),
                                headers={"Content-Type": "image/jpeg"})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "product_unavailable"
            ok = http.post("/v1/products/tile/predict", content=tile_test.read_bytes(),
                           headers={"Content-Type": "image/jpeg"}, params={"heatmap": "none"})
            assert ok.status_code == 200, ok.text
            metrics = http.get("/metrics").text
            assert "patchcore_failed_banks 1.0" in metrics
            # Deleting the broken product clears it.
            assert http.delete("/v1/admin/products/broken", headers=ADMIN).status_code == 204
            assert http.get("/v1/products").json()["failed"] == []
            assert http.get("/v1/products/broken").status_code == 404
    finally:
        stop_server(live)


@pytest.mark.parametrize("change", [{"files": []}, {"calibration": 3}, {"config": None, "lineage": "x"},
                                    {"config": {"top_k": None}}, {"framing": "centre"}])
def test_a_manifest_of_the_wrong_shape_fails_only_its_product(tmp_path, tile_bank, change):
    """Each of these once escaped as an AttributeError or TypeError (or, for a NaN
    threshold, loaded and never flagged); products sorted after it were never loaded."""

    store = LocalBankStore(tmp_path)
    store.save("tile", tile_bank, activate=True)
    for name, edit in (("a-broken", change), ("a-nan", {"calibration": {"threshold": float("nan"),
                                                                          "nominal_median": 1.0}})):
        version = store.save(name, tile_bank, activate=True)
        edit_manifest(tmp_path / name / version, **edit)
    live = start_server(test_settings(tmp_path))
    try:
        with live.client() as http:
            products = http.get("/v1/products").json()
            assert [p["name"] for p in products["products"]] == ["tile"], products
            assert sorted(f["name"] for f in products["failed"]) == ["a-broken", "a-nan"], products
    finally:
        stop_server(live)


def test_demo_bank_is_built_on_a_fresh_machine_and_kept(tmp_path):
    demo = pytest.importorskip("app.demo", reason="app.demo (demo images) is not installed")
    live = start_server(test_settings(tmp_path, demo=True))
    try:
        with live.client() as http:
            demo_product = http.get("/v1/products/demo").json()
            assert demo_product["status"] == "loaded"
            defect = demo.demo_defect_images()[0]
            result = http.post("/v1/products/demo/predict", content=defect.read_bytes(),
                               headers={"Content-Type": "image/png"},
                               params={"heatmap": "none"}).json()["results"][0]
            assert result["is_anomalous"]
            jobs = http.get("/v1/admin/jobs", headers=ADMIN).json()["jobs"]
            assert [(j["product"], j["source"], j["state"]) for j in jobs] == [
                ("demo", "demo", "succeeded")]
    finally:
        stop_server(live)
    # A restart finds the demo bank on disk and does not build it again.
    again = start_server(test_settings(tmp_path, demo=True))
    try:
        with again.client() as http:
            # The job records persist; no second build was started.
            again_jobs = http.get("/v1/admin/jobs", headers=ADMIN).json()["jobs"]
            assert [(j["id"], j["state"]) for j in again_jobs] == [(jobs[0]["id"], "succeeded")]
            assert http.get("/v1/products/demo").json()["version"] == demo_product["version"]
    finally:
        stop_server(again)


def test_failed_products_report_no_server_paths(tmp_path, tile_bank):
    store = LocalBankStore(tmp_path)
    store.save("broken", tile_bank, activate=True)
    _corrupt(tmp_path / "broken")
    live = start_server(test_settings(tmp_path))
    try:
        with live.client() as http:
            listing = http.get("/v1/products").text  # no key needed: must not leak the disk layout
            assert str(tmp_path) not in listing and "/tmp" not in listing, listing
            (failed,) = http.get("/v1/products").json()["failed"]
            assert "version" not in failed or failed["version"], failed  # never null
            refused = http.post("/v1/products/broken/predict", content=b"x",
                                headers={"Content-Type": "image/png"})
            assert refused.status_code == 503 and "/tmp" not in refused.text
    finally:
        stop_server(live)
