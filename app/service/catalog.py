"""The `ProductCatalog`: the one writer of products.

Every change to what a product serves goes through here: publishing a built
bank, activating another version (rollback), deleting a product. Each holds the
product's lock around "store pointer + served model", so the version in the
store's active pointer and the version in memory always agree, and concurrent
writers are ordered: the last one to take the lock wins, on disk and in memory
alike. Loading a bank (the slow part) happens before the lock is taken.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from app.core.bank import MemoryBank
from app.core.errors import BuildCancelled
from app.service.errors import ProductNotFound, VersionNotFound
from app.service.predictor import Predictor
from app.service.registry import LoadedProduct
from app.service.staging import StagingArea
from app.storage import BankStore, StoreError, activate_or_discard

logger = logging.getLogger(__name__)


class ProductCatalog:
    def __init__(self, store: BankStore, predictor: Predictor, staging: StagingArea):
        self.store = store
        self.predictor = predictor
        self.staging = staging
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @contextmanager
    def writing(self, product: str) -> Iterator[None]:
        """One writer per product at a time."""
        with self._locks_guard:
            lock = self._locks.setdefault(product, threading.Lock())
        with lock:
            yield

    # ---------------------------------------------------------------- reads
    def exists(self, product: str) -> bool:
        return self.predictor.registry.knows(product) or product in self.store.products()

    def not_loaded(self) -> list[str]:
        """Products in the store that this process neither serves nor failed to load."""
        registry = self.predictor.registry
        return sorted(p for p in self.store.products() if not registry.knows(p))

    def versions(self, product: str) -> list[str]:
        return [str(v) for v in self.store.versions(product)]

    def describe(self, product: str) -> dict:
        registry = self.predictor.registry
        if product in registry.loaded():
            info = registry.loaded()[product].describe()
        elif product in registry.failed():
            info = registry.failed()[product].describe()
        elif product in self.store.products():
            # In the store, not loaded by this process (a Ray replica loads banks on first use;
            # the single process loads at start what was there then).
            info = {"name": product, "status": "stored"}
        else:
            raise ProductNotFound(f"no product named {product!r}")
        # Each on its own: a broken pointer (reported as failed) is when an operator needs the
        # versions most, to activate one and repair it.
        try:
            info["versions"] = self.versions(product)
        except (OSError, LookupError, ValueError, StoreError):
            info["versions"] = []
        try:
            info["active_version"] = self.store.active_version(product)
        except (OSError, LookupError, ValueError, StoreError):
            info["active_version"] = None
        return info

    # ---------------------------------------------------------------- writes
    def publish(self, product: str, bank: MemoryBank, *, activate: bool = True,
                cancelled: Callable[[], bool] | None = None) -> str:
        """Store a new version; when `activate`, make it the served one.

        `cancelled` is checked under the product's lock, so a build cancelled by a
        product delete can never bring the product back after the delete.
        """
        model = self.predictor.registry.model_for(bank) if activate else None
        with self.writing(product):
            if cancelled is not None and cancelled():
                raise BuildCancelled("cancelled before the bank was published")
            version = str(self.store.save(product, bank, activate=False))
            if model is not None:
                activate_or_discard(self.store, product, version)
                self.predictor.registry.install(product, version, model)
        return version

    def activate(self, product: str, version: str) -> LoadedProduct:
        """Serve another stored version. A version that fails to load changes nothing."""
        versions = self.versions(product) if product in self.store.products() else []
        if not versions:
            raise ProductNotFound(f"no product named {product!r}")
        if version not in versions:
            raise VersionNotFound(f"{product!r} has no version {version!r}; it has {versions}")
        _, bank = self.store.load(product, version)
        model = self.predictor.registry.model_for(bank)
        with self.writing(product):
            self.store.activate(product, version)
            return self.predictor.registry.install(product, version, model)

    def delete(self, product: str) -> None:
        """Remove the product's banks, its serving model and its staging set (a product whose
        first build has not finished yet is only its staging set)."""
        with self.writing(product):
            stored = product in self.store.products()
            staged = self.staging.folder(product).is_dir()
            if not stored and not staged and not self.predictor.registry.knows(product):
                raise ProductNotFound(f"no product named {product!r}")
            if stored:
                self.store.delete_product(product)
            self.predictor.registry.remove(product)
            self.staging.clear(product)
        logger.info("deleted product %s", product, extra={"product": product})
