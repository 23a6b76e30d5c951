from __future__ import annotations

from fastapi import APIRouter, Response

from app.service.deps import StateDep
from app.service.errors import NotReady
from app.service.schemas import ERROR_RESPONSES, Health

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=Health)
async def live() -> Health:
    """The process answers."""
    return Health(status="alive")


@router.get("/health/ready", response_model=Health, responses={503: ERROR_RESPONSES[503]})
async def ready(state: StateDep) -> Health:
    """Backbone loaded, banks loaded, batch worker running; 503 until then."""
    checks = state.checks()
    if not all(checks.values()):
        failing = ", ".join(name for name, ok in checks.items() if not ok)
        detail = f"; startup error: {state.startup_error}" if state.startup_error else ""
        raise NotReady(f"not ready: {failing}{detail}")
    return Health(status="ready", checks=checks)


@router.get("/metrics", include_in_schema=True, response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(state: StateDep) -> Response:
    """Prometheus metrics."""
    state.metrics.set_jobs(state.jobs.counts())
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
