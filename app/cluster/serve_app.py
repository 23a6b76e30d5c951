"""The Ray Serve application: each replica hosts the single process's FastAPI app.

`@serve.ingress` wraps the app that `create_app` builds, so routes, error
shapes, OpenAPI and app/client.py are the same as `python -m app serve`; its
lifespan opens the same resources (Predictor with its micro-batcher, store,
staging, catalog) in each replica. What differs, all through generic settings
and hooks of app.service:

- banks load on first use per replica, through `@serve.multiplexed` (model id =
  product): an LRU of at most PATCHCORE_RAY_MAX_BANKS_PER_REPLICA banks, and
  Serve routes a request that carries the `serve_multiplexed_model_id` header
  to a replica that already holds that product;
- each replica follows the store's active pointers (`PointerWatcher`, every
  PATCHCORE_WATCH_INTERVAL_S, 0.25 s here), so a version activated anywhere
  is served everywhere within the interval plus one bank load;
- builds go to the cluster's JobBoard (app.cluster.jobs), never run here.

Started by `python -m app serve --engine ray` (deploy()), or by
`serve run deploy/serve_config.yaml` (import path app.cluster.serve_app:build).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.cluster import APP_NAME, DEPLOYMENT_NAME
from app.service.registry import ProductRegistry
from app.service.settings import Settings
from app.storage import PRODUCT_NAME

logger = logging.getLogger(__name__)

MAX_BANKS_PER_REPLICA = int(os.environ.get("PATCHCORE_RAY_MAX_BANKS_PER_REPLICA", "32"))
REPLICA_HEADER = "x-patchcore-replica"
_PRODUCT_PATH = re.compile(r"^/v1/products/([^/]+)(?:/predict)?$")


def replica_settings() -> Settings:
    """The environment's settings, with what a replica changes by default.

    No demo build (N replicas would race to build it; build it through the admin
    API), no preloading of every bank (the multiplexed LRU loads on use), and the
    pointer watch on unless the environment sets its own interval.
    """
    env = Settings()
    changes: dict[str, Any] = {"demo": False, "preload_banks": False}
    if "PATCHCORE_WATCH_INTERVAL_S" not in os.environ:
        changes["watch_interval_s"] = 0.25
    return env.model_copy(update=changes)


class _Bank:
    """What the multiplexer holds for a product; evicting it unloads the bank from this replica."""

    def __init__(self, registry: ProductRegistry, product: str):
        self.registry = registry
        self.product = product
        self._unloaded = False

    def __del__(self) -> None:
        # Serve calls this on LRU eviction, the garbage collector later again: act once.
        if not self._unloaded:
            self._unloaded = True
            self.registry.remove(self.product)


class _ReplicaMiddleware:
    """Before a product route runs, make sure the product's bank is loaded here (multiplexed
    LRU); tag every answer with the replica's id (for the propagation and failover tests)."""

    def __init__(self, app: ASGIApp, replica: PatchCoreReplica):
        self.app = app
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        match = _PRODUCT_PATH.match(scope.get("path", ""))
        if match and PRODUCT_NAME.fullmatch(match.group(1)):
            await self.replica.ensure_loaded(match.group(1))
        tag = self.replica.replica_id.encode()
        # Serve's proxy passes its request id in and puts it on the answer itself: the app's
        # copy of the same id would reach the client as "id, id" (and feedback by it would fail).
        proxy_id = next((value for name, value in scope.get("headers", []) if name == b"x-request-id"), None)

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(name, value) for name, value in message.get("headers", [])
                           if not (name.lower() == b"x-request-id" and value == proxy_id)]
                message["headers"] = [*headers, (REPLICA_HEADER.encode(), tag)]
            await send(message)

        await self.app(scope, receive, tagged)


@serve.ingress()
class PatchCoreReplica:
    def __init__(self) -> None:
        from app.service.logging import configure_logging

        self.settings = replica_settings()
        configure_logging(self.settings.log_level, self.settings.log_json)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (unit use)
            self.replica_id = f"pid-{os.getpid()}"
        self.fastapi: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        from app.cluster.flagged import ClusterFlaggedImages
        from app.cluster.jobs import RayJobRunner
        from app.service.api import create_app

        app = create_app(self.settings, jobs_factory=RayJobRunner, flagged_factory=ClusterFlaggedImages)
        app.add_middleware(_ReplicaMiddleware, replica=self)
        opened = app.router.lifespan_context

        @asynccontextmanager
        async def opened_and_loaded(application: FastAPI) -> AsyncIterator[Any]:
            # Serve routes to a replica once its lifespan has started: wait for the backbone
            # here, so a new replica (scale-up, or one replacing a dead one) never answers 503.
            async with opened(application) as state:
                resources = application.state.resources
                await asyncio.to_thread(resources.wait_started)
                if resources.startup.error:
                    raise RuntimeError(f"replica startup failed: {resources.startup.error}")
                yield state

        app.router.lifespan_context = opened_and_loaded
        self.fastapi = app
        return app

    def _resources(self) -> Any:
        return None if self.fastapi is None else self.fastapi.state.resources

    async def ensure_loaded(self, product: str) -> None:
        resources = self._resources()
        if resources is None or not resources.ready:
            return  # the route answers 503
        try:
            await self.bank(product)
        except Exception as exc:  # unknown product, corrupt bank: the route says which
            logger.debug("no bank for %s on this replica: %s", product, exc)

    @serve.multiplexed(max_num_models_per_replica=MAX_BANKS_PER_REPLICA)
    async def bank(self, product: str) -> _Bank:
        registry: ProductRegistry = self._resources().predictor.registry
        if product not in registry.loaded():
            # A product the store does not have stays unknown here (404 from the route, as in
            # the single process), not a "failed to load" entry.
            try:
                active: str | None = await asyncio.to_thread(registry.store.active_version, product)
            except LookupError:
                active = None
            except Exception:  # a broken pointer, the store down: load() records why, as at start
                active = ""
            if active is None:
                raise LookupError(f"no product named {product!r}")
            loaded = await asyncio.to_thread(registry.load, product, active or None)
            if loaded is None:
                raise LookupError(f"product {product!r} could not be loaded here")
        return _Bank(registry, product)

    def check_health(self) -> None:
        """Serve restarts a replica whose batch worker died (readiness stays /health/ready's)."""
        resources = self._resources()
        if resources is not None and not resources.predictor.batcher.running:
            raise RuntimeError("the batch worker is not running")


def deployment_options(replicas: int | None = None, *, min_replicas: int = 1, max_replicas: int = 4,
                       num_cpus: float = 1.0, num_gpus: float | None = None) -> dict[str, Any]:
    """Fixed `replicas`, or autoscaling between min and max on ongoing requests per replica."""
    if num_gpus is None:
        import ray

        num_gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    options: dict[str, Any] = {
        # Above the batcher's batch size so a replica can fill a batch; its own bounded
        # queue (429 + Retry-After) does the back-pressure.
        "max_ongoing_requests": 32,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 10,
    }
    if replicas is not None:
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": min_replicas, "max_replicas": max_replicas,
            # About one full micro-batch in flight per replica.
            "target_ongoing_requests": 8, "upscale_delay_s": 10, "downscale_delay_s": 120}
    return options


def build_options(args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Deployment options from the builder's arguments (a Serve config's `args`)."""
    args = args or {}

    def given(key: str) -> bool:
        return args.get(key) not in (None, "", "auto")

    return deployment_options(int(args["replicas"]) if given("replicas") else None,
                              min_replicas=int(args.get("min_replicas", 1)),
                              max_replicas=int(args.get("max_replicas", 4)),
                              num_cpus=float(args.get("num_cpus", 1.0)),
                              num_gpus=float(args["num_gpus"]) if given("num_gpus") else None)


def build(args: dict[str, Any] | None = None) -> Any:
    """Application builder (`serve run app.cluster.serve_app:build replicas=2`)."""
    deployment: Any = serve.deployment(PatchCoreReplica, name=DEPLOYMENT_NAME, **build_options(args))
    return deployment.bind()


def deploy(*, address: str | None, host: str, port: int, replicas: int | None, num_cpus: float,
           detach: bool, num_gpus: float | None = None) -> None:
    """Start (or join) a Ray cluster, start Serve's HTTP proxy on host:port, deploy the app.

    With `detach` it returns once the app is running (it stays on the cluster);
    else it serves until interrupted, then deletes the app.
    """
    import time

    import ray

    from app.cluster.flagged import flagged_board
    from app.cluster.jobs import job_board

    ray.init(address=address, namespace="serve", configure_logging=False,
             include_dashboard=False if address is None else None)
    settings = replica_settings()
    # Created before the first replica needs them.
    job_board(settings.max_finished_jobs)
    flagged_board(int(settings.feedback_cache_mb * 1024 * 1024))
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    serve.run(build({"replicas": replicas, "num_cpus": num_cpus, "num_gpus": num_gpus}), name=APP_NAME,
              route_prefix="/", blocking=False)
    logger.info("patchcore is running on Ray Serve at http://%s:%d", host, port)
    if detach:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
