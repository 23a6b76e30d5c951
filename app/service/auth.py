"""The admin key: one check, run by a middleware before the request body is read.

Running it as a middleware (not only as a route dependency) means an
unauthenticated caller learns nothing about the body it sent: a malformed
JSON body to an admin route answers 401/403, never 422 first. The route
dependency (`deps.require_admin`) declares the scheme in the OpenAPI schema
and repeats the check for hosts that mount the routers without this middleware.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from app.service.errors import Forbidden, ServiceError, Unauthorized, response_for
from app.service.settings import Settings

ADMIN_PREFIX = "/v1/admin"
KEY_HEADER = "X-API-Key"


def check_admin(settings: Settings, x_api_key: str | None, authorization: str | None) -> None:
    """X-API-Key or Authorization: Bearer, compared in constant time; raises 401/403."""
    presented = x_api_key
    if presented is None and authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            presented = token.strip()
    expected = settings.admin_api_key.get_secret_value() if settings.admin_api_key else None
    if expected is None:
        if settings.admin_open:
            return
        raise Forbidden("the admin API is disabled: no PATCHCORE_ADMIN_API_KEY is configured")
    if not presented:
        raise Unauthorized("admin API key required (X-API-Key or Authorization: Bearer)")
    if not hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode("utf-8")):
        raise Forbidden("wrong admin API key")


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


class AdminAuthMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            headers = scope.get("headers", [])
            try:
                check_admin(self.settings, _header(headers, b"x-api-key"),
                            _header(headers, b"authorization"))
            except ServiceError as exc:
                await response_for(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)
