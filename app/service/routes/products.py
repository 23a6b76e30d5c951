from __future__ import annotations

import logging

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.service.deps import CatalogDep, PredictorDep, ProductDep
from app.service.schemas import ERROR_RESPONSES, ProductInfo, ProductList
from app.storage import StoreError

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["products"])


@router.get("/products", response_model=ProductList, response_model_exclude_none=True)
async def list_products(predictor: PredictorDep, catalog: CatalogDep) -> dict:
    """Loaded banks, banks that failed to load with the reason, and the store's other
    products (a Ray replica lists every product, not only the banks it has loaded)."""
    try:
        stored: list[dict] | None = [{"name": name, "status": "stored"}
                                     for name in await run_in_threadpool(catalog.not_loaded)]
    except (StoreError, OSError) as exc:  # the store is down: what is loaded still answers
        logger.warning("product listing without the store's products: %s", exc)
        stored = None
    return {"products": [p.describe() for _, p in sorted(predictor.loaded().items())],
            "failed": [f.describe() for _, f in sorted(predictor.failed().items())],
            "stored": stored}


@router.get("/products/{product}", response_model=ProductInfo, responses=ERROR_RESPONSES,
            response_model_exclude_none=True)
async def get_product(product: ProductDep, catalog: CatalogDep) -> dict:
    """One product: its serving bank (or why it failed) and the versions in the store."""
    return await run_in_threadpool(catalog.describe, product)
