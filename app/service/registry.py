"""The loaded model of each product, failed banks, and the embedders they share.

Readers never lock: the product table is replaced as a whole (copy on write),
so a request sees either the old model or the new one, and a swap never makes a
request fail or wait. Writers (load, install, remove) are serialised by the
`ProductCatalog`, which keeps the store's active pointer and this table in step.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from app.core.bank import MemoryBank
from app.core.embedding import EmbedderConfig, PatchEmbedder
from app.core.errors import PatchCoreError
from app.core.patchcore import PatchCoreConfig, PatchCoreModel, bank_framing
from app.service.errors import ProductNotFound, ProductUnavailable, status_and_code
from app.storage import BankStore, StoreUnavailable

logger = logging.getLogger(__name__)

EmbedderFactory = Callable[[EmbedderConfig], PatchEmbedder]


def describe_bank(bank: MemoryBank) -> dict:
    """What the product listing shows of a bank (nothing of the server's file system)."""
    manifest = bank.manifest
    embedder = manifest.get("embedder", {})
    calibration = manifest.get("calibration", {}) or {}
    return {
        "backbone": embedder.get("backbone"),
        "image_size": embedder.get("image_size"),
        "patch_size": embedder.get("patch_size"),
        "normalisation": embedder.get("normalisation", "dataset"),
        "framing": bank_framing(manifest).to_dict(),
        "false_alarm_rate": calibration.get("false_alarm_rate"),
        "map_sigma": (manifest.get("config") or {}).get("gaussian_sigma", PatchCoreConfig.gaussian_sigma),
        "stage_balance": manifest.get("stage_balance") is not None,
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
    info: dict
    loaded_at: float = field(default_factory=time.time)

    @property
    def embedder(self) -> PatchEmbedder:
        return self.model.embedder

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
        out = {"name": self.name, "status": "failed", "reason": self.reason,
               "error_code": self.error_code}
        if self.version is not None:
            out["version"] = self.version
        return out


class ProductRegistry:
    """Loaded PatchCore models per product, and one embedder per EmbedderConfig."""

    def __init__(self, store: BankStore, embedder_factory: EmbedderFactory,
                 on_change: Callable[[], None] | None = None):
        self.store = store
        self._embedder_factory = embedder_factory
        self._on_change = on_change
        self._products: dict[str, LoadedProduct] = {}
        self._failed: dict[str, FailedProduct] = {}
        # Weak: an embedder lives while a loaded model or a running build holds it, so a
        # backbone that only an old version or a finished build used is freed, not kept for
        # the life of the process (one per image size, width, ... an admin ever built with).
        # The default config's stays: it is what the next build or bank most likely needs.
        self._embedders: weakref.WeakValueDictionary[EmbedderConfig, PatchEmbedder] = (
            weakref.WeakValueDictionary())
        self._default_embedder: PatchEmbedder | None = None
        self._write_lock = threading.Lock()
        self._embedder_lock = threading.Lock()

    # ---------------------------------------------------------------- embedders
    def embedder(self, config: EmbedderConfig) -> PatchEmbedder:
        """One embedder per config, shared by every bank (and build) that uses it while any does."""
        with self._embedder_lock:
            found = self._embedders.get(config)
            if found is None:
                found = self._embedder_factory(config)
                self._embedders[config] = found
                if config == EmbedderConfig():
                    self._default_embedder = found
            return found

    def embedder_configs(self) -> list[EmbedderConfig]:
        """The configs whose embedder is alive now (loaded models, running builds, the default)."""
        with self._embedder_lock:
            return list(self._embedders.keys())

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

    def knows(self, name: str) -> bool:
        return name in self._products or name in self._failed

    # ---------------------------------------------------------------- writes
    def model_for(self, bank: MemoryBank) -> PatchCoreModel:
        """A ready-to-serve model for a bank: the (slow) part of a swap, done before it."""
        return PatchCoreModel(bank, self.embedder(EmbedderConfig.from_dict(bank.embedder)))

    def load(self, name: str, version: str | None = None, *, raise_unavailable: bool = False,
             install_guard: Callable[[str], AbstractContextManager[None]] | None = None) -> LoadedProduct | None:
        """Load a product's bank (its active one by default) and swap it in.

        A corrupt or incompatible bank is logged and recorded as failed; when the
        product was already serving, the old model keeps serving. `raise_unavailable`:
        a store that cannot be reached raises StoreUnavailable instead, for a caller that
        retries once it answers (startup), rather than a product failed for good by one
        timed-out read. `install_guard` (the catalog's per-product writer lock): the install
        happens under it, and only while the store's pointer still names this version, so a
        reload that was slow to read cannot undo an activation made meanwhile; the product's
        current entry is returned then.
        """
        try:
            # Resolved first, so a bank that fails to load is reported with its version.
            version = version or self.store.active_version(name)
            version, bank = self.store.load(name, version)
            model = self.model_for(bank)
            if install_guard is None:
                return self.install(name, version, model)
            with install_guard(name):
                try:
                    still_active = self.store.active_version(name) == version
                except Exception:  # noqa: BLE001 - moved, broken or unreachable: not this reload's to install
                    still_active = False
                if not still_active:
                    return self._products.get(name)
                return self.install(name, version, model)
        except Exception as exc:  # noqa: BLE001 - whatever a bad bank raises, the other products still load
            if raise_unavailable and isinstance(exc, StoreUnavailable):
                raise
            logger.error("bank for %s failed to load: %s", name, exc,
                         extra={"product": name, "version": version},
                         exc_info=not isinstance(exc, PatchCoreError | OSError | ValueError | LookupError))
            failed = FailedProduct(name, version, str(exc) or type(exc).__name__,
                                   status_and_code(exc)[1])
            with self._write_lock:
                self._failed = {**self._failed, name: failed}
            self._changed()
            return None

    def install(self, name: str, version: str, model: PatchCoreModel) -> LoadedProduct:
        """Make `model` the one serving `name`: it is complete before it is visible."""
        loaded = LoadedProduct(name, version, model, describe_bank(model.bank))
        with self._write_lock:
            self._products = {**self._products, name: loaded}
            self._failed = {k: v for k, v in self._failed.items() if k != name}
        logger.info("serving %s version %s", name, version,
                    extra={"product": name, "version": version,
                           "bank_size": loaded.info["bank_size"]})
        self._changed()
        return loaded

    def remove(self, name: str) -> None:
        with self._write_lock:
            self._products = {k: v for k, v in self._products.items() if k != name}
            self._failed = {k: v for k, v in self._failed.items() if k != name}
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
