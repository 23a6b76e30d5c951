from __future__ import annotations

from fastapi import APIRouter, Response

from app.service.deps import MetricsDep, ResourcesDep
from app.service.errors import NotReady
from app.service.schemas import ERROR_RESPONSES, Health

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=Health)
async def live() -> Health:
    """The process answers."""
    return Health(status="alive")


@router.get("/health/ready", response_model=Health, responses={503: ERROR_RESPONSES[503]})
async def ready(resources: ResourcesDep) -> Health:
    """Backbone loaded, banks loaded, batch worker running; 503 until then."""
    checks = resources.checks()
    if not all(checks.values()):
        failing = ", ".join(name for name, ok in checks.items() if not ok)
        error = resources.startup.error
        detail = f"; startup error: {error}" if error else ""
        raise NotReady(f"not ready: {failing}{detail}")
    return Health(status="ready", checks=checks)


@router.get("/metrics", include_in_schema=True, response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(resources: ResourcesDep, metrics: MetricsDep) -> Response:
    """Prometheus metrics."""
    metrics.set_jobs(resources.jobs.counts())
    return Response(metrics.render(), media_type=metrics.content_type)
