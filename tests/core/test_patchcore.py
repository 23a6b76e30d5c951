"""Build a bank from real nominal images and score real defects (../shared/data)."""

import numpy as np
import pytest
import torch

from app.core.embedding import EmbedderConfig
from app.core.errors import BankIncompatible, BuildCancelled, NotEnoughImages
from app.core.images import decode_image, list_images
from app.core.patchcore import PatchCoreConfig, PatchCoreModel, build_bank
from app.storage import LocalBankStore

SMALL = PatchCoreConfig(embedder=EmbedderConfig(image_size=128), coreset_ratio=0.25, batch_size=4)


@pytest.fixture(scope="module")
def bottle(shared_data):
    root = shared_data / "bottle"
    return {
        "train": list_images(root / "train" / "good")[:12],
        "good": list_images(root / "test" / "good")[:4],
        "defect": [list_images(root / "test" / kind)[i] for kind in ("broken_large", "contamination")
                   for i in range(2)],
    }


@pytest.fixture(scope="module")
def bottle_model(bottle, lite0_small):
    phases = []
    bank = build_bank(bottle["train"], SMALL, lite0_small, progress=lambda p, f: phases.append((p, f)))
    assert [p for p, _ in phases][0] == "features" and phases[-1] == ("calibration", 1.0)
    assert {p for p, _ in phases} == {"features", "coreset", "calibration"}
    return PatchCoreModel(bank, lite0_small)


def test_defects_score_above_nominal(bottle_model, bottle):
    good = bottle_model.predict([decode_image(p) for p in bottle["good"]])
    defect = bottle_model.predict([decode_image(p) for p in bottle["defect"]])
    assert min(d.raw_score for d in defect) > max(g.raw_score for g in good)
    # 5 held-out images give a wide prediction bound: the faintest defect (a small
    # contamination, 5.5 against a threshold of 5.7 here) may stay below it.
    assert sum(d.is_anomalous for d in defect) >= 3
    assert sum(g.is_anomalous for g in good) <= 1
    for prediction in good + defect:
        assert prediction.anomaly_map.shape == (900, 900)
        assert 0.0 <= prediction.score <= 1.0
        assert (prediction.score > 0.5) == prediction.is_anomalous


def test_bank_manifest_records_the_setup(bottle_model):
    manifest = bottle_model.bank.manifest
    assert manifest["embedder"]["backbone"] == "efficientnet_lite0"
    assert manifest["embedder"]["image_size"] == 128
    assert manifest["coreset"]["ratio"] == 0.25
    total = manifest["coreset"]["total_patches"]
    assert manifest["coreset"]["size"] == round(total * 0.25) == bottle_model.bank.size
    assert manifest["images"] == {"fit": 7, "holdout": 5}
    assert manifest["calibration"]["threshold"] > manifest["calibration"]["nominal_median"]


def test_batched_equals_one_at_a_time(bottle_model, bottle):
    images = [decode_image(p) for p in bottle["good"][:2] + bottle["defect"][:2]]
    batched = bottle_model.predict(images)
    for image, together in zip(images, batched, strict=True):
        alone = bottle_model.predict([image])[0]
        assert alone.raw_score == pytest.approx(together.raw_score, rel=1e-4)
        np.testing.assert_allclose(alone.anomaly_map, together.anomaly_map, rtol=1e-3, atol=1e-3)


def test_save_load_predict_round_trip(bottle_model, bottle, lite0_small, tmp_path):
    store = LocalBankStore(tmp_path)
    version = store.save("bottle", bottle_model.bank)
    loaded_version, bank = store.load("bottle")
    assert loaded_version == version
    reloaded = PatchCoreModel(bank, lite0_small)
    image = decode_image(bottle["defect"][0])
    assert reloaded.predict([image])[0].raw_score == pytest.approx(bottle_model.predict([image])[0].raw_score)


def test_bank_for_another_embedder_is_refused(bottle_model, lite0):
    with pytest.raises(BankIncompatible, match="built with"):
        PatchCoreModel(bottle_model.bank, lite0)


def test_grayscale_non_square_images_map_back_to_their_size(shared_data, lite0_small):
    tiles = list_images(shared_data / "magnetic_tile" / "train" / "good")[:6]
    bank = build_bank(tiles, SMALL, lite0_small)
    model = PatchCoreModel(bank, lite0_small)
    defect = list_images(shared_data / "magnetic_tile" / "test" / "blowhole")[0]
    image = decode_image(defect)
    prediction = model.predict([image])[0]
    assert prediction.anomaly_map.shape == image.shape[:2]
    assert image.shape[0] != image.shape[1]


def test_too_few_images_and_cancel(bottle, lite0_small):
    with pytest.raises(NotEnoughImages):
        build_bank(bottle["train"][:1], SMALL, lite0_small)
    with pytest.raises(BuildCancelled):
        build_bank(bottle["train"][:4], SMALL, lite0_small, should_stop=lambda: True)


def test_an_unreadable_training_image_is_named(bottle, lite0_small, tmp_path):
    from app.core.errors import InvalidImage

    broken = tmp_path / "cam3-0042.png"
    broken.write_bytes(bottle["train"][0].read_bytes()[:200])
    with pytest.raises(InvalidImage, match="cam3-0042.png"):
        build_bank([*bottle["train"][:6], broken], SMALL, lite0_small)


def test_f1_threshold_from_a_labelled_validation_set(bottle, lite0_small):
    validation = (bottle["good"] + bottle["defect"], [0] * 4 + [1] * 4)
    bank = build_bank(bottle["train"][:6], SMALL, lite0_small, validation=validation)
    assert bank.manifest["calibration"]["method"] == "f1_validation"


def test_stored_map_sigma_smooths_the_served_map(bottle_model, bottle, lite0_small, tmp_path):
    """A product's map smoothing is part of its bank and is what predict applies."""
    import copy

    from app.core.bank import MemoryBank
    from app.core.scoring import score_patches, smoothed_maps

    manifest = copy.deepcopy(bottle_model.bank.manifest)
    manifest["config"]["gaussian_sigma"] = 12.0
    store = LocalBankStore(tmp_path)
    store.save("wide", MemoryBank(bottle_model.bank.features, bottle_model.bank.nominal_scores, manifest))
    wide = PatchCoreModel(store.load("wide")[1], lite0_small)
    image = decode_image(bottle["defect"][0])
    embeddings = lite0_small.embed(torch.stack(wide.preprocess([image]))).numpy()
    patch_scores, _ = score_patches(wide.index, embeddings)
    served, default = wide.predict([image])[0], bottle_model.predict([image])[0]
    np.testing.assert_allclose(served.smoothed_map.numpy(), smoothed_maps(patch_scores, 128, 12.0)[0].numpy(),
                               rtol=1e-5, atol=1e-5)
    assert served.raw_score == pytest.approx(default.raw_score)  # the score is not smoothed
    # Wider smoothing spreads the peak: a lower maximum over the same patch scores.
    assert served.smoothed_map.max() < default.smoothed_map.max()


@pytest.mark.parametrize("sigma", [-1.0, 33.0, float("nan"), "wide"])
def test_unusable_stored_map_sigma_is_refused_at_load(bottle_model, lite0_small, tmp_path, sigma):
    """A bank file is input: a stored sigma out of range would stall or break every predict."""
    import copy

    from app.core.bank import MemoryBank

    manifest = copy.deepcopy(bottle_model.bank.manifest)
    manifest["config"]["gaussian_sigma"] = sigma
    store = LocalBankStore(tmp_path)
    store.save("odd", MemoryBank(bottle_model.bank.features, bottle_model.bank.nominal_scores, manifest))
    with pytest.raises(BankIncompatible, match="map sigma"):
        PatchCoreModel(store.load("odd")[1], lite0_small)


@pytest.mark.parametrize("change", [{"gaussian_sigma": 40.0}, {"gaussian_sigma": -0.5}, {"top_k": 0},
                                   {"reweight_neighbours": -1}, {"reweight_neighbours": 1},
                                   {"false_alarm_rate": 0.0}, {"false_alarm_rate": 1e-17}, {"false_alarm_rate": 0.5},
                                   {"coreset_ratio": 0.0},
                                   {"coreset_ratio": 1.5}, {"holdout_fraction": 1.0}, {"coreset_size": 0}])
def test_build_bank_refuses_settings_out_of_range(bottle, lite0_small, change):
    """The engine checks its own settings: callers of build_bank bypass the CLI's and the schema's checks."""
    import dataclasses

    with pytest.raises(ValueError, match=next(iter(change))):
        build_bank(bottle["train"][:6], dataclasses.replace(SMALL, **change), lite0_small)


def test_stage_balance_factors_equalise_the_stages_shares():
    from app.core.patchcore import stage_balance_factors

    rng = np.random.default_rng(0)
    # Stage 1 (2 values) spreads 2x as wide per value as stage 2 (3 values).
    features = np.concatenate([rng.normal(0, 2.0, (20000, 2)), rng.normal(5, 1.0, (20000, 3))], axis=1)
    factors = stage_balance_factors(features.astype(np.float32), [2, 3])
    shares = [(features[:, :2] * factors[0]).var(0).sum(), (features[:, 2:] * factors[1]).var(0).sum()]
    assert shares[0] == pytest.approx(shares[1], rel=1e-6)
    assert sum(shares) == pytest.approx(features.var(0).sum(), rel=1e-6)  # the total is kept
    assert factors[1] > 1.0 > factors[0]
    # Identical images leave nothing to balance.
    assert stage_balance_factors(np.ones((50, 5), np.float32), [2, 3]) == [1.0, 1.0]


def test_a_stage_balanced_bank_scores_as_it_was_built(bottle, lite0_small, tmp_path):
    """The factors are measured at build time, stored in the bank, and applied to every
    query: the held-out images score at predict exactly as they did when calibrating."""
    import dataclasses

    from app.core.patchcore import _split_holdout, embed_images

    config = dataclasses.replace(SMALL, stage_balance=True)
    bank = build_bank(bottle["train"], config, lite0_small)
    balance = bank.manifest["stage_balance"]
    assert balance["sample_images"] == len(_split_holdout(len(bottle["train"]), config)[0])
    # Measured here: the stride-8 stage's values spread wider, so the stride-16 stage gains.
    assert balance["factors"][1] > 1.0 > balance["factors"][0]
    store = LocalBankStore(tmp_path)
    store.save("balanced", bank)
    model = PatchCoreModel(store.load("balanced")[1], lite0_small)
    _, holdout = _split_holdout(len(bottle["train"]), config)
    served = [p.raw_score for p in model.predict([decode_image(bottle["train"][i]) for i in holdout])]
    np.testing.assert_allclose(served, bank.nominal_scores, rtol=1e-5)
    # The bank's rows are patches in the balanced space: each is a scaled patch of a fit image.
    fit, _ = _split_holdout(len(bottle["train"]), config)
    plain = embed_images(lite0_small, [bottle["train"][i] for i in fit], 4)
    dims = lite0_small.stage_dims
    scaled = plain * np.repeat(np.asarray(balance["factors"], np.float32), dims)
    row = model.bank.features[0]
    assert np.abs(scaled - row).max(axis=1).min() < 1e-4 < np.abs(plain - row).max(axis=1).min()
    defects = model.predict([decode_image(p) for p in bottle["defect"]])
    goods = model.predict([decode_image(p) for p in bottle["good"]])
    assert min(d.raw_score for d in defects) > max(g.raw_score for g in goods)


@pytest.mark.parametrize("stored", [{"factors": [1.0]}, {"factors": [1.0, -2.0]}, {"factors": [1.0, "x"]},
                                    {"factors": [1.0, float("inf")]}, [1.0, 2.0], {"factors": None}])
def test_unusable_stored_stage_balance_is_refused_at_load(bottle_model, lite0_small, stored):
    import copy

    from app.core.bank import MemoryBank

    manifest = copy.deepcopy(bottle_model.bank.manifest)
    manifest["stage_balance"] = stored
    with pytest.raises(BankIncompatible, match="stage balance"):
        PatchCoreModel(MemoryBank(bottle_model.bank.features, bottle_model.bank.nominal_scores, manifest),
                       lite0_small)
