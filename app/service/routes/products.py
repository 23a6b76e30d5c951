from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.service.deps import CatalogDep, PredictorDep, ProductDep
from app.service.schemas import ERROR_RESPONSES, ProductInfo, ProductList

router = APIRouter(prefix="/v1", tags=["products"])


@router.get("/products", response_model=ProductList, response_model_exclude_none=True)
async def list_products(predictor: PredictorDep) -> dict:
    """Loaded banks, and banks that failed to load with the reason."""
    return {"products": [p.describe() for _, p in sorted(predictor.loaded().items())],
            "failed": [f.describe() for _, f in sorted(predictor.failed().items())]}


@router.get("/products/{product}", response_model=ProductInfo, responses=ERROR_RESPONSES,
            response_model_exclude_none=True)
async def get_product(product: ProductDep, catalog: CatalogDep) -> dict:
    """One product: its serving bank (or why it failed) and the versions in the store."""
    return await run_in_threadpool(catalog.describe, product)
