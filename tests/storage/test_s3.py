"""S3BankStore beyond the contract: the local cache, the manifest checksum in the pointer, the
conditional-write self-check, settings, and that the test server listens on loopback only."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from app.core.errors import BankCorrupt
from app.service.settings import Settings
from app.storage import StoreUnavailable, create_store

from .conftest import BUCKET, tiny_bank


@pytest.fixture
def make_store(seaweed, tmp_path):
    from app.storage_s3 import S3BankStore

    prefix = f"s3-{uuid.uuid4().hex[:12]}"

    def make(cache: str = "cache", cache_max_bytes: int = 1 << 30) -> S3BankStore:
        return S3BankStore(bucket=BUCKET, prefix=prefix, endpoint_url=seaweed.endpoint_url,
                           session=seaweed.session(), cache_dir=tmp_path / cache, cache_max_bytes=cache_max_bytes)

    make.prefix = prefix
    return make


def _count_gets(store) -> list[str]:
    """Record the keys of every GetObject the store's client sends."""
    keys: list[str] = []
    store._s3.meta.events.register("before-call.s3.GetObject", lambda params, **_: keys.append(params["url_path"]))
    return keys


def test_read_through_cache_serves_repeated_loads_locally(make_store):
    writer = make_store("writer")
    version = writer.save("bottle", tiny_bank(rows=500))
    reader = make_store("reader")
    gets = _count_gets(reader)
    assert reader.load("bottle")[0] == version
    assert sum(key.endswith(".npy") for key in gets) == 2  # first load: both arrays downloaded
    gets.clear()
    assert reader.load("bottle")[1].size == 500
    assert not any(key.endswith(".npy") for key in gets), gets  # second load: pointer + manifest only
    entry = next((reader.cache.root / "bottle").iterdir())
    assert entry.name.startswith(version) and sorted(p.name for p in entry.iterdir()) == [
        "features.npy", "manifest.json", "nominal_scores.npy"]
    # The node that saved a bank has it cached already.
    writer_gets = _count_gets(writer)
    writer.load("bottle")
    assert not any(key.endswith(".npy") for key in writer_gets)


def test_cache_is_bounded_least_recently_used_out_first(make_store):
    writer = make_store("writer")
    versions = [writer.save(name, tiny_bank(rows=1000)) for name in ("a", "b", "c")]
    one_bank = 1000 * 8 * 4 + 2000  # features + manifest and scores, roughly
    reader = make_store("reader", cache_max_bytes=int(2.5 * one_bank))
    reader.load("a")
    reader.load("b")
    reader.load("a")  # a is now more recently used than b
    reader.load("c")  # three do not fit: b goes
    cached = {entry.parent.name for _, _, entry in reader.cache.entries()}
    assert cached == {"a", "c"}, cached
    assert reader.cache.size() <= reader.cache.max_bytes
    assert [reader.load(name)[0] for name in ("a", "b", "c")] == versions  # b comes back from S3


def test_corrupt_cache_entry_is_fetched_again(make_store):
    version = make_store("writer").save("bottle", tiny_bank())
    reader = make_store("reader")
    reader.load("bottle")
    features = next((reader.cache.root / "bottle").iterdir()) / "features.npy"
    data = bytearray(features.read_bytes())
    data[-1] ^= 0xFF
    features.write_bytes(bytes(data))
    assert reader.load("bottle")[0] == version
    assert features.read_bytes() != bytes(data)


def test_manifest_changed_after_activation_is_refused(make_store, seaweed):
    store = make_store()
    version = store.save("bottle", tiny_bank())
    key = f"{make_store.prefix}/banks/bottle/{version}/manifest.json"
    client = seaweed.client()
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    manifest["calibration"]["threshold"] = 99.0  # still valid JSON, arrays untouched
    client.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(manifest).encode())
    with pytest.raises(BankCorrupt, match="manifest checksum"):
        make_store("other").load("bottle")
    # The service loads the version the pointer names by its name: guarded the same way.
    with pytest.raises(BankCorrupt, match="manifest checksum"):
        make_store("third").load("bottle", version)


def test_a_save_whose_manifest_answer_was_lost_leaves_no_version(make_store):
    """The server stored the manifest but the client timed out: the version must not stay
    listed without its arrays (the cleanup once deleted only what had answered)."""
    from botocore.exceptions import ReadTimeoutError

    store = make_store()
    real_put = store._s3.put_object

    def put_then_lose_the_answer(**kwargs):
        answer = real_put(**kwargs)
        if kwargs["Key"].endswith("manifest.json"):
            raise ReadTimeoutError(endpoint_url=kwargs["Key"])
        return answer

    store._s3.put_object = put_then_lose_the_answer
    with pytest.raises(StoreUnavailable):
        store.save("bottle", tiny_bank())
    reader = make_store("reader")
    assert reader.versions("bottle") == [] and "bottle" not in reader.products()


def test_server_that_ignores_conditional_writes_is_refused(make_store):
    store = make_store()
    store.ping()  # SeaweedFS honours If-None-Match / If-Match
    careless = make_store("careless")
    real_put = careless._s3.put_object

    def put_ignoring_conditions(**kwargs):
        kwargs.pop("IfMatch", None)
        kwargs.pop("IfNoneMatch", None)
        return real_put(**kwargs)

    careless._s3.put_object = put_ignoring_conditions
    with pytest.raises(StoreUnavailable, match="conditional writes"):
        careless.ping()


def test_missing_bucket_and_bad_credentials_are_unavailable(seaweed, tmp_path):
    from app.storage_s3 import S3BankStore

    missing = S3BankStore(bucket="no-such-bucket-here", endpoint_url=seaweed.endpoint_url,
                          session=seaweed.session(), cache_dir=tmp_path / "c1", max_attempts=1)
    with pytest.raises(StoreUnavailable):
        missing.ping()
    # Every read says so too, not "no such product / version" (a 404 a client takes as final).
    for read in (lambda: missing.active_version("bottle"), lambda: missing.load("bottle", "20260101T000000Z-abcdef"),
                 lambda: missing.activate("bottle", "20260101T000000Z-abcdef")):
        with pytest.raises(StoreUnavailable):
            read()
    import boto3

    wrong = S3BankStore(bucket=BUCKET, endpoint_url=seaweed.endpoint_url, cache_dir=tmp_path / "c2",
                        session=boto3.session.Session(aws_access_key_id="nobody", aws_secret_access_key="wrong"),
                        region="us-east-1", max_attempts=1)
    with pytest.raises(StoreUnavailable):
        wrong.ping()


def test_create_store_reads_settings_and_aws_variables(seaweed, tmp_path, monkeypatch):
    from app.storage_s3 import S3BankStore

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    settings = Settings(store="s3", s3_endpoint_url=seaweed.endpoint_url, s3_bucket=BUCKET,
                        s3_prefix=f"settings-{uuid.uuid4().hex[:8]}/", models_dir=tmp_path / "models",
                        s3_cache_max_mb=1)
    store = create_store(settings)
    assert isinstance(store, S3BankStore)
    assert store.cache.root == tmp_path / "models" / ".s3-cache" and store.cache.max_bytes == 1 << 20
    store.ping()
    version = store.save("bottle", tiny_bank())
    assert store.load("bottle")[0] == version


def _listening_addresses(pid: int) -> list[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name if hasattr(fd, "readlink") else ""
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6", "/proc/net/udp", "/proc/net/udp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode in inodes and (state == "0A" or "udp" in table):  # 0A = LISTEN
                found.append(f"{table.rsplit('/', 1)[1]} {local}")
    return found


def test_seaweed_listens_on_loopback_only(seaweed):
    """Every socket the weed server listens on is 127.0.0.1 (0100007F in /proc/net); none on all interfaces."""
    pid = seaweed.pid
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists() and children.read_text().split():  # pid is `timeout`; the server is its child
        pid = int(children.read_text().split()[0])
    listening = _listening_addresses(pid)
    assert len(listening) >= 8, listening  # master, volume, filer, s3: http + grpc each
    assert all(entry.split()[1].startswith("0100007F:") for entry in listening), listening


@pytest.mark.parametrize("create", [False, True], ids=["if-match", "if-none-match"])
def test_seaweed_conditional_put_has_one_winner(seaweed, create):
    """The server-side fact the S3 store's CAS rests on: of 8 concurrent conditional PUTs, exactly one wins."""
    import threading

    from botocore.exceptions import ClientError

    clients = [seaweed.client() for _ in range(8)]
    for round_ in range(10):
        key = f"cas-probe-{uuid.uuid4().hex}/{round_}"
        condition = {"IfNoneMatch": "*"}
        if not create:
            condition = {"IfMatch": clients[0].put_object(Bucket=BUCKET, Key=key, Body=b"start")["ETag"]}
        barrier = threading.Barrier(len(clients))
        winners, refused = [], []

        def put(i):
            barrier.wait()
            try:
                clients[i].put_object(Bucket=BUCKET, Key=key, Body=f"writer {i}".encode(), **condition)
                winners.append(i)
            except ClientError as exc:
                refused.append(exc.response["ResponseMetadata"]["HTTPStatusCode"])

        threads = [threading.Thread(target=put, args=(i,)) for i in range(len(clients))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(winners) == 1 and refused == [412] * 7, (winners, refused)
        body = clients[0].get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert body == f"writer {winners[0]}".encode()
