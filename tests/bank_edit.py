"""Edit a saved bank's manifest as a test needs, keeping its checksum (manifest.sha256) in step,
so only the checks beyond the checksum can refuse it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from app.core.bank import MANIFEST, MANIFEST_CHECKSUM


def write_manifest(directory: Path, manifest: dict | str) -> None:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (directory / MANIFEST).write_text(text)
    (directory / MANIFEST_CHECKSUM).write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")


def edit_manifest(directory: Path, **changes) -> None:
    write_manifest(directory, {**json.loads((directory / MANIFEST).read_text()), **changes})
