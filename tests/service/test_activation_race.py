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
