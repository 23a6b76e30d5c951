"""A product's memory bank on disk: JSON manifest + .npy arrays, written atomically.

Layout of one bank directory:
    manifest.json        format version, embedder, coreset, calibration, sha256 of each array
    manifest.sha256      sha256 of manifest.json (banks saved before stop 20 have none)
    features.npy         (M, D) float32 coreset of nominal patch features
    nominal_scores.npy   (K,) float64 held-out nominal image scores (calibration)
Arrays load with allow_pickle=False; nothing on disk is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core.errors import BankCorrupt, BankIncompatible

# 2 (stop 21): the framing keeps each box's aspect. Software that reads only 1 would load such
# a bank and score every image squeezed to S x S, so a bank that keeps the aspect is written as
# 2 and older software refuses it; a squeezed bank stays 1, which older software still reads.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
# The manifest holds the threshold, framing and smoothing the decision depends on, so it is
# checked like the arrays: one flipped digit of the threshold would otherwise load and pass
# a defect. It cannot hold its own checksum, hence the sidecar.
MANIFEST_CHECKSUM = "manifest.sha256"
ARRAYS = {"features": "features.npy", "nominal_scores": "nominal_scores.npy"}


def format_version_for(manifest: dict[str, Any]) -> int:
    """The oldest bank format that describes this manifest (see FORMAT_VERSION). The framing
    is read where patchcore.bank_framing reads it: the top level, else the stored config."""
    framing = manifest.get("framing")
    if framing is None:
        framing = (manifest.get("config") or {}).get("framing")
    return 2 if isinstance(framing, dict) and framing.get("aspect") == "keep" else 1


@dataclass
class MemoryBank:
    features: np.ndarray                 # (M, D) float32
    nominal_scores: np.ndarray           # (K,) float64
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def embedder(self) -> dict[str, Any]:
        return dict(self.manifest["embedder"])

    @property
    def calibration(self) -> dict[str, Any]:
        return dict(self.manifest["calibration"])

    @property
    def threshold(self) -> float:
        return float(self.manifest["calibration"]["threshold"])

    @property
    def size(self) -> int:
        return int(self.features.shape[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def process_umask() -> int:
    """This process's umask, read without changing it (os.umask sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_bank(bank: MemoryBank, directory: Path | str) -> Path:
    """Write `bank` to `directory`, which must not exist yet.

    Everything goes to a temporary sibling first, is fsynced, then renamed in
    one step: a crash leaves either no bank or a whole one, never half of one.
    """
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"bank version {directory.name} already exists")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    try:
        # mkdtemp makes it 0700: readable by other users (a service running as another uid
        # than the CLI build that wrote it) only as the umask allows, like the files in it.
        os.chmod(tmp, 0o777 & ~process_umask())
        checksums = {}
        arrays: dict[str, np.ndarray] = {"features": np.ascontiguousarray(bank.features, dtype=np.float32),
                  "nominal_scores": np.asarray(bank.nominal_scores, dtype=np.float64)}
        for key, filename in ARRAYS.items():
            path = tmp / filename
            with path.open("wb") as handle:
                np.save(handle, arrays[key], allow_pickle=False)
                handle.flush()
                os.fsync(handle.fileno())
            checksums[filename] = _sha256(path)
        manifest = {**bank.manifest, "format_version": format_version_for(bank.manifest),
                    "bank_size": int(arrays["features"].shape[0]),
                    "feature_dim": int(arrays["features"].shape[1]),
                    "files": checksums}
        with (tmp / MANIFEST).open("w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        with (tmp / MANIFEST_CHECKSUM).open("w", encoding="ascii") as handle:
            handle.write(_sha256(tmp / MANIFEST) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp, directory)
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bank.manifest = manifest
    return directory


def _why(exc: BaseException) -> str:
    """The reason without the file's absolute path (messages reach API clients)."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_manifest_types(manifest: dict, name: str) -> None:
    """BankCorrupt unless the manifest's sections have the types the code reads them as: a
    bank is input like any other, and one wrong type must not escape as an AttributeError
    that stops the server loading the next product."""
    def corrupt(what: str) -> BankCorrupt:
        return BankCorrupt(f"bank {name}, {MANIFEST}: {what}")

    for key in ("embedder", "calibration", "files"):
        if not isinstance(manifest[key], dict):
            raise corrupt(f"{key!r} must be an object")
    for key in ("config", "framing", "coreset", "lineage", "stage_balance"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise corrupt(f"{key!r} must be an object")
    for key in ("feature_dim", "bank_size"):
        if not isinstance(manifest[key], int) or isinstance(manifest[key], bool) or manifest[key] < 0:
            raise corrupt(f"{key!r} must be a count")
    calibration = manifest["calibration"]
    # A NaN threshold would load and never flag anything ("score > NaN" is always false).
    for key in ("threshold", "nominal_median"):
        if not _is_number(calibration.get(key)):
            raise corrupt(f"calibration {key} must be a finite number, got {calibration.get(key)!r}")


def load_bank(directory: Path | str) -> MemoryBank:
    """Load and verify a bank; raise BankCorrupt or BankIncompatible with the reason."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise BankCorrupt(f"bank {directory.name}: no {MANIFEST}")
    try:
        raw = manifest_path.read_bytes()
        checksum_path = directory / MANIFEST_CHECKSUM
        expected = checksum_path.read_text(encoding="ascii").strip() if checksum_path.exists() else None
    except (OSError, UnicodeDecodeError) as exc:
        raise BankCorrupt(f"bank {directory.name}, {MANIFEST}: unreadable manifest ({_why(exc)})") from exc
    if expected is not None and hashlib.sha256(raw).hexdigest() != expected:
        raise BankCorrupt(f"bank {directory.name}, {MANIFEST}: checksum mismatch (file truncated or modified)")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BankCorrupt(f"bank {directory.name}, {MANIFEST}: unreadable manifest ({_why(exc)})") from exc
    if not isinstance(manifest, dict):
        raise BankCorrupt(f"bank {directory.name}, {MANIFEST}: manifest is not a JSON object")
    version = manifest.get("format_version")
    if version not in READABLE_FORMATS or isinstance(version, bool):
        raise BankIncompatible(f"bank {directory.name}: bank format {version!r}, this software reads "
                               f"{', '.join(map(str, READABLE_FORMATS))}")
    for key in ("embedder", "calibration", "files", "feature_dim", "bank_size"):
        if key not in manifest:
            raise BankCorrupt(f"bank {directory.name}, {MANIFEST}: missing field {key!r}")
    _check_manifest_types(manifest, directory.name)
    arrays = {}
    for key, filename in ARRAYS.items():
        path = directory / filename
        expected = manifest["files"].get(filename)
        if not path.is_file():
            raise BankCorrupt(f"bank {directory.name}: missing {filename}")
        if expected != _sha256(path):
            raise BankCorrupt(f"bank {directory.name}, {path.name}: checksum mismatch (file truncated or modified)")
        try:
            arrays[key] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BankCorrupt(f"bank {directory.name}, {path.name}: unreadable array ({_why(exc)})") from exc
    features = arrays["features"]
    if features.ndim != 2 or features.dtype != np.float32 or not features.flags.c_contiguous:
        raise BankCorrupt(f"bank {directory.name}: features must be a C-contiguous (M, D) float32 array")
    if features.shape != (manifest["bank_size"], manifest["feature_dim"]):
        raise BankCorrupt(f"bank {directory.name}: features shape {features.shape} does not match the manifest")
    if not np.isfinite(features).all():
        raise BankCorrupt(f"bank {directory.name}: features contain NaN or infinity")
    scores = arrays["nominal_scores"]
    if scores.ndim != 1 or scores.dtype.kind != "f" or not np.isfinite(scores).all():
        raise BankCorrupt(f"bank {directory.name}: nominal_scores must be a 1-D array of finite floats")
    return MemoryBank(features=features, nominal_scores=arrays["nominal_scores"], manifest=manifest)
