"""LocalBankStore beyond the contract: debris from killed processes, disk full, settings."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest

from app.service.settings import Settings
from app.storage import InsufficientStorage, LocalBankStore, create_store

from .conftest import tiny_bank


def _age(path, seconds):
    old = time.time() - seconds
    os.utime(path, (old, old))
    if path.is_dir():
        for child in path.iterdir():
            os.utime(child, (old, old))


def test_stale_debris_is_swept_at_start_and_fresh_debris_kept(tmp_path):
    store = LocalBankStore(tmp_path)
    version = store.save("bottle", tiny_bank())
    product = tmp_path / "bottle"
    # What a kill -9 leaves: a half-saved bank, a half-deleted product, a pointer temp file.
    half_saved = product / ".tmp-20260101T000000Z-aaaaaa-x1"
    half_saved.mkdir()
    (half_saved / "features.npy").write_bytes(b"partial")
    deleted = tmp_path / ".deleted-tile-abc123"
    deleted.mkdir()
    (deleted / "junk").write_bytes(b"x")
    pointer_tmp = product / ".active-xyz"
    pointer_tmp.write_text("garbage")
    fresh = product / ".tmp-20260101T000000Z-bbbbbb-x2"  # a save still running in another process
    fresh.mkdir()
    for path in (half_saved, deleted, pointer_tmp):
        _age(path, 3600)

    LocalBankStore(tmp_path)  # a restart
    assert not half_saved.exists() and not deleted.exists() and not pointer_tmp.exists()
    assert fresh.exists(), "debris younger than stale_after_s may be a live save: kept"
    assert LocalBankStore(tmp_path, stale_after_s=0).load("bottle")[0] == version
    assert not fresh.exists()
    assert sorted(p.name for p in product.iterdir()) == sorted(["ACTIVE", version])


def test_disk_full_while_saving_removes_partial_files(tmp_path, monkeypatch):
    import app.core.bank as bank_module

    store = LocalBankStore(tmp_path)
    good = store.save("bottle", tiny_bank())
    real_save = bank_module.np.save
    calls = []

    def full_disk(handle, array, allow_pickle=False):
        calls.append(1)
        if len(calls) == 2:  # the second array: half of the bank is on disk already
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(handle, array, allow_pickle=allow_pickle)

    monkeypatch.setattr(bank_module.np, "save", full_disk)
    with pytest.raises(InsufficientStorage, match="bottle") as refused:
        store.save("bottle", tiny_bank(rows=80))
    assert str(tmp_path) not in str(refused.value)
    assert sorted(p.name for p in (tmp_path / "bottle").iterdir()) == sorted(["ACTIVE", good])
    assert store.load("bottle")[0] == good


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs: a real full disk. Needs root (or CAP_SYS_ADMIN); skipped otherwise."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=10)


def test_real_disk_full(tiny_tmpfs):
    store = LocalBankStore(tiny_tmpfs)
    small = store.save("bottle", tiny_bank(rows=100))  # 3 KB of features: fits
    with pytest.raises(InsufficientStorage):
        store.save("bottle", tiny_bank(rows=20_000, dim=8))  # 640 KB: does not
    leftovers = sorted(p.name for p in (tiny_tmpfs / "bottle").iterdir())
    assert leftovers == sorted(["ACTIVE", small]), leftovers
    assert store.load("bottle")[0] == small
    assert store.save("bottle", tiny_bank(rows=100, seed=3)) in store.versions("bottle")  # space came back


def test_create_store_from_settings(tmp_path):
    store = create_store(Settings(models_dir=tmp_path))
    assert isinstance(store, LocalBankStore) and store.root == tmp_path
    with pytest.raises(ValueError, match="PATCHCORE_S3_BUCKET"):
        Settings(store="s3")


# ------------------------------------------------------------------ stop 20 review fixes
def test_a_changed_manifest_is_refused_like_a_changed_array(tmp_path):
    """One digit of the threshold changed on disk used to load and turn a defect into a pass."""
    from app.core.errors import BankCorrupt

    store = LocalBankStore(tmp_path)
    version = store.save("bottle", tiny_bank())
    manifest = tmp_path / "bottle" / version / "manifest.json"
    text = manifest.read_text()
    at = text.index('"threshold": ') + len('"threshold": ')
    manifest.write_text(text[:at] + ("9" if text[at] != "9" else "8") + text[at + 1:])
    with pytest.raises(BankCorrupt, match="manifest.json: checksum mismatch"):
        store.load("bottle")


def test_a_bank_saved_before_the_manifest_checksum_still_loads(tmp_path):
    store = LocalBankStore(tmp_path)
    version = store.save("bottle", tiny_bank())
    (tmp_path / "bottle" / version / "manifest.sha256").unlink()
    assert store.load("bottle")[0] == version


def test_banks_and_pointer_are_readable_as_the_umask_allows(tmp_path):
    """mkdtemp (0700) and mkstemp (0600) hid a bank written by a CLI build as root from a
    service running as another user."""
    previous = os.umask(0o022)
    try:
        store = LocalBankStore(tmp_path)
        version = store.save("bottle", tiny_bank())
    finally:
        os.umask(previous)
    assert (tmp_path / "bottle" / version).stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "bottle" / "ACTIVE").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "bottle" / version / "manifest.json").stat().st_mode & 0o777 == 0o644


def test_a_product_folder_that_cannot_be_read_is_skipped_not_fatal(tmp_path, monkeypatch):
    store = LocalBankStore(tmp_path)
    store.save("bottle", tiny_bank())
    store.save("other", tiny_bank())
    versions = LocalBankStore.versions

    def unreadable(self, product):
        if product == "other":
            raise PermissionError(13, "Permission denied", str(tmp_path / "other"))
        return versions(self, product)

    monkeypatch.setattr(LocalBankStore, "versions", unreadable)
    assert store.products() == ["bottle"]


def test_a_failed_activation_leaves_no_version_behind(tmp_path, monkeypatch):
    """The pointer write failing on a full disk left a whole, never-active version (and a new
    product that no pointer names) while the build reported that nothing was written."""
    store = LocalBankStore(tmp_path)
    first = store.save("bottle", tiny_bank())

    def full(self, directory, product, version):
        raise InsufficientStorage(f"no space left to activate {product}/{version}")

    monkeypatch.setattr(LocalBankStore, "_write_pointer", full)
    with pytest.raises(InsufficientStorage):
        store.save("bottle", tiny_bank(seed=1))
    with pytest.raises(InsufficientStorage):
        store.save("widget", tiny_bank(seed=2))
    assert store.versions("bottle") == [first] and store.active_version("bottle") == first
    assert store.products() == ["bottle"]


def test_a_version_deleted_while_it_is_read_is_not_found_not_corrupt(tmp_path, monkeypatch):
    import shutil

    import app.storage as storage

    store = LocalBankStore(tmp_path)
    version = store.save("bottle", tiny_bank())
    verified = storage.load_verified

    def deleted_meanwhile(directory, label):
        shutil.rmtree(directory)
        return verified(directory, label)

    monkeypatch.setattr(storage, "load_verified", deleted_meanwhile)
    with pytest.raises(storage.VersionNotFound, match="deleted while it was being read"):
        store.load("bottle", version)


def test_versions_saved_within_one_second_list_oldest_first(tmp_path):
    """The names had one-second resolution and a random suffix: 7 of 19 quick saves were
    listed out of order (the console shows them newest first)."""
    store = LocalBankStore(tmp_path)
    saved = []
    for _ in range(12):
        saved.append(store.save("bottle", tiny_bank(), activate=False))
        time.sleep(0.002)  # apart by a millisecond or more, as two builds' saves are
    assert store.versions("bottle") == saved
