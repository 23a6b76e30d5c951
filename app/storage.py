"""Where product banks live: one small typed interface, two implementations.

`BankStore` is what the service and the CLI use. `LocalBankStore` (below) keeps
banks in a local directory; `S3BankStore` (app/storage_s3.py) keeps them in an
S3-compatible object store. `create_store(settings)` picks one.

Rules both stores follow (and tests/storage/test_contract.py checks):
- A version is immutable once saved and invisible until it is complete.
- The active version is exactly what the product's pointer names. A product
  with versions but no pointer has no active version (`NoActiveVersion`); an
  empty, unreadable or dangling pointer is refused (`BrokenActivePointer`).
  Neither store ever guesses "the newest".
- `activate(..., expected=...)` is a compare-and-swap: it changes the pointer
  only if it still names `expected`, else `ActivationConflict`. Without
  `expected` it is last-writer-wins, still atomic (never a torn pointer).
- The active version cannot be deleted (`VersionInUse`).
- Error messages name the product and version, never a server path.

LocalBankStore layout (root defaults to ./models):
    <root>/<product>/<version>/manifest.json, features.npy, nominal_scores.npy
    <root>/<product>/ACTIVE            the active version's name (replaced atomically)
    <root>/.locks/<product>.lock       flock() serialising pointer changes across processes
Versions are sortable UTC timestamps plus a random suffix; old versions stay
until deleted so that an operator can roll back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Final, Literal, Protocol

from app.core.bank import MemoryBank, load_bank, process_umask, save_bank
from app.core.errors import BankCorrupt, BankIncompatible

logger = logging.getLogger(__name__)

PRODUCT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION_NAME = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}$")
ACTIVE_FILE = "ACTIVE"
LOCKS_DIR = ".locks"
# Debris a killed process can leave: half-written banks, half-deleted products, pointer temp files.
DEBRIS_PREFIXES = (".tmp-", ".deleted-", ".active-")
# Debris younger than this may belong to a save still running in another process.
DEFAULT_STALE_AFTER_S = 300.0
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


# --------------------------------------------------------------------------- errors
class StoreError(Exception):
    """Base class of the errors a bank store raises on purpose."""


class ProductNotFound(LookupError):
    """No bank (or no such version) is stored for this product."""


class VersionNotFound(ProductNotFound):
    """The product exists but has no version of that name."""


class NoActiveVersion(StoreError, LookupError):
    """The product has versions but none was ever activated (or its pointer was removed)."""


class BrokenActivePointer(StoreError, BankCorrupt):
    """The product's active pointer is empty, unreadable or names a version that does not exist."""


class ActivationConflict(StoreError):
    """A compare-and-swap activation lost: the pointer no longer names the expected version."""

    def __init__(self, message: str, *, product: str, expected: str | None, actual: str | None):
        super().__init__(message)
        self.product = product
        self.expected = expected
        self.actual = actual


class VersionInUse(StoreError):
    """The version is the product's active one and cannot be deleted."""


class InsufficientStorage(StoreError):
    """The store ran out of space (disk full or quota); partial files were removed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (endpoint down, bucket or directory missing, access denied)."""


class InvalidName(ValueError):
    """A product or version name outside the allowed pattern (also guards path traversal)."""


class InvalidProductName(InvalidName):
    """The one product-name rule, shared by the store, the service and the CLI."""


def check_product_name(product: str) -> str:
    if not isinstance(product, str) or not PRODUCT_NAME.fullmatch(product):
        shown = product[:80] if isinstance(product, str) else type(product).__name__
        raise InvalidProductName(f"invalid product name {shown!r}: expected {PRODUCT_NAME.pattern}")
    return product


def check_version_name(version: str) -> str:
    if not isinstance(version, str) or not VERSION_NAME.fullmatch(version):
        raise InvalidName(f"version {version!r} is not a bank version name")
    return version


def new_version_name() -> str:
    """`YYYYmmddTHHMMSSZ-mmmrrr`: the suffix's first three hex digits are the milliseconds, so
    versions saved within one second still sort oldest first ("versions" promises that order),
    and the last three are random, so two saves in one millisecond do not collide."""
    now = datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{now.microsecond // 1000:03x}{secrets.token_hex(2)[:3]}"


class _Unset(Enum):
    ANY = "any"


# `activate(..., expected=ANY)`: no precondition (last writer wins).
ANY: Final = _Unset.ANY
Expected = str | None | Literal[_Unset.ANY]


def activate_or_discard(store: BankStore, product: str, version: str) -> None:
    """Activate a version just saved; when that fails (a full disk for the pointer), remove the
    version again, so a failed build leaves nothing behind: no unused version, and no first
    version of a new product that no pointer names. A version the pointer does name after all
    (an answer lost on the way back) is refused by delete_version and stays."""
    try:
        store.activate(product, version)
    except BaseException:
        try:
            store.delete_version(product, version)
        except Exception as exc:  # noqa: BLE001 - the activation's error is the one to report
            logger.warning("could not remove %s/%s after its activation failed: %s", product, version, exc)
        raise


# --------------------------------------------------------------------------- interface
class BankStore(Protocol):
    """Versions of each product's bank and a pointer to the active one."""

    def ping(self) -> None:
        """Raise StoreUnavailable unless the store can be read and written now (readiness)."""

    def products(self) -> list[str]:
        """Products that have at least one complete version, sorted."""

    def versions(self, product: str) -> list[str]:
        """The product's complete versions, oldest first; [] for an unknown product."""

    def active_version(self, product: str) -> str | None:
        """The version the pointer names; None when there is no pointer.

        Raises BrokenActivePointer for an empty, unreadable or dangling pointer.
        """

    def save(self, product: str, bank: MemoryBank, activate: bool = True) -> str:
        """Store `bank` as a new immutable version and return its name; activate it (last writer wins)."""

    def load(self, product: str, version: str | None = None) -> tuple[str, MemoryBank]:
        """Load and verify a version (the active one by default)."""

    def activate(self, product: str, version: str, expected: Expected = ANY) -> None:
        """Point the product at `version`; with `expected`, only if the pointer still names it.

        `expected=None` means "only if the product has no pointer yet".
        Raises VersionNotFound, or ActivationConflict when the compare-and-swap loses.
        """

    def delete_version(self, product: str, version: str) -> None:
        """Delete one version; VersionInUse if it is the active one."""

    def delete_product(self, product: str) -> None:
        """Delete every version and the pointer of a product."""


class StoreSettings(Protocol):
    """What `create_store` reads from the service settings (kept structural: no service import here)."""

    @property
    def store(self) -> Literal["local", "s3"]: ...
    @property
    def models_dir(self) -> Path: ...
    @property
    def s3_endpoint_url(self) -> str | None: ...
    @property
    def s3_bucket(self) -> str | None: ...
    @property
    def s3_prefix(self) -> str: ...
    @property
    def s3_region(self) -> str | None: ...
    @property
    def s3_cache_dir(self) -> Path | None: ...
    @property
    def s3_cache_max_mb(self) -> float: ...


def create_store(settings: StoreSettings) -> BankStore:
    """The store the settings ask for. Never touches the network: call `ping()` for readiness."""
    if settings.store == "s3":
        from app.storage_s3 import S3BankStore

        if not settings.s3_bucket:
            raise ValueError("PATCHCORE_STORE=s3 needs PATCHCORE_S3_BUCKET")
        cache_dir = settings.s3_cache_dir or settings.models_dir / ".s3-cache"
        return S3BankStore(bucket=settings.s3_bucket, prefix=settings.s3_prefix,
                           endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                           cache_dir=cache_dir,
                           cache_max_bytes=int(settings.s3_cache_max_mb * 1024 * 1024))
    return LocalBankStore(settings.models_dir)


# --------------------------------------------------------------------------- helpers shared by both stores
def is_no_space(exc: BaseException) -> bool:
    if not isinstance(exc, OSError):
        return False
    if exc.errno in NO_SPACE_ERRNOS:
        return True
    # numpy's tofile() reports a short write as "N requested and M written" without an errno;
    # on a local file that is a full disk or quota.
    message = str(exc)
    return exc.errno is None and "requested and" in message and "written" in message


def relabel(exc: BankCorrupt | BankIncompatible, directory: Path, label: str) -> Exception:
    """The same error naming product/version instead of the directory it was read from (a cache or
    temporary directory for S3), and never a server path."""
    message = str(exc).replace(str(directory), f"bank {label}").replace(f"bank {directory.name}", f"bank {label}")
    return type(exc)(message)


def load_verified(directory: Path, label: str) -> MemoryBank:
    """load_bank with messages that say product/version instead of the directory."""
    try:
        return load_bank(directory)
    except (BankCorrupt, BankIncompatible) as exc:
        raise relabel(exc, directory, label) from None
    except OSError as exc:
        raise BankCorrupt(f"bank {label}: unreadable ({exc.strerror or type(exc).__name__})") from None


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            with contextlib.suppress(OSError):
                newest = max(newest, child.lstat().st_mtime)
    return newest


def sweep_debris(directory: Path, stale_after_s: float) -> int:
    """Remove `.tmp-*`, `.deleted-*` and `.active-*` entries older than `stale_after_s`; return how many."""
    removed = 0
    if not directory.is_dir():
        return 0
    now = time.time()
    for entry in directory.iterdir():
        if not entry.name.startswith(DEBRIS_PREFIXES):
            continue
        try:
            if now - _newest_mtime(entry) < stale_after_s:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("could not remove stale store debris %s: %s", entry.name, exc)
    return removed


# --------------------------------------------------------------------------- local directory store
class LocalBankStore:
    """Banks in a local directory tree; every write is a rename, so readers never see half of one.

    Pointer changes and deletes of one product are serialised by an flock() on a
    lock file, so the compare-and-swap holds across threads and processes of one host.
    """

    def __init__(self, root: Path | str, *, stale_after_s: float = DEFAULT_STALE_AFTER_S):
        self.root = Path(root)
        self.stale_after_s = stale_after_s
        with contextlib.suppress(OSError):
            self.root.mkdir(parents=True, exist_ok=True)
            self.sweep()

    def _require_root(self) -> None:
        # A root that vanished (unmounted volume) is an outage, not "no products".
        if not self.root.is_dir():
            raise StoreUnavailable("the bank directory is missing")

    def sweep(self, stale_after_s: float | None = None) -> int:
        """Remove debris that killed processes left (half-saved banks, half-deleted products)."""
        age = self.stale_after_s if stale_after_s is None else stale_after_s
        if not self.root.is_dir():
            return 0
        removed = sweep_debris(self.root, age)
        for product in self.root.iterdir():
            if product.is_dir() and PRODUCT_NAME.fullmatch(product.name):
                removed += sweep_debris(product, age)
        if removed:
            logger.info("removed %d stale temporary entries from the bank store", removed)
        return removed

    def ping(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreUnavailable("the bank directory is missing or not writable")

    def _product_dir(self, product: str) -> Path:
        check_product_name(product)
        self._require_root()
        return self.root / product

    @contextlib.contextmanager
    def _locked(self, product: str) -> Iterator[None]:
        self._require_root()
        locks = self.root / LOCKS_DIR
        try:
            locks.mkdir(exist_ok=True)
            fd = os.open(locks / f"{check_product_name(product)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if is_no_space(exc):
                raise InsufficientStorage("no space left in the bank store") from None
            raise StoreUnavailable(f"cannot lock product {product!r} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def products(self) -> list[str]:
        self._require_root()
        found = []
        for path in self.root.iterdir():
            if not (PRODUCT_NAME.fullmatch(path.name) and path.is_dir()):
                continue
            try:
                if self.versions(path.name):
                    found.append(path.name)
            except OSError as exc:
                # One folder this process cannot read (written by another user with a strict
                # umask) must not take every other product down with it.
                logger.error("skipping product %s: its folder cannot be read (%s)", path.name,
                             exc.strerror or type(exc).__name__, extra={"product": path.name})
        return sorted(found)

    def versions(self, product: str) -> list[str]:
        directory = self._product_dir(product)
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if p.is_dir() and VERSION_NAME.fullmatch(p.name))

    def _read_pointer(self, product: str) -> str | None:
        """The raw pointer: None when there is no ACTIVE file; BrokenActivePointer when it is not a version name."""
        marker = self._product_dir(product) / ACTIVE_FILE
        try:
            named = marker.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            raise BrokenActivePointer(f"product {product!r}: the active pointer is unreadable; "
                                      "activate a version to repair it") from None
        if not VERSION_NAME.fullmatch(named):
            raise BrokenActivePointer(f"product {product!r}: the active pointer is empty or not a version name"
                                      "; activate a version to repair it")
        return named

    def active_version(self, product: str) -> str | None:
        named = self._read_pointer(product)
        if named is not None and not (self._product_dir(product) / named).is_dir():
            raise BrokenActivePointer(f"product {product!r}: the active pointer names version {named!r}, "
                                      "which does not exist; activate a version to repair it")
        return named

    def save(self, product: str, bank: MemoryBank, activate: bool = True) -> str:
        version = new_version_name()
        try:
            save_bank(bank, self._product_dir(product) / version)
        except OSError as exc:  # save_bank has removed its temporary directory
            if is_no_space(exc):
                raise InsufficientStorage(f"not enough disk space to save a bank for product {product!r}") from None
            raise
        if activate:
            activate_or_discard(self, product, version)
        return version

    def load(self, product: str, version: str | None = None) -> tuple[str, MemoryBank]:
        if version is None:
            version = self.active_version(product)
            if version is None:
                if self.versions(product):
                    raise NoActiveVersion(f"product {product!r} has versions but none is active; activate one")
                raise ProductNotFound(f"no bank for product {product!r}")
        else:
            check_version_name(version)
            if not (self._product_dir(product) / version).is_dir():
                raise VersionNotFound(f"product {product!r} has no version {version!r}")
        directory = self._product_dir(product) / version
        try:
            return version, load_verified(directory, f"{product}/{version}")
        except BankCorrupt:
            if not directory.is_dir():  # deleted while it was read: gone, not damaged
                raise VersionNotFound(f"product {product!r} has no version {version!r} "
                                      "(deleted while it was being read)") from None
            raise

    def activate(self, product: str, version: str, expected: Expected = ANY) -> None:
        directory = self._product_dir(product)
        check_version_name(version)
        if expected not in (ANY, None):
            check_version_name(str(expected))
        with self._locked(product):
            if not (directory / version).is_dir():
                raise VersionNotFound(f"product {product!r} has no version {version!r}")
            if expected is not ANY:
                try:
                    current = self._read_pointer(product)
                except BrokenActivePointer:
                    current = "(broken)"
                if current != expected:
                    raise ActivationConflict(
                        f"product {product!r}: the active version is {current!r}, not {expected!r}",
                        product=product, expected=expected, actual=current)
            self._write_pointer(directory, product, version)

    def _write_pointer(self, directory: Path, product: str, version: str) -> None:
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".active-", dir=directory)
            os.fchmod(fd, 0o666 & ~process_umask())  # mkstemp's 0600 would hide it from other uids
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(version + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, directory / ACTIVE_FILE)
            tmp = None
        except OSError as exc:
            if is_no_space(exc):
                raise InsufficientStorage(f"no space left to activate {product}/{version}") from None
            raise
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def delete_version(self, product: str, version: str) -> None:
        check_version_name(version)
        directory = self._product_dir(product)
        with self._locked(product):
            if not (directory / version).is_dir():
                raise VersionNotFound(f"product {product!r} has no version {version!r}")
            try:
                active = self._read_pointer(product)
            except BrokenActivePointer:
                active = None
            if active == version:
                raise VersionInUse(f"{product}/{version} is the active version; activate another one first")
            trash = directory / f".deleted-{version}-{secrets.token_hex(3)}"
            os.rename(directory / version, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def delete_product(self, product: str) -> None:
        directory = self._product_dir(product)
        with self._locked(product):
            if not directory.is_dir():
                raise ProductNotFound(f"no product {product!r}")
            # Rename first so that a crash mid-delete never leaves a half-deleted bank that looks loadable.
            trash = self.root / f".deleted-{product}-{secrets.token_hex(3)}"
            os.rename(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)


__all__ = ["ANY", "ActivationConflict", "BankCorrupt", "BankStore", "BrokenActivePointer", "Expected",
           "InsufficientStorage", "InvalidName", "InvalidProductName", "LocalBankStore", "NoActiveVersion",
           "ProductNotFound",
           "StoreError", "StoreSettings", "StoreUnavailable", "VersionInUse", "VersionNotFound",
           "check_product_name", "check_version_name", "create_store", "new_version_name"]
