"""Dependencies of the routes, as Annotated aliases: each resource has its own.

All are `async def`: they only read attributes, and FastAPI runs a plain `def`
dependency in the thread pool, a hop per dependency per request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Path, Request, Security
from fastapi.security import APIKeyHeader

from app.service.auth import KEY_HEADER, check_admin
from app.service.catalog import ProductCatalog
from app.service.errors import NotReady
from app.service.jobs import JobRunner
from app.service.metrics import ServiceMetrics
from app.service.predictor import Predictor
from app.service.resources import Resources
from app.service.settings import Settings
from app.service.staging import StagingArea
from app.storage import PRODUCT_NAME, check_product_name


async def get_resources(request: Request) -> Resources:
    resources = getattr(request.app.state, "resources", None)
    if resources is None:  # only between create_app and the lifespan's start
        raise NotReady("service not ready (starting)")
    return resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]


async def get_settings_dep(resources: ResourcesDep) -> Settings:
    return resources.settings


async def get_catalog(resources: ResourcesDep) -> ProductCatalog:
    return resources.catalog


async def get_jobs(resources: ResourcesDep) -> JobRunner:
    return resources.jobs


async def get_staging(resources: ResourcesDep) -> StagingArea:
    return resources.staging


async def get_metrics(resources: ResourcesDep) -> ServiceMetrics:
    return resources.metrics


async def get_predictor(resources: ResourcesDep) -> Predictor:
    return resources.predictor


async def get_ready_predictor(resources: ResourcesDep) -> Predictor:
    if not resources.ready:
        detail = "startup failed" if resources.startup.error else \
            "starting: loading the backbone and banks"
        raise NotReady(f"service not ready ({detail})")
    return resources.predictor


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
CatalogDep = Annotated[ProductCatalog, Depends(get_catalog)]
JobsDep = Annotated[JobRunner, Depends(get_jobs)]
StagingDep = Annotated[StagingArea, Depends(get_staging)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
ReadyPredictorDep = Annotated[Predictor, Depends(get_ready_predictor)]


async def valid_product(
    # The pattern is documented in the OpenAPI schema; the check itself is the store's
    # one rule, so a bad name answers invalid_product_name, not a generic 422.
    product: Annotated[str, Path(description="product name",
                                 json_schema_extra={"pattern": PRODUCT_NAME.pattern})],
) -> str:
    return check_product_name(product)


ProductDep = Annotated[str, Depends(valid_product)]


# Declares the scheme in the OpenAPI schema ("Authorize" in /docs); Bearer is accepted too.
_api_key_scheme = APIKeyHeader(name=KEY_HEADER, auto_error=False,
                               description="the admin key (PATCHCORE_ADMIN_API_KEY); "
                                           "`Authorization: Bearer KEY` works as well")


async def require_admin(
    request: Request,
    x_api_key: Annotated[str | None, Security(_api_key_scheme)] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    """The same check as AdminAuthMiddleware, for the schema and for hosts without it."""
    check_admin(request.app.state.settings, x_api_key, authorization)


AdminDep = Depends(require_admin)
