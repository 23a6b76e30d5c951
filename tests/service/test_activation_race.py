"""One writer per product: many threads activating versions and publishing builds for
one product; afterwards the served model, the store's ACTIVE pointer and a restart agree."""

from __future__ import annotations

import random
import threading

import pytest

from app.service.resources import Resources
from app.storage import LocalBankStore

from .conftest import test_settings

pytestmark = pytest.mark.slow


def _open(models_dir, embedder) -> Resources:
    resources = Resources.open(test_settings(models_dir), embedder_factory=lambda config: embedder)
    assert resources.wait_started(120) and resources.startup.error is None
    return resources


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_activations_and_publishes_agree_on_disk_and_in_memory(
        tmp_path, tile_bank, embedder, round_):
    store = LocalBankStore(tmp_path)
    versions = [store.save("tile", tile_bank, activate=(i == 0)) for i in range(4)]
    resources = _open(tmp_path, embedder)
    published: list[str] = []
    errors: list[BaseException] = []
    rng = random.Random(round_)
    plan = [("activate", rng.choice(versions)) if rng.random() < 0.75 else ("publish", "")
            for _ in range(24)]
    start = threading.Barrier(8)

    def worker(steps) -> None:
        try:
            start.wait()
            for kind, version in steps:
                if kind == "activate":
                    resources.catalog.activate("tile", version)
                else:
                    published.append(resources.catalog.publish("tile", tile_bank, activate=True))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(plan[i::8],)) for i in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        served = resources.predictor.get("tile").version
        assert served == store.active_version("tile")
        assert (tmp_path / "tile" / "ACTIVE").read_text().strip() == served
        assert set(store.versions("tile")) == set(versions) | set(published)
    finally:
        resources.close()
    # A restart serves the same version.
    again = _open(tmp_path, embedder)
    try:
        assert again.predictor.get("tile").version == served
    finally:
        again.close()


def test_a_delete_during_a_publish_leaves_no_product_behind(tmp_path, tile_bank, embedder, monkeypatch):
    """A product delete cancels its build (the route calls jobs.cancel_product first) and
    then waits for the product's lock: a build already saving its bank finishes, and the
    delete then removes that version too; a build not yet saving sees the cancel under the
    lock and publishes nothing. Either way the product stays deleted."""
    from app.core.errors import BuildCancelled

    store = LocalBankStore(tmp_path)
    store.save("tile", tile_bank)
    resources = _open(tmp_path, embedder)
    try:
        catalog = resources.catalog
        saving, release = threading.Event(), threading.Event()
        real_save = catalog.store.save

        def slow_save(*args, **kwargs):
            saving.set()
            assert release.wait(30)
            return real_save(*args, **kwargs)

        monkeypatch.setattr(catalog.store, "save", slow_save)
        cancel = threading.Event()
        outcome: dict = {}

        def build() -> None:
            try:
                outcome["version"] = catalog.publish("tile", tile_bank, cancelled=cancel.is_set)
            except BaseException as exc:  # noqa: BLE001 - reported below
                outcome["error"] = exc

        publisher = threading.Thread(target=build)
        publisher.start()
        assert saving.wait(30), "the build never reached its save"
        cancel.set()  # what DELETE does first, while this build is already saving
        deleter = threading.Thread(target=catalog.delete, args=("tile",))
        deleter.start()
        deleter.join(0.5)
        assert deleter.is_alive(), "the delete must wait for the save in progress"
        release.set()
        publisher.join(30)
        deleter.join(30)
        assert "version" in outcome, outcome
        assert "tile" not in store.products() and not resources.predictor.registry.knows("tile")

        # A build that had not reached its save when the delete came publishes nothing.
        store.save("tile", tile_bank)
        resources.catalog.activate("tile", store.active_version("tile"))
        monkeypatch.setattr(catalog.store, "save", real_save)
        catalog.delete("tile")
        with pytest.raises(BuildCancelled):
            catalog.publish("tile", tile_bank, cancelled=lambda: True)
        assert "tile" not in store.products() and not resources.predictor.registry.knows("tile")
    finally:
        resources.close()
