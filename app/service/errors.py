"""Service exceptions and the one table that maps every domain error to an HTTP answer.

Every error leaves the service as {"error": {"code": str, "message": str}}.
"""

from __future__ import annotations

import errno
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import storage
from app.core import errors as core

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base class of errors raised on purpose by the service layer."""


class ProductNotFound(ServiceError):
    pass


class ProductUnavailable(ServiceError):
    """The product exists on disk but its bank failed to load."""


class VersionNotFound(ServiceError):
    pass


class JobNotFound(ServiceError):
    pass


class JobConflict(ServiceError):
    """A build for the product is already queued or running, or the job is finished."""


class EmptyBody(ServiceError):
    pass


class PayloadTooLarge(ServiceError):
    pass


class TooManyImages(ServiceError):
    pass


class UnsupportedMediaType(ServiceError):
    pass


class InvalidUpload(ServiceError):
    """A staging upload was refused: unsafe zip, link, traversal, or not an image."""


class NoNominalImages(ServiceError):
    pass


class Unauthorized(ServiceError):
    pass


class Forbidden(ServiceError):
    pass


class Overloaded(ServiceError):
    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimedOut(ServiceError):
    pass


class NotReady(ServiceError):
    pass


class ClientGone(ServiceError):
    """The client disconnected before its images were computed."""


class InsufficientStorage(ServiceError):
    """The disk (or the store) is full; nothing half-written was left behind."""


class RequestBodyTimeout(ServiceError):
    """The client stopped sending its body (slow-body guard)."""


class InvalidBuildRequest(ServiceError):
    """Build parameters that do not fit together (e.g. a backbone for an append build)."""


class RecentImageNotFound(ServiceError):
    """No image of that prediction is kept (unknown or expired request id, or not flagged)."""


class RecentImageAmbiguous(ServiceError):
    """The request id named more than one prediction's image (ids are the client's to choose)."""


class RecentImageIndexNeeded(ServiceError):
    """The request flagged several images and the feedback did not say which one."""


class TooFewImages(ServiceError):
    """A build needs more nominal images than were staged."""


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


# Exception class -> (HTTP status, stable error code). Looked up along the MRO,
# so a subclass maps like its nearest listed parent.
ERROR_TABLE: dict[type[Exception], tuple[int, str]] = {
    ProductNotFound: (404, "product_not_found"),
    ProductUnavailable: (503, "product_unavailable"),
    VersionNotFound: (404, "version_not_found"),
    JobNotFound: (404, "job_not_found"),
    JobConflict: (409, "job_conflict"),
    EmptyBody: (400, "empty_body"),
    PayloadTooLarge: (413, "payload_too_large"),
    TooManyImages: (413, "too_many_images"),
    UnsupportedMediaType: (415, "unsupported_media_type"),
    InvalidUpload: (400, "invalid_upload"),
    NoNominalImages: (409, "no_nominal_images"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    Overloaded: (429, "overloaded"),
    RequestTimedOut: (504, "timeout"),
    NotReady: (503, "not_ready"),
    ClientGone: (499, "client_closed_request"),
    InsufficientStorage: (507, "insufficient_storage"),
    RequestBodyTimeout: (408, "request_timeout"),
    TooFewImages: (422, "not_enough_images"),
    InvalidBuildRequest: (422, "invalid_build_request"),
    RecentImageNotFound: (404, "recent_image_not_found"),
    RecentImageAmbiguous: (409, "request_id_reused"),
    RecentImageIndexNeeded: (422, "index_required"),
    storage.VersionNotFound: (404, "version_not_found"),
    storage.ProductNotFound: (404, "product_not_found"),
    storage.InvalidProductName: (422, "invalid_product_name"),
    storage.InvalidName: (422, "invalid_name"),
    storage.NoActiveVersion: (409, "no_active_version"),
    storage.ActivationConflict: (409, "activation_conflict"),
    storage.VersionInUse: (409, "version_in_use"),
    storage.InsufficientStorage: (507, "insufficient_storage"),
    storage.StoreUnavailable: (503, "store_unavailable"),
    # The operator repairs it by activating a version: a state to fix, not a server fault.
    storage.BrokenActivePointer: (409, "broken_active_pointer"),
    storage.StoreError: (500, "store_error"),
    core.InvalidImage: (400, "invalid_image"),
    core.ImageTooLarge: (413, "image_too_large"),
    core.NotEnoughImages: (422, "not_enough_images"),
    core.UnknownBackbone: (422, "unknown_backbone"),
    core.BackboneUnavailable: (503, "backbone_unavailable"),
    core.BankCorrupt: (500, "bank_corrupt"),
    core.BankIncompatible: (500, "bank_incompatible"),
    core.BuildCancelled: (409, "build_cancelled"),
    core.PatchCoreError: (500, "engine_error"),
}

_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "validation_error", 429: "overloaded", 500: "internal_error", 503: "unavailable",
    507: "insufficient_storage",
}


def status_and_code(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return 507, "insufficient_storage"
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return 500, "internal_error"


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def response_for(exc: Exception) -> JSONResponse:
    status, code = status_and_code(exc)
    headers = None
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    message = str(exc) or code.replace("_", " ")
    if status >= 500 and code == "internal_error":
        message = "internal server error"
    elif code == "insufficient_storage" and isinstance(exc, OSError):
        message = "the server's storage is full; nothing was written, try again later"
    return error_response(status, code, message, headers)


def install_error_handlers(app: FastAPI) -> None:
    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        status, code = status_and_code(exc)
        if status == 500:
            logger.error("request failed: %s", exc, exc_info=exc)
        elif status >= 500:
            logger.warning("%s: %s", code, exc)
        return response_for(exc)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, StarletteHTTPException):  # pragma: no cover - registration guard
            raise exc
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, RequestValidationError):  # pragma: no cover
            raise exc
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(422, "validation_error", "; ".join(parts) or "invalid request")

    app.add_exception_handler(ServiceError, domain_error)
    app.add_exception_handler(core.PatchCoreError, domain_error)
    app.add_exception_handler(storage.InvalidName, domain_error)
    app.add_exception_handler(storage.ProductNotFound, domain_error)
    app.add_exception_handler(OSError, domain_error)
    app.add_exception_handler(storage.StoreError, domain_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


class UnhandledErrorMiddleware:
    """The innermost middleware: an unexpected exception becomes a 500 answer here,
    logged once, and is not raised on, so uvicorn keeps the connection (and every
    other request) alive. Starlette's own fallback re-raises after answering."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            logger.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
            if started:  # nothing sane can be sent any more
                raise
            await error_response(500, "internal_error", "internal server error")(
                scope, receive, send)
