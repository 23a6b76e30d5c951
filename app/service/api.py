"""The FastAPI app factory, its lifespan, and `serve()` for `python -m app serve`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import app as app_package
from app.service.errors import install_error_handlers
from app.service.limits import BodySizeLimitMiddleware
from app.service.logging import RequestContextMiddleware, configure_logging
from app.service.registry import EmbedderFactory
from app.service.resources import JobsFactory, Resources
from app.service.routes import admin, health, predict, products
from app.service.settings import Settings, get_settings
from app.storage import BankStore

DESCRIPTION = """PatchCore anomaly detection for factory visual inspection.

Every error answers `{"error": {"code": "...", "message": "..."}}`. Admin routes
need `X-API-Key` (or `Authorization: Bearer`)."""


def create_app(settings: Settings | None = None, *, store: BankStore | None = None,
               embedder_factory: EmbedderFactory | None = None,
               jobs_factory: JobsFactory | None = None) -> FastAPI:
    """Build the app. Nothing heavy here: the resources are opened in the lifespan.

    `store`, `embedder_factory` and `jobs_factory` replace the defaults (another bank store,
    a test embedder, builds run elsewhere: app.cluster runs them as Ray tasks).
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[None]:
        resources = Resources.open(settings, store=store, embedder_factory=embedder_factory,
                                   jobs_factory=jobs_factory)
        application.state.resources = resources
        try:
            yield
        finally:
            resources.close()

    application = FastAPI(title="PatchCore inspection service", version=app_package.__version__,
                          description=DESCRIPTION, lifespan=lifespan)
    application.state.settings = settings
    application.state.resources = None
    install_error_handlers(application)
    for router in (predict.router, products.router, admin.router, health.router):
        application.include_router(router)
    # Added last = outermost: ids and metrics cover every answer, 413s included.
    application.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    application.add_middleware(RequestContextMiddleware)
    return application


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the service on uvicorn until interrupted."""
    import uvicorn

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False,
                timeout_graceful_shutdown=10)
