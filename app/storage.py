"""Where product banks live. A small interface, so that an S3-compatible store
is a new class, not a rewrite of the service.

LocalBankStore layout (root defaults to ./models):
    <root>/<product>/<version>/manifest.json, features.npy, nominal_scores.npy
    <root>/<product>/ACTIVE            the active version's name (replaced atomically)
Versions are sortable UTC timestamps plus a random suffix; old versions stay on
disk so that an operator can roll back.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from app.core.bank import MemoryBank, load_bank, save_bank
from app.core.errors import BankCorrupt

PRODUCT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION_NAME = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}$")
ACTIVE_FILE = "ACTIVE"


class ProductNotFound(LookupError):
    """No bank (or no such version) is stored for this product."""


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


class BankStore(Protocol):
    def products(self) -> list[str]: ...
    def versions(self, product: str) -> list[str]: ...
    def active_version(self, product: str) -> str | None: ...
    def save(self, product: str, bank: MemoryBank, activate: bool = True) -> str: ...
    def load(self, product: str, version: str | None = None) -> tuple[str, MemoryBank]: ...
    def activate(self, product: str, version: str) -> None: ...
    def delete_product(self, product: str) -> None: ...


def new_version_name() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class LocalBankStore:
    """Banks in a local directory tree; every write is a rename, so readers never see half of one."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def _product_dir(self, product: str) -> Path:
        return self.root / check_product_name(product)

    def products(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and PRODUCT_NAME.fullmatch(p.name) and self.versions(p.name))

    def versions(self, product: str) -> list[str]:
        directory = self._product_dir(product)
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if p.is_dir() and VERSION_NAME.fullmatch(p.name))

    def active_version(self, product: str) -> str | None:
        """The version named in ACTIVE, else the newest one on disk, else None."""
        marker = self._product_dir(product) / ACTIVE_FILE
        try:
            named = marker.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            named = ""
        if VERSION_NAME.fullmatch(named) and (marker.parent / named).is_dir():
            return named
        versions = self.versions(product)
        return versions[-1] if versions else None

    def save(self, product: str, bank: MemoryBank, activate: bool = True) -> str:
        version = new_version_name()
        save_bank(bank, self._product_dir(product) / version)
        if activate:
            self.activate(product, version)
        return version

    def load(self, product: str, version: str | None = None) -> tuple[str, MemoryBank]:
        version = check_version_name(version) if version else self.active_version(product)
        if version is None or not (self._product_dir(product) / version).is_dir():
            raise ProductNotFound(f"no bank {version or ''} for product {product!r}".replace("  ", " "))
        return version, load_bank(self._product_dir(product) / version)

    def activate(self, product: str, version: str) -> None:
        directory = self._product_dir(product)
        if not (directory / check_version_name(version)).is_dir():
            raise ProductNotFound(f"product {product!r} has no version {version!r}")
        fd, tmp = tempfile.mkstemp(prefix=".active-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(version + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, directory / ACTIVE_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete_product(self, product: str) -> None:
        directory = self._product_dir(product)
        if not directory.is_dir():
            raise ProductNotFound(f"no product {product!r}")
        # Rename first so that a crash mid-delete never leaves a half-deleted bank that looks loadable.
        trash = self.root / f".deleted-{product}-{secrets.token_hex(3)}"
        os.rename(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)


__all__ = ["BankCorrupt", "BankStore", "InvalidName", "InvalidProductName", "LocalBankStore", "ProductNotFound",
           "check_product_name", "check_version_name"]
