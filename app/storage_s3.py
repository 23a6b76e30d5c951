"""Banks in S3-compatible object storage (AWS S3, MinIO, SeaweedFS), with a local read-through cache.

Layout under `<prefix>banks/<product>/`:
    <version>/features.npy, nominal_scores.npy    immutable; uploaded first
    <version>/manifest.json                       uploaded last: a version exists once its manifest does
    ACTIVE                                        JSON pointer {"version", "manifest_sha256", ...}

The bank files are exactly app.core.bank's (JSON manifest + .npy with sha256
in the manifest; arrays load with allow_pickle=False). The pointer also records
the manifest's sha256, so a reader checks the whole chain: pointer -> manifest
-> arrays, and refuses a corrupt object or a pointer to a missing version.

The pointer only changes by compare-and-swap: a conditional PUT with
`If-Match: <etag it read>` (or `If-None-Match: *` when there is none yet). A
lost race (412) is retried for last-writer-wins activations and reported as
ActivationConflict when the caller named the version it expected. `ping()`
checks once that the server really refuses a conditional write that should
fail, and reports the store unavailable if it does not: a server that ignores
the headers would turn every race into a silent overwrite.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.core.bank import ARRAYS, MANIFEST, MemoryBank, save_bank
from app.core.errors import BankCorrupt
from app.storage import (
    ACTIVE_FILE,
    ANY,
    DEFAULT_STALE_AFTER_S,
    PRODUCT_NAME,
    VERSION_NAME,
    ActivationConflict,
    BrokenActivePointer,
    Expected,
    InsufficientStorage,
    NoActiveVersion,
    ProductNotFound,
    StoreError,
    StoreUnavailable,
    VersionInUse,
    VersionNotFound,
    activate_or_discard,
    check_product_name,
    check_version_name,
    is_no_space,
    load_verified,
    new_version_name,
    sweep_debris,
)

logger = logging.getLogger(__name__)

BANK_FILES = (*ARRAYS.values(), MANIFEST)
# Client errors that mean "this store cannot serve now", not "this object is bad".
_UNAVAILABLE_CODES = frozenset({
    "NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "AllAccessDisabled", "ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout",
})
_NO_SPACE_CODES = frozenset({"QuotaExceeded", "XMinioStorageFull", "InsufficientStorage", "EntityTooLarge"})
_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _error_code(exc: Exception) -> tuple[str, int]:
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_missing(exc: Exception) -> bool:
    code, status = _error_code(exc)
    if code == "NoSuchBucket":  # the store is gone or misnamed: unavailable, not an absent object
        return False
    return code in ("NoSuchKey", "404", "NotFound") or status == 404


def _is_conflict(exc: Exception) -> bool:
    code, status = _error_code(exc)
    return code in _CONFLICT_CODES or status in (409, 412)


@dataclass(frozen=True)
class _Pointer:
    exists: bool
    etag: str | None = None
    version: str | None = None
    manifest_sha256: str | None = None

    @property
    def broken(self) -> bool:
        return self.exists and self.version is None

    def describe(self) -> str | None:
        """What the pointer names, for conflict reports."""
        if not self.exists:
            return None
        return self.version if self.version is not None else "(broken)"


def _parse_pointer(body: bytes, etag: str) -> _Pointer:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return _Pointer(True, etag)
    if not isinstance(doc, dict):
        return _Pointer(True, etag)
    version, sha = doc.get("version"), doc.get("manifest_sha256")
    if not (isinstance(version, str) and VERSION_NAME.fullmatch(version)
            and isinstance(sha, str) and len(sha) == 64):
        return _Pointer(True, etag)
    return _Pointer(True, etag, version, sha)


# --------------------------------------------------------------------------- local read-through cache
class BankCache:
    """Bank files of recently loaded versions on local disk, bounded in bytes, least recently used out first.

    An entry is `<root>/<product>/<version>-<manifest sha256[:16]>/` with the
    three bank files; it is written to a `.tmp-*` directory and renamed into
    place, so a crash leaves no half entry. Every load verifies the checksums;
    a corrupt entry is dropped and fetched again.
    """

    def __init__(self, root: Path | str, max_bytes: int, *, stale_after_s: float = DEFAULT_STALE_AFTER_S):
        self.root = Path(root)
        self.max_bytes = max(0, int(max_bytes))
        with contextlib.suppress(OSError):
            self.root.mkdir(parents=True, exist_ok=True)
            sweep_debris(self.root, stale_after_s)

    def entry(self, product: str, version: str, manifest_sha256: str) -> Path:
        return self.root / product / f"{version}-{manifest_sha256[:16]}"

    def load(self, product: str, version: str, manifest: bytes,
             download: Callable[[str, Path], None]) -> MemoryBank:
        label = f"{product}/{version}"
        entry = self.entry(product, version, _sha256(manifest))
        if entry.is_dir():
            try:
                bank = load_verified(entry, label)
            except BankCorrupt as exc:  # evicted by another process meanwhile, or damaged on disk
                logger.warning("dropping cached bank %s: %s", label, exc)
                self._remove(entry)
            else:
                with contextlib.suppress(OSError):
                    os.utime(entry)  # most recently used
                return bank
        tmp = self._tmpdir(label)
        try:
            (tmp / MANIFEST).write_bytes(manifest)
            for filename in ARRAYS.values():
                download(filename, tmp / filename)
            bank = load_verified(tmp, label)  # checks every sha256 before the entry becomes visible
            self._install(tmp, entry)
        except OSError as exc:
            if is_no_space(exc):
                raise InsufficientStorage(f"not enough space in the local bank cache for {label}") from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.evict()
        return bank

    def adopt(self, product: str, version: str, directory: Path) -> None:
        """Take a bank directory this node just wrote (after a save), instead of downloading it later."""
        manifest = (directory / MANIFEST).read_bytes()
        self._install(directory, self.entry(product, version, _sha256(manifest)))
        self.evict()

    def _tmpdir(self, label: str) -> Path:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        except OSError as exc:
            if is_no_space(exc):
                raise InsufficientStorage(f"not enough space in the local bank cache for {label}") from None
            raise

    def _install(self, source: Path, entry: Path) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(source, entry)
        except OSError:
            if not entry.is_dir():  # another thread or process installed the same entry first: keep theirs
                raise

    def _remove(self, entry: Path) -> None:
        trash = self.root / f".tmp-evict-{secrets.token_hex(4)}"
        try:
            os.rename(entry, trash)  # gone in one step for concurrent readers
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, directory) of every entry."""
        found = []
        if not self.root.is_dir():
            return []
        for product in self.root.iterdir():
            if not (product.is_dir() and PRODUCT_NAME.fullmatch(product.name)):
                continue
            for entry in product.iterdir():
                try:
                    size = sum(f.stat().st_size for f in entry.iterdir())
                    found.append((entry.stat().st_mtime, size, entry))
                except OSError:
                    continue
        return found

    def size(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self) -> None:
        entries = sorted(self.entries(), key=lambda item: item[0])
        total = sum(size for _, size, _ in entries)
        for _, size, entry in entries:
            if total <= self.max_bytes:
                break
            self._remove(entry)
            total -= size

    def drop(self, product: str, version: str | None = None) -> None:
        """Remove a product's (or one version's) entries, after a delete."""
        directory = self.root / product
        if not directory.is_dir():
            return
        for entry in list(directory.iterdir()):
            if version is None or entry.name.startswith(f"{version}-"):
                self._remove(entry)


# --------------------------------------------------------------------------- the store
class S3BankStore:
    """The BankStore protocol on an S3-compatible bucket (boto3). Thread-safe: one boto3 client, no shared state."""

    def __init__(self, *, bucket: str, cache_dir: Path | str, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None, cache_max_bytes: int = 2 << 30, session: Any = None,
                 connect_timeout_s: float = 3.0, read_timeout_s: float = 30.0, max_attempts: int = 3,
                 cas_attempts: int = 16):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = (prefix.strip("/") + "/") if prefix.strip("/") else ""
        self.root = f"{self.prefix}banks/"
        self.cas_attempts = cas_attempts
        session = session or boto3.session.Session()
        # Other S3 servers (MinIO, SeaweedFS): buckets by path, not by host name, and no default CRC
        # trailers (older ones reject them); our own sha256 in the manifest and pointer protects the data.
        compatible = {"s3": {"addressing_style": "path"}, "request_checksum_calculation": "when_required",
                      "response_checksum_validation": "when_required"} if endpoint_url else {}
        config = Config(connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
                        retries={"mode": "standard", "max_attempts": max_attempts},
                        max_pool_connections=32, **compatible)
        self._s3 = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        self.cache = BankCache(cache_dir, cache_max_bytes)
        self._conditional_writes_checked = False

    # ------------------------------------------------------------------ S3 calls, errors translated
    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        try:
            yield
        except ClientError as exc:
            code, status = _error_code(exc)
            if code in _NO_SPACE_CODES or status == 507:
                raise InsufficientStorage(f"the object store refused {what}: out of space ({code})") from None
            if code in _UNAVAILABLE_CODES or status in (401, 403) or status >= 500:
                raise StoreUnavailable(f"the object store cannot serve {what} ({code or status})") from None
            if _is_conflict(exc):  # the compare-and-swap handles these itself
                raise
            raise StoreError(f"the object store refused {what} ({code or status})") from None
        except (BotoConnectionError, HTTPClientError, NoCredentialsError) as exc:
            raise StoreUnavailable(f"the object store cannot be reached for {what} ({type(exc).__name__})") from None
        except BotoCoreError as exc:
            raise StoreError(f"object store error during {what} ({type(exc).__name__})") from None

    def _key(self, product: str, *parts: str) -> str:
        return self.root + "/".join((product, *parts))

    def _get(self, key: str, what: str) -> tuple[bytes, str] | None:
        """(body, etag), or None when the object does not exist."""
        from botocore.exceptions import ClientError

        with self._errors(what):
            try:
                response = self._s3.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _is_missing(exc):
                    return None
                raise
            return response["Body"].read(), str(response["ETag"])

    def _list(self, prefix: str, what: str) -> list[str]:
        keys: list[str] = []
        with self._errors(what):
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    def _delete(self, key: str, what: str) -> None:
        with self._errors(what):
            self._s3.delete_object(Bucket=self.bucket, Key=key)

    # ------------------------------------------------------------------ readiness
    def ping(self) -> None:
        from botocore.exceptions import ClientError

        with self._errors(f"bucket {self.bucket!r}"):
            try:
                self._s3.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _is_missing(exc):
                    raise StoreUnavailable(f"bucket {self.bucket!r} does not exist") from None
                raise
        if not self._conditional_writes_checked:
            self._check_conditional_writes()
            self._conditional_writes_checked = True

    def _check_conditional_writes(self) -> None:
        """Refuse to run on a server that ignores If-None-Match / If-Match (it would lose races silently)."""
        from botocore.exceptions import ClientError

        key = f"{self.prefix}.probe/conditional-{secrets.token_hex(8)}"
        try:
            with self._errors("the conditional-write check"):
                first = self._s3.put_object(Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*")
                honoured = []
                for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"00000000000000000000000000000000"'}):
                    try:
                        self._s3.put_object(Bucket=self.bucket, Key=key, Body=b"2", **condition)
                        honoured.append(False)
                    except ClientError as exc:
                        if not _is_conflict(exc):
                            raise
                        honoured.append(True)
                self._s3.put_object(Bucket=self.bucket, Key=key, Body=b"3", IfMatch=first["ETag"])
        finally:
            with contextlib.suppress(Exception):
                self._s3.delete_object(Bucket=self.bucket, Key=key)
        if not all(honoured):
            raise StoreUnavailable("the object store ignores conditional writes (If-None-Match/If-Match); "
                                   "bank activation would not be safe against concurrent writers")

    # ------------------------------------------------------------------ listing
    def products(self) -> list[str]:
        found = set()
        for key in self._list(self.root, "listing products"):
            parts = key[len(self.root):].split("/")
            if len(parts) == 3 and parts[2] == MANIFEST and PRODUCT_NAME.fullmatch(parts[0]) \
                    and VERSION_NAME.fullmatch(parts[1]):
                found.add(parts[0])
        return sorted(found)

    def versions(self, product: str) -> list[str]:
        base = self._key(check_product_name(product), "")
        found = []
        for key in self._list(base, f"listing versions of {product!r}"):
            parts = key[len(base):].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and VERSION_NAME.fullmatch(parts[0]):
                found.append(parts[0])
        return sorted(found)

    # ------------------------------------------------------------------ pointer
    def _read_pointer(self, product: str) -> _Pointer:
        got = self._get(self._key(product, ACTIVE_FILE), f"the active pointer of {product!r}")
        if got is None:
            return _Pointer(False)
        return _parse_pointer(*got)

    def _manifest(self, product: str, version: str) -> bytes | None:
        got = self._get(self._key(product, version, MANIFEST), f"{product}/{version}")
        return None if got is None else got[0]

    def active_version(self, product: str) -> str | None:
        check_product_name(product)
        pointer = self._read_pointer(product)
        if not pointer.exists:
            return None
        version = self._pointed_version(product, pointer)
        if self._manifest(product, version) is None:
            raise self._dangling(product, version)
        return version

    @staticmethod
    def _pointed_version(product: str, pointer: _Pointer) -> str:
        if pointer.version is None:
            raise BrokenActivePointer(f"product {product!r}: the active pointer is empty or unreadable; "
                                      "activate a version to repair it")
        return pointer.version

    @staticmethod
    def _dangling(product: str, version: str) -> BrokenActivePointer:
        return BrokenActivePointer(f"product {product!r}: the active pointer names version {version!r}, "
                                   "which does not exist; activate a version to repair it")

    # ------------------------------------------------------------------ read
    def load(self, product: str, version: str | None = None) -> tuple[str, MemoryBank]:
        check_product_name(product)
        if version is None:
            pointer = self._read_pointer(product)
            if not pointer.exists:
                if self.versions(product):
                    raise NoActiveVersion(f"product {product!r} has versions but none is active; activate one")
                raise ProductNotFound(f"no bank for product {product!r}")
            version = self._pointed_version(product, pointer)
            manifest = self._manifest(product, version)
            if manifest is None:
                raise self._dangling(product, version)
            if _sha256(manifest) != pointer.manifest_sha256:
                raise BankCorrupt(f"bank {product}/{version}: manifest checksum mismatch "
                                  "(the object changed after activation)")
        else:
            check_version_name(version)
            manifest = self._manifest(product, version)
            if manifest is None:
                raise VersionNotFound(f"product {product!r} has no version {version!r}")
            # The service loads the version the pointer names explicitly (registry, watcher,
            # Ray replicas): the pointer's checksum guards that load as well.
            pointer = self._read_pointer(product)
            if pointer.version == version and _sha256(manifest) != pointer.manifest_sha256:
                raise BankCorrupt(f"bank {product}/{version}: manifest checksum mismatch "
                                  "(the object changed after activation)")
        return version, self.cache.load(product, version, manifest, self._downloader(product, version))

    def _downloader(self, product: str, version: str) -> Callable[[str, Path], None]:
        from botocore.exceptions import ClientError

        def download(filename: str, destination: Path) -> None:
            with self._errors(f"{product}/{version}"):
                try:
                    response = self._s3.get_object(Bucket=self.bucket, Key=self._key(product, version, filename))
                except ClientError as exc:
                    if _is_missing(exc):
                        raise BankCorrupt(f"bank {product}/{version}: missing {filename}") from None
                    raise
                with destination.open("wb") as handle:
                    for chunk in response["Body"].iter_chunks(1 << 20):
                        handle.write(chunk)

        return download

    # ------------------------------------------------------------------ write
    def save(self, product: str, bank: MemoryBank, activate: bool = True) -> str:
        check_product_name(product)
        version = new_version_name()
        work = self.cache._tmpdir(f"{product}/{version}")
        directory = work / version
        try:
            try:
                save_bank(bank, directory)
            except OSError as exc:
                if is_no_space(exc):
                    raise InsufficientStorage(f"not enough local disk space to save a bank for {product!r}") \
                        from None
                raise
            # Arrays first, manifest last: until the manifest exists the version is invisible.
            for filename in BANK_FILES:
                key = self._key(product, version, filename)
                # One PUT per file (banks are far below S3's 5 GB limit); the open file lets botocore retry.
                with self._errors(f"saving {product}/{version}"), (directory / filename).open("rb") as handle:
                    self._s3.put_object(Bucket=self.bucket, Key=key, Body=handle)
        except BaseException:
            # Every key of this (new, unique) version, manifest first: a PUT whose answer was
            # lost may still have stored its object, and a manifest left behind would be a
            # listed version without its arrays.
            for filename in reversed(BANK_FILES):
                with contextlib.suppress(Exception):
                    self._s3.delete_object(Bucket=self.bucket, Key=self._key(product, version, filename))
            shutil.rmtree(work, ignore_errors=True)
            raise
        try:
            self.cache.adopt(product, version, directory)
        except OSError as exc:
            logger.warning("could not cache the new bank %s/%s: %s", product, version, exc)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if activate:
            activate_or_discard(self, product, version)
        return version

    def activate(self, product: str, version: str, expected: Expected = ANY) -> None:
        from botocore.exceptions import ClientError

        check_product_name(product)
        check_version_name(version)
        if expected not in (ANY, None):
            check_version_name(str(expected))
        manifest = self._manifest(product, version)
        if manifest is None:
            raise VersionNotFound(f"product {product!r} has no version {version!r}")
        key = self._key(product, ACTIVE_FILE)
        body = json.dumps({"version": version, "manifest_sha256": _sha256(manifest),
                           "activated_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                           # Unique content, so every write gets a new ETag.
                           "nonce": secrets.token_hex(8)}, indent=1).encode()
        for attempt in range(self.cas_attempts):
            pointer = self._read_pointer(product)
            if expected is not ANY and pointer.describe() != expected:
                raise ActivationConflict(
                    f"product {product!r}: the active version is {pointer.describe()!r}, not {expected!r}",
                    product=product, expected=expected, actual=pointer.describe())
            condition = {"IfMatch": pointer.etag} if pointer.exists else {"IfNoneMatch": "*"}
            try:
                with self._errors(f"activating {product}/{version}"):
                    self._s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/json",
                                        **condition)
                return
            except ClientError as exc:
                if not _is_conflict(exc):
                    raise StoreError(f"activating {product}/{version} failed ({_error_code(exc)[0]})") from None
            if expected is not ANY:
                actual = self._read_pointer(product).describe()
                raise ActivationConflict(
                    f"product {product!r}: another writer changed the active version to {actual!r} meanwhile",
                    product=product, expected=expected, actual=actual)
            time.sleep(random.uniform(0, 0.01 * (attempt + 1)))  # noqa: S311 (jitter, not crypto)
        raise ActivationConflict(f"product {product!r}: gave up activating {version!r} after "
                                 f"{self.cas_attempts} lost races", product=product, expected=None,
                                 actual=self._read_pointer(product).describe())

    # ------------------------------------------------------------------ delete
    def delete_version(self, product: str, version: str) -> None:
        check_product_name(product)
        check_version_name(version)
        if self._manifest(product, version) is None:
            raise VersionNotFound(f"product {product!r} has no version {version!r}")
        if self._read_pointer(product).version == version:
            raise VersionInUse(f"{product}/{version} is the active version; activate another one first")
        # Manifest first: the version disappears in one step, then its arrays go.
        for filename in (MANIFEST, *ARRAYS.values()):
            self._delete(self._key(product, version, filename), f"deleting {product}/{version}")
        self.cache.drop(product, version)

    def delete_product(self, product: str) -> None:
        check_product_name(product)
        keys = self._list(self._key(product, ""), f"deleting {product!r}")
        if not keys:
            raise ProductNotFound(f"no product {product!r}")
        pointer = self._key(product, ACTIVE_FILE)
        # Pointer first (nothing is active any more), then manifests (no version is visible), then the rest.
        ordered = sorted(keys, key=lambda k: (k != pointer, not k.endswith("/" + MANIFEST)))
        for key in ordered:
            self._delete(key, f"deleting {product!r}")
        self.cache.drop(product)


__all__ = ["BankCache", "S3BankStore"]
