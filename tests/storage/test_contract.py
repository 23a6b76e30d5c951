"""One contract, two stores: LocalBankStore (a directory) and S3BankStore (SeaweedFS over real HTTP).

Each backend can also damage the store behind its back (corrupt a file, write a
raw pointer, remove a version's files) and take it down and bring it back.
`backend.store()` returns a fresh store object; for S3 it has its own empty
cache, as another node would.
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from app.core.errors import BankCorrupt
from app.storage import (
    ActivationConflict,
    BankStore,
    BrokenActivePointer,
    InsufficientStorage,
    InvalidName,
    LocalBankStore,
    NoActiveVersion,
    ProductNotFound,
    StoreUnavailable,
    VersionInUse,
    VersionNotFound,
)

from .conftest import BUCKET, TcpProxy, tiny_bank

MISSING_VERSION = "20990101T000000Z-abcdef"


class LocalBackend:
    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "models"
        self.paths = [str(tmp_path)]

    def store(self) -> LocalBankStore:
        return LocalBankStore(self.root)

    def corrupt(self, product: str, version: str, filename: str) -> None:
        path = self.root / product / version / filename
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))

    def replace(self, product: str, version: str, filename: str, data: bytes) -> None:
        (self.root / product / version / filename).write_bytes(data)

    def write_pointer_raw(self, product: str, data: bytes) -> None:
        (self.root / product / "ACTIVE").write_bytes(data)

    def point_to(self, product: str, version: str) -> None:
        self.write_pointer_raw(product, f"{version}\n".encode())

    def remove_version(self, product: str, version: str) -> None:
        shutil.rmtree(self.root / product / version)

    def down(self) -> None:
        # The volume behind the path is gone: the path is a dangling link (as an unmounted share would be).
        self.root.rename(self.root.with_name("models-away"))
        self.root.symlink_to(self.root.with_name("not-mounted"))

    def up(self) -> None:
        self.root.unlink()
        self.root.with_name("models-away").rename(self.root)


class S3Backend:
    def __init__(self, seaweed, tmp_path: Path):
        self.seaweed = seaweed
        self.tmp_path = tmp_path
        self.prefix = f"t-{uuid.uuid4().hex[:12]}"
        self.direct = seaweed.client()
        self.proxy = TcpProxy(seaweed.port)
        self.proxy.up()
        self.count = itertools.count()
        self.paths = [str(tmp_path)]

    def store(self):
        from app.storage_s3 import S3BankStore

        return S3BankStore(bucket=BUCKET, prefix=self.prefix, endpoint_url=self.proxy.url,
                           session=self.seaweed.session(), cache_dir=self.tmp_path / f"cache-{next(self.count)}",
                           connect_timeout_s=2, read_timeout_s=10, max_attempts=2)

    def _key(self, product: str, *parts: str) -> str:
        return "/".join((self.prefix, "banks", product, *parts))

    def corrupt(self, product: str, version: str, filename: str) -> None:
        key = self._key(product, version, filename)
        data = bytearray(self.direct.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        data[-3] ^= 0xFF
        self.direct.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))

    def replace(self, product: str, version: str, filename: str, data: bytes) -> None:
        self.direct.put_object(Bucket=BUCKET, Key=self._key(product, version, filename), Body=data)

    def write_pointer_raw(self, product: str, data: bytes) -> None:
        self.direct.put_object(Bucket=BUCKET, Key=self._key(product, "ACTIVE"), Body=data)

    def point_to(self, product: str, version: str) -> None:
        self.write_pointer_raw(product, json.dumps({"version": version, "manifest_sha256": "0" * 64}).encode())

    def remove_version(self, product: str, version: str) -> None:
        for name in ("manifest.json", "features.npy", "nominal_scores.npy"):
            self.direct.delete_object(Bucket=BUCKET, Key=self._key(product, version, name))

    def down(self) -> None:
        self.proxy.down()

    def up(self) -> None:
        self.proxy.up()

    def close(self) -> None:
        self.proxy.down()


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    if request.param == "local":
        yield LocalBackend(tmp_path)
        return
    seaweed = request.getfixturevalue("seaweed")
    s3 = S3Backend(seaweed, tmp_path)
    try:
        yield s3
    finally:
        s3.close()


def _no_paths(message: str, backend) -> None:
    for path in backend.paths:
        assert path not in message, message
    assert "/tmp" not in message and "/work" not in message, message


# --------------------------------------------------------------------------- save / load / versions / activate
def test_save_load_versions_activate_rollback(backend):
    store: BankStore = backend.store()
    store.ping()
    assert store.products() == []
    first = store.save("bottle", tiny_bank(rows=50))
    second = store.save("bottle", tiny_bank(rows=60, seed=1))
    assert store.products() == ["bottle"]
    assert store.versions("bottle") == sorted([first, second])
    assert store.active_version("bottle") == second
    version, bank = store.load("bottle")
    assert version == second and bank.size == 60
    np.testing.assert_array_equal(bank.features, tiny_bank(rows=60, seed=1).features)
    assert bank.threshold == 1.5 and len(bank.manifest["files"]) == 2

    store.activate("bottle", first)  # rollback
    other = backend.store()  # another process / node sees the same
    assert other.active_version("bottle") == first and other.load("bottle")[1].size == 50
    third = store.save("bottle", tiny_bank(rows=70), activate=False)
    assert store.active_version("bottle") == first and third in store.versions("bottle")
    assert other.load("bottle", third)[1].size == 70

    with pytest.raises(VersionNotFound):
        store.activate("bottle", MISSING_VERSION)
    with pytest.raises(VersionNotFound):
        store.load("bottle", MISSING_VERSION)
    with pytest.raises(ProductNotFound):
        store.load("nothing")
    assert store.versions("nothing") == [] and store.active_version("nothing") is None
    for bad in ("../etc", "A", ""):
        with pytest.raises(InvalidName):
            store.load(bad)
    with pytest.raises(InvalidName):
        store.activate("bottle", "../../x")
    with pytest.raises(InvalidName):
        store.load("bottle", "../x")


def test_versions_without_pointer_have_no_active_version(backend):
    """Never guess "the newest": a product whose versions were never activated serves nothing until one is."""
    store = backend.store()
    version = store.save("tile", tiny_bank(), activate=False)
    assert store.products() == ["tile"] and store.versions("tile") == [version]
    assert store.active_version("tile") is None
    with pytest.raises(NoActiveVersion, match="activate one"):
        store.load("tile")
    store.activate("tile", version, expected=None)
    assert store.load("tile")[0] == version


# --------------------------------------------------------------------------- delete
def test_delete_version_and_product(backend):
    store = backend.store()
    old = store.save("bottle", tiny_bank(rows=50))
    new = store.save("bottle", tiny_bank(rows=60))
    store.load("bottle", old)  # fills the S3 cache for old
    with pytest.raises(VersionInUse):
        store.delete_version("bottle", new)
    store.delete_version("bottle", old)
    assert store.versions("bottle") == [new]
    with pytest.raises(VersionNotFound):
        store.load("bottle", old)
    with pytest.raises(VersionNotFound):
        store.delete_version("bottle", old)
    with pytest.raises(VersionNotFound):
        store.activate("bottle", old)
    assert store.load("bottle")[0] == new

    store.save("tile", tiny_bank())
    store.delete_product("bottle")
    assert store.products() == ["tile"] and store.versions("bottle") == []
    with pytest.raises(ProductNotFound):
        store.load("bottle")
    with pytest.raises(ProductNotFound):
        store.delete_product("bottle")
    again = store.save("bottle", tiny_bank(rows=30))  # the name can be reused
    assert store.load("bottle")[0] == again and store.versions("bottle") == [again]


# --------------------------------------------------------------------------- compare-and-swap
def test_compare_and_swap_activate(backend):
    store = backend.store()
    a = store.save("bottle", tiny_bank(), activate=False)
    b = store.save("bottle", tiny_bank(rows=20), activate=False)
    store.activate("bottle", a, expected=None)  # create only
    with pytest.raises(ActivationConflict) as lost:
        store.activate("bottle", b, expected=None)
    assert lost.value.actual == a and lost.value.expected is None
    with pytest.raises(ActivationConflict) as lost:
        store.activate("bottle", b, expected=b)
    assert lost.value.actual == a
    assert store.active_version("bottle") == a
    store.activate("bottle", b, expected=a)
    assert store.active_version("bottle") == b
    store.activate("bottle", a)  # no precondition: last writer wins
    assert store.active_version("bottle") == a


def test_racing_writers_exactly_one_wins(backend):
    """Writers (each with its own store object, as separate nodes) race to move the pointer away from the
    version they all read; exactly one wins, every other one gets ActivationConflict."""
    store = backend.store()
    writers = 4
    versions = [store.save("bottle", tiny_bank(rows=10 + i), activate=False) for i in range(writers + 1)]
    stores = [backend.store() for _ in range(writers)]
    current = versions[0]
    store.activate("bottle", current)
    for _round in range(4):
        candidates = [v for v in versions if v != current]
        barrier = threading.Barrier(writers)
        won, lost, other = [], [], []

        def race(i, expected=current, candidates=candidates):
            barrier.wait()
            try:
                stores[i].activate("bottle", candidates[i], expected=expected)
                won.append(candidates[i])
            except ActivationConflict as exc:
                lost.append(exc)
            except Exception as exc:  # any other outcome fails the test below
                other.append(exc)

        threads = [threading.Thread(target=race, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not other, other
        assert len(won) == 1 and len(lost) == writers - 1, (won, lost)
        assert all(exc.expected == current and exc.actual == won[0] for exc in lost)
        assert backend.store().active_version("bottle") == won[0]
        current = won[0]


def test_unconditional_activations_are_atomic(backend):
    store = backend.store()
    candidates = [store.save("bottle", tiny_bank(rows=10 + i), activate=False) for i in range(4)]
    stores = [backend.store() for _ in candidates]
    barrier = threading.Barrier(len(candidates))
    errors = []

    def activate(i):
        barrier.wait()
        try:
            for _ in range(3):
                stores[i].activate("bottle", candidates[i])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=activate, args=(i,)) for i in range(len(candidates))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    version, bank = backend.store().load("bottle")
    assert version in candidates and bank.size == 10 + candidates.index(version)


# --------------------------------------------------------------------------- corrupt objects, broken pointers
def test_corrupt_objects_are_refused(backend):
    store = backend.store()
    version = store.save("bottle", tiny_bank())
    backend.corrupt("bottle", version, "features.npy")
    with pytest.raises(BankCorrupt, match="checksum") as refused:
        backend.store().load("bottle")
    assert f"bottle/{version}" in str(refused.value)
    _no_paths(str(refused.value), backend)

    other = store.save("tile", tiny_bank())
    backend.replace("tile", other, "manifest.json", b"{not json")
    with pytest.raises(BankCorrupt) as refused:
        backend.store().load("tile", other)
    _no_paths(str(refused.value), backend)


@pytest.mark.parametrize("pointer", [b"", b"\n", b"garbage", b"\xff\xfe", b"../../etc/passwd"])
def test_unreadable_pointer_is_refused_never_guessed(backend, pointer):
    store = backend.store()
    old = store.save("bottle", tiny_bank(rows=50))
    store.save("bottle", tiny_bank(rows=60))
    store.activate("bottle", old)
    backend.write_pointer_raw("bottle", pointer)  # e.g. an empty ACTIVE after a rollback
    fresh = backend.store()
    with pytest.raises(BrokenActivePointer, match="activate a version") as refused:
        fresh.load("bottle")
    _no_paths(str(refused.value), backend)
    with pytest.raises(BrokenActivePointer):
        fresh.active_version("bottle")
    with pytest.raises(ActivationConflict):
        fresh.activate("bottle", old, expected=old)
    fresh.activate("bottle", old)  # an unconditional activation repairs it
    assert fresh.load("bottle")[0] == old


def test_pointer_to_missing_version_is_refused(backend):
    store = backend.store()
    old = store.save("bottle", tiny_bank(rows=50))
    new = store.save("bottle", tiny_bank(rows=60))
    backend.point_to("bottle", MISSING_VERSION)
    with pytest.raises(BrokenActivePointer, match="does not exist"):
        backend.store().load("bottle")
    store.activate("bottle", new)
    backend.remove_version("bottle", new)  # the active version's files vanish behind the store's back
    fresh = backend.store()
    with pytest.raises(BrokenActivePointer, match="does not exist") as refused:
        fresh.load("bottle")
    assert new in str(refused.value)
    with pytest.raises(BrokenActivePointer):
        fresh.active_version("bottle")
    assert fresh.versions("bottle") == [old]


# --------------------------------------------------------------------------- outages
def test_store_unreachable_at_start_then_back(backend):
    store = backend.store()
    version = store.save("bottle", tiny_bank())
    backend.down()
    try:
        down = backend.store()  # creating a store never needs the store
        with pytest.raises(StoreUnavailable):
            down.ping()
        with pytest.raises(StoreUnavailable):
            down.load("bottle")
        with pytest.raises(StoreUnavailable):
            down.products()
        with pytest.raises(StoreUnavailable):
            store.activate("bottle", version)
    finally:
        backend.up()
    down.ping()
    assert down.load("bottle")[0] == version
    assert down.save("bottle", tiny_bank(rows=5)) in down.versions("bottle")


def test_a_save_whose_activation_fails_leaves_no_version(backend, monkeypatch):
    """A pointer write that fails (a full disk, an outage) must not leave a whole version that
    no pointer names: the build reports that nothing was written."""
    store = backend.store()
    first = store.save("bottle", tiny_bank())

    def refused(self, product, version, expected=None):
        raise InsufficientStorage(f"no space left to activate {product}/{version}")

    monkeypatch.setattr(type(store), "activate", refused)
    with pytest.raises(InsufficientStorage):
        store.save("bottle", tiny_bank(seed=1))
    monkeypatch.undo()
    fresh = backend.store()
    assert fresh.versions("bottle") == [first] and fresh.active_version("bottle") == first
