"""The registry shares one embedder per config while something uses it, and lets go of it after.

An admin can build with any image size, width, neighbourhood or backbone; each needs its own
backbone in memory. Those of versions no longer served and of finished builds must be freed,
or a long-running server grows with every configuration it has ever seen.
"""

from __future__ import annotations

import gc

from app.core.embedding import EmbedderConfig
from app.service.registry import ProductRegistry
from app.storage import LocalBankStore
from tests.service.test_watch import fake_embedder, registry_on, tiny_bank

ODD = EmbedderConfig(stage_dim=32)


def counting_registry(tmp_path) -> tuple[ProductRegistry, list[EmbedderConfig]]:
    made: list[EmbedderConfig] = []

    def factory(config: EmbedderConfig):
        made.append(config)
        return fake_embedder(config)

    return ProductRegistry(LocalBankStore(tmp_path), factory), made  # type: ignore[arg-type]


def test_an_embedder_is_shared_while_held_and_freed_after(tmp_path) -> None:
    registry, made = counting_registry(tmp_path)
    held = registry.embedder(ODD)
    assert registry.embedder(ODD) is held and made == [ODD]  # a second build shares it
    assert ODD in registry.embedder_configs()
    del held
    gc.collect()
    assert ODD not in registry.embedder_configs()
    registry.embedder(ODD)
    assert made == [ODD, ODD]  # made again when needed again


def test_the_default_embedder_stays(tmp_path) -> None:
    registry, made = counting_registry(tmp_path)
    registry.embedder(EmbedderConfig())
    gc.collect()
    assert EmbedderConfig() in registry.embedder_configs()
    registry.embedder(EmbedderConfig())
    assert made == [EmbedderConfig()]


def test_a_served_bank_keeps_its_embedder_until_it_is_removed(tmp_path) -> None:
    store = LocalBankStore(tmp_path)
    bank = tiny_bank(0)
    bank.manifest["embedder"] = {**ODD.to_dict(), "feature_dim": bank.features.shape[1]}
    store.save("p", bank, activate=True)
    registry = registry_on(store)
    assert registry.load("p") is not None
    gc.collect()
    assert ODD in registry.embedder_configs()
    assert registry.get("p").embedder.config == ODD
    registry.remove("p")
    gc.collect()
    assert ODD not in registry.embedder_configs()
