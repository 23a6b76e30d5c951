"""The FastAPI app factory, its lifespan, and `serve()` for `python -m app serve`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import app as app_package
from app.service.errors import install_error_handlers
from app.service.limits import BodySizeLimitMiddleware
from app.service.logging import RequestContextMiddleware, configure_logging
from app.service.routes import admin, health, predict, products
from app.service.settings import Settings, get_settings
from app.service.state import ServiceState

DESCRIPTION = """PatchCore anomaly detection for factory visual inspection.

Every error answers `{"error": {"code": "...", "message": "..."}}`. Admin routes
need `X-API-Key` (or `Authorization: Bearer`)."""


def create_app(settings: Settings | None = None, *, state: ServiceState | None = None) -> FastAPI:
    """Build the app. Heavy work (backbone, banks, batch worker) starts in the lifespan."""
    settings = settings or get_settings()
    state = state or ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            state.stop()

    application = FastAPI(title="PatchCore inspection service", version=app_package.__version__,
                          description=DESCRIPTION, lifespan=lifespan)
    application.state.service = state
    install_error_handlers(application)
    for router in (predict.router, products.router, admin.router, health.router):
        application.include_router(router)
    # Added last = outermost: ids and metrics cover every answer, 413s included.
    application.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    application.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    return application


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the service on uvicorn until interrupted."""
    import uvicorn

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False,
                timeout_graceful_shutdown=10)
