"""Per-product serving state: the loaded model of each product, failed banks, hot swap.

Everything lives on one `ProductRegistry` held by `app.state`; nothing is
process-global. Readers never lock: the product table is replaced as a whole
(copy on write), so a request sees either the old model or the new one, and a
swap never makes a request fail or wait.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.core.embedding import EmbedderConfig, PatchEmbedder
from app.core.errors import PatchCoreError
from app.core.patchcore import PatchCoreModel
from app.service.errors import (
    InvalidProductName,
    ProductNotFound,
    ProductUnavailable,
    VersionNotFound,
    status_and_code,
)

logger = logging.getLogger(__name__)

PRODUCT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def validate_product_name(name: str) -> str:
    if not PRODUCT_NAME.fullmatch(name):
        raise InvalidProductName(
            f"invalid product name {name[:80]!r}: expected [a-z0-9][a-z0-9_-]{{0,63}}")
    return name


def embedder_config_of(bank: Any) -> EmbedderConfig:
    """The EmbedderConfig a bank was built with, from its manifest."""
    config = getattr(bank, "embedder_config", None)
    if isinstance(config, EmbedderConfig):
        return config
    return EmbedderConfig.from_dict(bank.manifest["embedder"])


def describe_bank(bank: Any) -> dict:
    manifest = bank.manifest
    embedder = manifest.get("embedder", {})
    calibration = manifest.get("calibration", {}) or {}
    return {
        "backbone": embedder.get("backbone"),
        "image_size": embedder.get("image_size"),
        "bank_size": int(manifest.get("bank_size", len(bank.features))),
        "feature_dim": int(bank.features.shape[1]),
        "threshold": calibration.get("threshold"),
        "created_at": manifest.get("created_at"),
    }


@dataclass(frozen=True)
class LoadedProduct:
    name: str
    version: str
    model: PatchCoreModel
    embedder: PatchEmbedder
    info: dict
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict:
        return {"name": self.name, "status": "loaded", "version": self.version, **self.info,
                "loaded_at": self.loaded_at}


@dataclass(frozen=True)
class FailedProduct:
    name: str
    version: str | None
    reason: str
    error_code: str

    def describe(self) -> dict:
        return {"name": self.name, "status": "failed", "version": self.version,
                "reason": self.reason, "error_code": self.error_code}


class ProductRegistry:
    """Loaded PatchCore models per product, and the embedders they share."""

    def __init__(self, store: Any, embedder_factory: Callable[[EmbedderConfig], PatchEmbedder],
                 on_change: Callable[[], None] | None = None):
        self.store = store
        self._embedder_factory = embedder_factory
        self._on_change = on_change
        self._products: dict[str, LoadedProduct] = {}
        self._failed: dict[str, FailedProduct] = {}
        self._embedders: dict[EmbedderConfig, PatchEmbedder] = {}
        self._write_lock = threading.RLock()
        self._embedder_lock = threading.Lock()

    # ---------------------------------------------------------------- embedders
    def embedder(self, config: EmbedderConfig) -> PatchEmbedder:
        """One embedder per config, shared by every bank (and build) that uses it."""
        found = self._embedders.get(config)
        if found is not None:
            return found
        with self._embedder_lock:
            found = self._embedders.get(config)
            if found is None:
                found = self._embedder_factory(config)
                self._embedders = {**self._embedders, config: found}
            return found

    @property
    def embedders(self) -> dict[EmbedderConfig, PatchEmbedder]:
        return self._embedders

    # ---------------------------------------------------------------- reads (lock-free)
    def get(self, name: str) -> LoadedProduct:
        loaded = self._products.get(name)
        if loaded is not None:
            return loaded
        failed = self._failed.get(name)
        if failed is not None:
            raise ProductUnavailable(f"product {name!r} failed to load: {failed.reason}")
        raise ProductNotFound(f"no product named {name!r}")

    def loaded(self) -> dict[str, LoadedProduct]:
        return self._products

    def failed(self) -> dict[str, FailedProduct]:
        return self._failed

    def __contains__(self, name: str) -> bool:
        return name in self._products

    # ---------------------------------------------------------------- writes
    def load_all(self) -> None:
        """Load the active bank of every product in the store; failures are recorded."""
        for name in sorted(self.store.products()):
            self.load(name)

    def load(self, name: str, version: str | None = None) -> LoadedProduct | None:
        """Load a product's bank (its active one by default) and swap it in.

        A corrupt or incompatible bank is logged and recorded as failed; when the
        product was already serving, the old model keeps serving.
        """
        try:
            version, bank = self.store.load(name, version)
            return self.install(name, version, bank)
        except (PatchCoreError, OSError, ValueError, LookupError, TypeError) as exc:
            logger.error("bank for %s failed to load: %s", name, exc,
                         extra={"product": name, "version": version})
            failed = FailedProduct(name, version, str(exc) or type(exc).__name__,
                                   status_and_code(exc)[1])
            with self._write_lock:
                self._failed = {**self._failed, name: failed}
            self._changed()
            return None

    def install(self, name: str, version: str, bank: Any) -> LoadedProduct:
        """Swap a bank in for `name`: the new model is complete before it is visible."""
        embedder = self.embedder(embedder_config_of(bank))
        model = PatchCoreModel(bank, embedder)
        loaded = LoadedProduct(name, version, model, embedder, describe_bank(bank))
        with self._write_lock:
            self._products = {**self._products, name: loaded}
            self._failed = {k: v for k, v in self._failed.items() if k != name}
        logger.info("serving %s version %s", name, version,
                    extra={"product": name, "version": version,
                           "bank_size": loaded.info["bank_size"]})
        self._changed()
        return loaded

    def activate(self, name: str, version: str) -> LoadedProduct:
        """Load `version` first, then make it active on disk and swap it in.

        A version that fails to load raises and changes nothing.
        """
        versions = [str(v) for v in self.store.versions(name)] if name in set(
            self.store.products()) else []
        if not versions:
            raise ProductNotFound(f"no product named {name!r}")
        if version not in versions:
            raise VersionNotFound(f"{name!r} has no version {version!r}; it has {versions}")
        _, bank = self.store.load(name, version)
        self.store.activate(name, version)
        return self.install(name, version, bank)

    def remove(self, name: str) -> None:
        with self._write_lock:
            self._products = {k: v for k, v in self._products.items() if k != name}
            self._failed = {k: v for k, v in self._failed.items() if k != name}
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
