"""Dependencies of the routes, as Annotated aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from app.service.errors import Forbidden, NotReady, Unauthorized
from app.service.registry import validate_product_name
from app.service.settings import Settings
from app.service.state import ServiceState


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_settings_dep(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_ready_state(state: StateDep) -> ServiceState:
    if not state.ready:
        detail = state.startup_error or "starting: loading the backbone and banks"
        raise NotReady(f"service not ready ({detail})")
    return state


ReadyStateDep = Annotated[ServiceState, Depends(get_ready_state)]


def valid_product(product: str) -> str:
    return validate_product_name(product)


ProductDep = Annotated[str, Depends(valid_product)]


def require_admin(
    state: StateDep,
    x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    """X-API-Key or Authorization: Bearer, compared in constant time."""
    settings = state.settings
    presented = x_api_key
    if presented is None and authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            presented = token.strip()
    expected = settings.admin_api_key.get_secret_value() if settings.admin_api_key else None
    if expected is None:
        if settings.admin_open:
            return
        raise Forbidden("the admin API is disabled: no PATCHCORE_ADMIN_API_KEY is configured")
    if not presented:
        raise Unauthorized("admin API key required (X-API-Key or Authorization: Bearer)")
    if not hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8")):
        raise Forbidden("wrong admin API key")


AdminDep = Depends(require_admin)
