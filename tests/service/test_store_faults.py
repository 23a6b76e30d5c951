"""The service over a store in trouble: a read that fails as unavailable at start, a broken
or missing active pointer (stop 20 review)."""

from __future__ import annotations

import pytest

from app.storage import LocalBankStore, StoreUnavailable

from .conftest import ADMIN, start_server, stop_server, test_settings, upload

pytestmark = pytest.mark.slow


def _listing_when_reads_fail(tmp_path, monkeypatch, fails) -> dict:
    """The product listing of a server started on `tmp_path` while the store's bank reads raise
    StoreUnavailable whenever `fails(product)` says so."""
    load = LocalBankStore.load

    def flaky(self, product, version=None):
        if fails(product):
            raise StoreUnavailable("read timed out")
        return load(self, product, version)

    monkeypatch.setattr(LocalBankStore, "load", flaky)
    live = start_server(test_settings(tmp_path))
    try:
        with live.client() as http:
            return http.get("/v1/products").json()
    finally:
        stop_server(live)


def test_a_bank_read_that_fails_as_unavailable_at_start_is_retried(tmp_path, tile_bank, monkeypatch):
    """One timed-out read while the banks load used to fail the product for good (ready, but
    503 for it until a restart)."""
    LocalBankStore(tmp_path).save("tile", tile_bank, activate=True)
    calls: list[str] = []

    def first_read_fails(product: str) -> bool:
        calls.append(product)
        return len(calls) == 1

    listed = _listing_when_reads_fail(tmp_path, monkeypatch, first_read_fails)
    assert [p["name"] for p in listed["products"]] == ["tile"] and listed["failed"] == []
    assert len(calls) >= 2


def test_a_read_that_stays_unavailable_fails_only_its_product(tmp_path, tile_bank, monkeypatch):
    """Bounded: a bank that can never be read is recorded as failed after a few tries, and the
    service becomes ready with the others."""
    store = LocalBankStore(tmp_path)
    store.save("tile", tile_bank, activate=True)
    store.save("stuck", tile_bank, activate=True)
    listed = _listing_when_reads_fail(tmp_path, monkeypatch, lambda product: product == "stuck")
    assert [p["name"] for p in listed["products"]] == ["tile"]
    assert [(f["name"], f["error_code"]) for f in listed["failed"]] == [("stuck", "store_unavailable")]


def test_a_broken_or_missing_pointer_lists_the_versions_and_refuses_an_append(tmp_path, tile_bank, tile_train):
    store = LocalBankStore(tmp_path)
    first = store.save("widget", tile_bank, activate=True)
    second = store.save("widget", tile_bank, activate=False)
    (tmp_path / "widget" / "ACTIVE").write_text("oops\n")
    unpointed = store.save("loose", tile_bank, activate=False)
    live = start_server(test_settings(tmp_path))
    try:
        with live.client() as http:
            # The versions are what an operator needs to repair the pointer.
            detail = http.get("/v1/products/widget").json()
            assert detail["status"] == "failed" and detail["versions"] == sorted([first, second])
            assert detail.get("active_version") is None
            for product, code in (("widget", "broken_active_pointer"), ("loose", "no_active_version")):
                assert upload(http, product, tile_train[:2]).status_code == 201
                refused = http.post(f"/v1/admin/products/{product}/builds", headers=ADMIN, json={"mode": "append"})
                assert refused.status_code == 409, refused.text
                assert refused.json()["error"]["code"] == code
            assert http.get("/v1/products/loose").json()["versions"] == [unpointed]
            # Activating a version repairs it.
            assert http.post("/v1/admin/products/widget/activate", headers=ADMIN,
                             json={"version": second}).status_code == 200
            repaired = http.get("/v1/products/widget").json()
            assert (repaired["status"], repaired["version"]) == ("loaded", second), repaired
    finally:
        stop_server(live)
