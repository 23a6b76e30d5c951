from __future__ import annotations

import json
import logging
import time

from app.service.logging import JsonFormatter, RequestIdFilter, request_id_var


def test_json_log_line_carries_request_id_and_extras():
    token = request_id_var.set("req-123")
    try:
        record = logging.LogRecord("app.test", logging.INFO, __file__, 1, "scored %s", ("x",),
                                   None)
        record.product = "bottle"
        RequestIdFilter().filter(record)
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["message"] == "scored x" and line["request_id"] == "req-123"
    assert line["product"] == "bottle" and line["level"] == "INFO"


def test_a_path_cannot_forge_a_line_in_the_text_access_log(server, caplog):
    """A percent-encoded newline in the path wrote a second, real-looking log line."""
    import httpx

    forged = "x%0a2026-12-01 00:00:00,000 INFO app.service.catalog deleted product bottle"

    def access_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == "app.service.access" and "deleted" in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="app.service.access"), httpx.Client(base_url=server.url) as http:
        assert http.get(f"/v1/products/{forged}").status_code in (404, 422)
        # The middleware writes the access line after the last byte is sent, so the client can
        # hold the response before the server thread has logged it (CI caught that race).
        deadline = time.monotonic() + 10
        while not access_lines() and time.monotonic() < deadline:
            time.sleep(0.02)
    lines = access_lines()
    assert lines and all("\n" not in line for line in lines) and "\\n2026" in lines[0]
