from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.service.deps import ProductDep, StateDep
from app.service.errors import ProductNotFound
from app.service.schemas import ERROR_RESPONSES, ProductInfo, ProductList

router = APIRouter(prefix="/v1", tags=["products"])


@router.get("/products", response_model=ProductList)
async def list_products(state: StateDep) -> dict:
    """Loaded banks, and banks that failed to load with the reason."""
    registry = state.registry
    return {"products": [p.describe() for _, p in sorted(registry.loaded().items())],
            "failed": [f.describe() for _, f in sorted(registry.failed().items())]}


@router.get("/products/{product}", response_model=ProductInfo, responses=ERROR_RESPONSES)
async def get_product(product: ProductDep, state: StateDep) -> dict:
    """One product: its serving bank (or why it failed) and the versions on disk."""
    registry = state.registry
    if product in registry.loaded():
        info = registry.loaded()[product].describe()
    elif product in registry.failed():
        info = registry.failed()[product].describe()
    else:
        raise ProductNotFound(f"no product named {product!r}")
    info["versions"] = await run_in_threadpool(_versions, state, product)
    return info


def _versions(state, product: str) -> list[str]:
    try:
        return [str(v) for v in state.store.versions(product)]
    except (OSError, KeyError, ValueError):
        return []
