import json

import numpy as np
import pytest

from app.core.bank import MemoryBank, load_bank, save_bank
from app.core.errors import BankCorrupt, BankIncompatible
from app.storage import InvalidName, LocalBankStore, ProductNotFound
from tests.bank_edit import edit_manifest, write_manifest


def _bank(rows=50, dim=8):
    rng = np.random.default_rng(0)
    return MemoryBank(
        features=rng.normal(size=(rows, dim)).astype(np.float32),
        nominal_scores=np.array([1.0, 1.2, 1.1]),
        manifest={"embedder": {"backbone": "efficientnet_lite0", "image_size": 224, "patch_size": 3,
                               "stage_dim": None, "feature_dim": dim},
                  "calibration": {"threshold": 1.5, "nominal_median": 1.1, "method": "nominal_quantile"},
                  "created_at": "2026-01-01T00:00:00+00:00"},
    )


def test_round_trip_really_reads_from_disk(tmp_path):
    bank = _bank()
    save_bank(bank, tmp_path / "v1")
    manifest = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"features.npy", "nominal_scores.npy"}
    assert all(len(h) == 64 for h in manifest["files"].values())
    loaded = load_bank(tmp_path / "v1")
    np.testing.assert_array_equal(loaded.features, bank.features)
    np.testing.assert_array_equal(loaded.nominal_scores, bank.nominal_scores)
    assert loaded.threshold == 1.5 and loaded.size == 50
    with pytest.raises(FileExistsError):
        save_bank(bank, tmp_path / "v1")


def test_corrupt_truncated_and_missing_files_are_refused(tmp_path):
    save_bank(_bank(), tmp_path / "b")
    features = tmp_path / "b" / "features.npy"
    data = bytearray(features.read_bytes())
    data[-3] ^= 0xFF
    features.write_bytes(bytes(data))
    with pytest.raises(BankCorrupt, match="checksum"):
        load_bank(tmp_path / "b")
    features.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(BankCorrupt, match="checksum"):
        load_bank(tmp_path / "b")
    features.unlink()
    with pytest.raises(BankCorrupt, match="missing features.npy"):
        load_bank(tmp_path / "b")
    (tmp_path / "b" / "manifest.json").write_text("{not json")
    with pytest.raises(BankCorrupt, match="manifest.json: checksum mismatch"):
        load_bank(tmp_path / "b")
    write_manifest(tmp_path / "b", "{not json")  # a checksum that matches: the JSON is what fails
    with pytest.raises(BankCorrupt, match="unreadable manifest"):
        load_bank(tmp_path / "b")
    with pytest.raises(BankCorrupt, match="no manifest"):
        load_bank(tmp_path / "nothing-here")


def _replace_array(directory, filename: str, array: np.ndarray, allow_pickle: bool = False) -> None:
    """Write `array` over a saved bank's file, with a matching checksum in its manifest, so
    only what load_bank checks beyond the checksum can refuse it."""
    import hashlib

    path = directory / filename
    np.save(path, array, allow_pickle=allow_pickle)
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][filename] = hashlib.sha256(path.read_bytes()).hexdigest()
    write_manifest(directory, manifest)


def test_pickled_array_is_never_loaded(tmp_path):
    save_bank(_bank(), tmp_path / "b")
    _replace_array(tmp_path / "b", "features.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BankCorrupt, match="unreadable array"):
        load_bank(tmp_path / "b")


def test_incompatible_format_version(tmp_path):
    save_bank(_bank(), tmp_path / "b")
    edit_manifest(tmp_path / "b", format_version=99)
    with pytest.raises(BankIncompatible, match="format 99"):
        load_bank(tmp_path / "b")


def test_a_bank_that_keeps_the_aspect_is_format_2_so_older_software_refuses_it(tmp_path):
    """Software before stop 21 reads format 1 only and would score a keep bank's images squeezed."""
    squeezed, kept = _bank(), _bank()
    squeezed.manifest["framing"] = {"mode": "whole", "fraction": 1.0, "roi": None, "aspect": "squeeze"}
    kept.manifest["framing"] = {"mode": "whole", "fraction": 1.0, "roi": None, "aspect": "keep"}
    save_bank(squeezed, tmp_path / "s")
    save_bank(kept, tmp_path / "k")
    save_bank(_bank(), tmp_path / "none")  # no framing at all: a bank from before framing
    in_config = _bank()  # framing only inside the config is what the scorer reads then
    in_config.manifest["config"] = {"framing": {"mode": "whole", "aspect": "keep"}}
    save_bank(in_config, tmp_path / "c")
    assert load_bank(tmp_path / "c").manifest["format_version"] == 2
    assert load_bank(tmp_path / "s").manifest["format_version"] == 1
    assert load_bank(tmp_path / "none").manifest["format_version"] == 1
    assert load_bank(tmp_path / "k").manifest["format_version"] == 2
    edit_manifest(tmp_path / "k", format_version=True)  # JSON true == 1 in Python: not a format
    with pytest.raises(BankIncompatible, match="format True"):
        load_bank(tmp_path / "k")


def test_crash_during_save_leaves_no_half_bank(tmp_path, monkeypatch):
    import app.core.bank as bank_module

    def failing_sha(path):
        raise OSError("disk full")

    monkeypatch.setattr(bank_module, "_sha256", failing_sha)
    with pytest.raises(OSError, match="disk full"):
        save_bank(_bank(), tmp_path / "v1")
    assert list(tmp_path.iterdir()) == []


def test_store_versions_activate_rollback_delete(tmp_path):
    store = LocalBankStore(tmp_path)
    assert store.products() == []
    first = store.save("bottle", _bank())
    second = store.save("bottle", _bank(rows=60))
    assert store.products() == ["bottle"]
    assert store.versions("bottle") == sorted([first, second])
    assert store.active_version("bottle") == second
    assert store.load("bottle")[1].size == 60
    store.activate("bottle", first)
    assert store.load("bottle") [0] == first
    third = store.save("bottle", _bank(rows=70), activate=False)
    assert store.active_version("bottle") == first and third in store.versions("bottle")
    with pytest.raises(ProductNotFound):
        store.activate("bottle", "20990101T000000Z-abcdef")
    with pytest.raises(InvalidName):
        store.load("../etc")
    with pytest.raises(InvalidName):
        store.activate("bottle", "../../x")
    store.delete_product("bottle")
    assert store.products() == [] and not (tmp_path / "bottle").exists()
    with pytest.raises(ProductNotFound):
        store.load("bottle")


@pytest.mark.parametrize("change", [
    {"files": ["features.npy"]}, {"embedder": "lite0"}, {"calibration": 1.5}, {"config": []},
    {"framing": "whole"}, {"bank_size": "50"}, {"calibration": {"threshold": float("nan"), "nominal_median": 1.1}},
    {"calibration": {"threshold": None, "nominal_median": 1.1}}, {"calibration": {"threshold": 1.5}},
    {"calibration": {"threshold": float("inf"), "nominal_median": 1.1}}])
def test_manifest_sections_of_the_wrong_type_are_refused(tmp_path, change):
    save_bank(_bank(), tmp_path / "b")
    edit_manifest(tmp_path / "b", **change)
    with pytest.raises(BankCorrupt, match=next(iter(change))):
        load_bank(tmp_path / "b")


@pytest.mark.parametrize("scores", [np.array([1.0, np.nan]), np.array([[1.0, 1.2]]), np.array([1, 2])])
def test_unusable_nominal_scores_are_refused(tmp_path, scores):
    save_bank(_bank(), tmp_path / "b")
    _replace_array(tmp_path / "b", "nominal_scores.npy", scores)  # save_bank would cast to float64
    with pytest.raises(BankCorrupt, match="nominal_scores"):
        load_bank(tmp_path / "b")
