"""Admin API key: 401 without, 403 wrong, constant-time accepted via X-API-Key or Bearer;
closed when no key is configured unless development mode opens it."""

from __future__ import annotations

import pytest

from .conftest import ADMIN_KEY, start_server, stop_server, test_settings

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("headers,status,code", [
    ({}, 401, "unauthorized"),
    ({"X-API-Key": "wrong-key-wrong-key-wrong"}, 403, "forbidden"),
    ({"Authorization": f"Basic {ADMIN_KEY}"}, 401, "unauthorized"),
    ({"Authorization": "Bearer wrong-key-wrong-key"}, 403, "forbidden"),
    ({"X-API-Key": ADMIN_KEY}, 200, None),
    ({"Authorization": f"Bearer {ADMIN_KEY}"}, 200, None),
])
def test_admin_key(http, headers, status, code):
    response = http.get("/v1/admin/jobs", headers=headers)
    assert response.status_code == status
    if code:
        assert response.json()["error"]["code"] == code
    for method, path in (("POST", "/v1/admin/products/x/builds"),
                         ("DELETE", "/v1/admin/products/x"),
                         ("GET", "/v1/admin/products/x/nominal")):
        if status != 200:
            assert http.request(method, path, headers=headers).status_code == status


def test_no_key_configured_keeps_admin_closed(tmp_path):
    live = start_server(test_settings(tmp_path, admin_api_key=None))
    try:
        with live.client() as client:
            response = client.get("/v1/admin/jobs", headers={"X-API-Key": "anything-at-all"})
            assert response.status_code == 403
            assert "disabled" in response.json()["error"]["message"]
            assert client.get("/v1/products").status_code == 200
    finally:
        stop_server(live)


def test_development_setting_opens_admin(tmp_path):
    settings = test_settings(tmp_path, admin_api_key=None, dev_open_admin=True,
                             environment="development")
    live = start_server(settings)
    try:
        with live.client() as client:
            assert client.get("/v1/admin/jobs").status_code == 200
    finally:
        stop_server(live)
