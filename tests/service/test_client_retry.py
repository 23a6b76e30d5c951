"""The client's retries for predictions: a request lost on the way is sent again, a service error never."""

from __future__ import annotations

import httpx
import pytest

from app.client import PatchCoreAPIError, PatchCoreClient

OK = {"product": "p", "results": [{"raw_score": 1.0}]}


def scripted(*answers):
    """A transport that answers (or fails) in the given order and counts the calls."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        answer = answers[min(len(calls) - 1, len(answers) - 1)]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handler), calls


def test_connection_errors_and_gateway_5xx_are_retried() -> None:
    transport, calls = scripted(httpx.ConnectError("refused"),
                                httpx.Response(500, text="Internal Server Error"),  # Serve's proxy: replica died
                                httpx.Response(503, text="no healthy upstream"),
                                httpx.Response(200, json=OK))
    with PatchCoreClient("http://svc", transport=transport, retries=3) as client:
        assert client.predict("p", b"png")["raw_score"] == 1.0
    assert len(calls) == 4


def test_service_errors_are_not_retried() -> None:
    body = {"error": {"code": "internal_error", "message": "boom"}}
    for status in (500, 503, 422):
        transport, calls = scripted(httpx.Response(status, json=body), httpx.Response(200, json=OK))
        with PatchCoreClient("http://svc", transport=transport, retries=3) as client, \
                pytest.raises(PatchCoreAPIError) as caught:
            client.predict_many("p", [b"png"])
        assert caught.value.status == status and len(calls) == 1


def test_without_retries_the_first_loss_reaches_the_caller() -> None:
    transport, calls = scripted(httpx.ReadError("reset"), httpx.Response(200, json=OK))
    with PatchCoreClient("http://svc", transport=transport) as client, pytest.raises(httpx.ReadError):
        client.predict("p", b"png")
    assert len(calls) == 1


def test_retries_give_up_after_the_limit() -> None:
    transport, calls = scripted(httpx.Response(502, text="bad gateway"))
    with PatchCoreClient("http://svc", transport=transport, retries=2) as client, \
            pytest.raises(PatchCoreAPIError) as caught:
        client.predict("p", b"png")
    assert caught.value.status == 502 and len(calls) == 3


def test_a_negative_retry_count_is_refused_at_once() -> None:
    """range(retries + 1) was empty: no request was sent and the call failed 'unreachable'."""
    from app.client import AsyncPatchCoreClient

    for client in (PatchCoreClient, AsyncPatchCoreClient):
        with pytest.raises(ValueError, match="retries"):
            client("http://127.0.0.1:9", retries=-1)
