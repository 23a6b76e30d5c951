"""Follow the store's active pointers: serve what another process activated.

In one process every activation goes through the `ProductCatalog`, which swaps
the served model itself. When several processes serve the same store (Ray Serve
replicas, a build task that activates what it built, the CLI), each one checks
the pointer of every product it has loaded every `interval_s` and reloads a
product whose pointer moved. The swap is the registry's copy-on-write install,
so requests in flight finish on the old model and none fails.

Why polling and not a notification: the pointer in the store is the one source
of truth, whoever moved it, and a missed message cannot leave a replica on an
old version for longer than one interval. It costs one small read per loaded
product per interval (see docs/scale-out.md for the figures at scale).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from app.service.registry import ProductRegistry

logger = logging.getLogger(__name__)


class PointerWatcher:
    def __init__(self, registry: ProductRegistry, interval_s: float,
                 on_swap: Callable[[str, str, float], None] | None = None,
                 install_guard: Callable[[str], AbstractContextManager[None]] | None = None):
        self.registry = registry
        # The catalog's per-product writer lock: an activation through this process's API and
        # this watcher's swap cannot interleave (a slow reload overwrote a newer activation).
        self._install_guard = install_guard
        self.interval_s = interval_s
        self._on_swap = on_swap
        self._stop = threading.Event()
        self._refused: set[tuple[str, str]] = set()  # versions that failed to load: not retried
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="pointer-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check_once(self) -> list[str]:
        """Reload every loaded product whose pointer names another version; return their names."""
        swapped = []
        for name, loaded in list(self.registry.loaded().items()):
            try:
                active = self.registry.store.active_version(name)
            except Exception as exc:  # an outage, or no pointer any more: see below
                logger.debug("pointer of %s unreadable: %s", name, exc)
                active = None
            if active is None:
                if not self._exists(name):  # deleted through another process
                    self.registry.remove(name)
                continue
            if active == loaded.version or (name, active) in self._refused:
                continue
            started = time.perf_counter()
            now = self.registry.load(name, active, install_guard=self._install_guard)
            if now is None:  # corrupt or incompatible: the old version keeps serving
                self._refused.add((name, active))
            elif now.version == active:
                swapped.append(name)
                if self._on_swap is not None:
                    self._on_swap(name, active, time.perf_counter() - started)
        return swapped

    def _exists(self, name: str) -> bool:
        """False only when the store answers that the product has no version left."""
        try:
            return bool(self.registry.store.versions(name))
        except Exception:
            return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception:  # never let the watcher die: the next round tries again
                logger.exception("pointer watch round failed")
