"""Request body limits, enforced before anything is buffered: size (413 early) and
a read deadline per chunk (408), so a slow client cannot hold a worker for ever."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.service.errors import PayloadTooLarge, RequestBodyTimeout, error_response


class _TooLarge(PayloadTooLarge):
    """Raised from receive() when a streamed body passes the limit."""


class BodySizeLimitMiddleware:
    """Refuses bodies over `max_bytes`: at once from Content-Length, or while
    streaming a chunked body, before the route has buffered more than the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._refuse(scope, receive, send)
                    return
        received = 0
        started = False
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done or self.read_timeout_s is None:
                # After the body only a disconnect can come: wait for it as long as it takes.
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.read_timeout_s)
                except TimeoutError:
                    raise RequestBodyTimeout(
                        f"no part of the request body arrived for {self.read_timeout_s:g} s"
                    ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit_mb = self.max_bytes / (1024 * 1024)
        response = error_response(413, "payload_too_large",
                                  f"request body is larger than the limit of {limit_mb:g} MB",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)
