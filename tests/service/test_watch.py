"""PointerWatcher: a process serves what another process activated in the shared store."""

from __future__ import annotations

import time

import numpy as np
import torch

from app.core.bank import MemoryBank
from app.core.embedding import EmbedderConfig
from app.service.registry import ProductRegistry
from app.service.watch import PointerWatcher
from app.storage import LocalBankStore

DIM = 8


def tiny_bank(seed: int) -> MemoryBank:
    rng = np.random.default_rng(seed)
    return MemoryBank(
        features=rng.normal(size=(40, DIM)).astype(np.float32),
        nominal_scores=np.array([1.0, 1.2, 1.1]),
        manifest={"embedder": {**EmbedderConfig().to_dict(), "feature_dim": DIM},
                  "calibration": {"threshold": 1.5, "nominal_median": 1.1}},
    )


class FakeEmbedder:
    """Only what PatchCoreModel reads; nothing is scored here (a class: the registry holds
    embedders by weak reference)."""

    def __init__(self, config: EmbedderConfig):
        self.config, self.feature_dim, self.stage_dims = config, DIM, [DIM // 2, DIM // 2]
        self.device = torch.device("cpu")


def fake_embedder(config: EmbedderConfig) -> FakeEmbedder:
    return FakeEmbedder(config)


def registry_on(store: LocalBankStore) -> ProductRegistry:
    return ProductRegistry(store, fake_embedder)  # type: ignore[arg-type]


def test_follows_a_pointer_moved_by_another_process(tmp_path) -> None:
    writer = LocalBankStore(tmp_path)
    first = writer.save("p", tiny_bank(0), activate=True)
    second = writer.save("p", tiny_bank(1), activate=False)
    reader = registry_on(LocalBankStore(tmp_path))
    reader.load("p")
    swaps: list[tuple[str, str]] = []
    watcher = PointerWatcher(reader, 0.05, on_swap=lambda name, version, _s: swaps.append((name, version)))

    assert watcher.check_once() == []  # nothing moved
    writer.activate("p", second)
    assert watcher.check_once() == ["p"]
    assert reader.get("p").version == second and swaps == [("p", second)]

    watcher.start()  # the thread does the same on its own
    try:
        writer.activate("p", first)
        deadline = time.monotonic() + 5
        while reader.get("p").version != first and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reader.get("p").version == first
    finally:
        watcher.close()


def test_a_broken_new_version_leaves_the_old_one_serving_and_is_not_retried(tmp_path) -> None:
    writer = LocalBankStore(tmp_path)
    good = writer.save("p", tiny_bank(0), activate=True)
    bad = writer.save("p", tiny_bank(1), activate=False)
    (tmp_path / "p" / bad / "features.npy").write_bytes(b"not a bank")
    reader = registry_on(LocalBankStore(tmp_path))
    reader.load("p")
    watcher = PointerWatcher(reader, 0.05)
    writer.activate("p", bad)
    assert watcher.check_once() == []
    assert reader.get("p").version == good  # still serving
    calls = []
    original = reader.load
    reader.load = lambda *a, **k: calls.append(a) or original(*a, **k)  # type: ignore[method-assign]
    watcher.check_once()
    assert calls == []  # the refused version is not loaded again every interval


def test_a_product_deleted_elsewhere_is_unloaded(tmp_path) -> None:
    writer = LocalBankStore(tmp_path)
    writer.save("p", tiny_bank(0), activate=True)
    reader = registry_on(LocalBankStore(tmp_path))
    reader.load("p")
    writer.delete_product("p")
    PointerWatcher(reader, 0.05).check_once()
    assert "p" not in reader.loaded()


def test_interval_zero_starts_nothing(tmp_path) -> None:
    watcher = PointerWatcher(registry_on(LocalBankStore(tmp_path)), 0.0)
    watcher.start()
    assert watcher._thread is None
    watcher.close()


def test_a_slow_reload_does_not_undo_an_activation_made_meanwhile(tmp_path) -> None:
    """Another process activates v1; while this watcher reads v1 (slowly), this process's API
    activates v2 under the catalog's writer lock. The watcher must not install v1 after it."""
    import contextlib
    import threading

    writer = LocalBankStore(tmp_path)
    writer.save("p", tiny_bank(0), activate=True)
    v1 = writer.save("p", tiny_bank(1), activate=False)
    v2 = writer.save("p", tiny_bank(2), activate=False)
    store = LocalBankStore(tmp_path)
    reader = registry_on(store)
    reader.load("p")
    lock = threading.Lock()

    @contextlib.contextmanager
    def writing(_product: str):
        with lock:
            yield

    reading_v1, activated = threading.Event(), threading.Event()
    load = store.load

    def slow_load(product, version=None):
        if version == v1:
            reading_v1.set()
            assert activated.wait(5)
        return load(product, version)

    store.load = slow_load  # type: ignore[method-assign]
    writer.activate("p", v1)  # another process

    def api_activation() -> None:  # what ProductCatalog.activate does
        assert reading_v1.wait(5)
        model = reader.model_for(load("p", v2)[1])
        with writing("p"):
            store.activate("p", v2)
            reader.install("p", v2, model)
        activated.set()

    api = threading.Thread(target=api_activation)
    api.start()
    watcher = PointerWatcher(reader, 0.05, install_guard=writing)
    assert watcher.check_once() == []
    api.join(5)
    assert reader.get("p").version == v2 and store.active_version("p") == v2
