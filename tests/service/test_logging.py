from __future__ import annotations

import json
import logging

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
