"""The FastAPI app factory, its lifespan, and `serve()` for `python -m app serve`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import app as app_package
from app.service import console
from app.service.auth import AdminAuthMiddleware
from app.service.errors import UnhandledErrorMiddleware, install_error_handlers
from app.service.limits import BodySizeLimitMiddleware
from app.service.logging import RequestContextMiddleware, configure_logging
from app.service.registry import EmbedderFactory
from app.service.resources import FlaggedFactory, JobsFactory, Resources
from app.service.routes import admin, health, predict, products
from app.service.settings import Settings, get_settings
from app.storage import BankStore

DESCRIPTION = """PatchCore anomaly detection for factory visual inspection.

Every error answers `{"error": {"code": "...", "message": "..."}}`. Admin routes
need `X-API-Key` (or `Authorization: Bearer`)."""


def create_app(settings: Settings | None = None, *, store: BankStore | None = None,
               embedder_factory: EmbedderFactory | None = None,
               jobs_factory: JobsFactory | None = None,
               flagged_factory: FlaggedFactory | None = None) -> FastAPI:
    """Build the app. Nothing heavy here: the resources are opened in the lifespan.

    `store`, `embedder_factory`, `jobs_factory` and `flagged_factory` replace the defaults
    (another bank store, a test embedder, builds run elsewhere: app.cluster runs them as Ray
    tasks; flagged images kept for all replicas in one place).
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[None]:
        resources = Resources.open(settings, store=store, embedder_factory=embedder_factory,
                                   jobs_factory=jobs_factory, flagged_factory=flagged_factory)
        application.state.resources = resources
        try:
            yield
        finally:
            resources.close()

    # /docs is served from the swagger-ui-bundle package, not a CDN: plant networks are
    # often air-gapped. ReDoc has no packaged assets, so it is off.
    application = FastAPI(title="PatchCore inspection service", version=app_package.__version__,
                          description=DESCRIPTION, lifespan=lifespan, docs_url=None,
                          redoc_url=None)
    mount_offline_docs(application)
    application.state.settings = settings
    application.state.resources = None
    install_error_handlers(application)
    for router in (predict.router, products.router, admin.router, health.router):
        application.include_router(router)
    application.include_router(console.router)  # the operator console at /console/
    # Added first = innermost: an unexpected error is answered here without closing
    # the connection. Added last = outermost: ids and metrics cover every answer.
    application.add_middleware(UnhandledErrorMiddleware)
    application.add_middleware(AdminAuthMiddleware, settings=settings)
    application.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes,
                               read_timeout_s=settings.body_read_timeout_s)
    application.add_middleware(RequestContextMiddleware)
    return application


DOCS_ASSETS = "/docs-assets"


def mount_offline_docs(application: FastAPI) -> None:
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    application.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @application.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=application.openapi_url or "/openapi.json",
            title=f"{application.title} - API docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the service on uvicorn until interrupted."""
    import uvicorn

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False,
                timeout_graceful_shutdown=10)
