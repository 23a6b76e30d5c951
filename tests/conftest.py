"""Fixtures shared by every test package: where the real images are."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_report_header() -> str:
    """Free disk first in the log: the real servers the tests start (S3, Ray) fail on a full one."""
    parts = []
    for label, path in (("temp", tempfile.gettempdir()), ("checkout", str(REPO_ROOT))):
        usage = shutil.disk_usage(path)
        parts.append(f"{label} {path}: {usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.0f} GiB")
    return "disk: " + "; ".join(parts)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The MVTec-layout root with real images: $PATCHCORE_TEST_DATA or ../shared/data (read, never copied)."""
    configured = os.environ.get("PATCHCORE_TEST_DATA")
    root = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    if not (root / "bottle" / "train" / "good").is_dir():
        pytest.skip("real images not found: set PATCHCORE_TEST_DATA or provide ../shared/data (MVTec layout)")
    return root


@pytest.fixture(scope="session")
def mini_mvtec(shared_data, tmp_path_factory) -> Path:
    """A tiny MVTec-layout root of symlinks into the real bottle set (nothing copied): 10
    training, 3 good and 3 broken_large test images with their masks."""
    root = tmp_path_factory.mktemp("mvtec")
    src = shared_data / "bottle"
    picks = {"train/good": 10, "test/good": 3, "test/broken_large": 3}
    for sub, count in picks.items():
        (root / "bottle" / sub).mkdir(parents=True)
        for path in sorted((src / sub).glob("*.png"))[:count]:
            (root / "bottle" / sub / path.name).symlink_to(path)
            mask = src / "ground_truth" / "broken_large" / f"{path.stem}_mask.png"
            if sub == "test/broken_large":
                (root / "bottle" / "ground_truth" / "broken_large").mkdir(parents=True, exist_ok=True)
                (root / "bottle" / "ground_truth" / "broken_large" / mask.name).symlink_to(mask)
    return root


@pytest.fixture(scope="session", autouse=True)
def _backbone_cache(tmp_path_factory) -> None:
    """OpenVINO exports go to one cache per checkout (.pytest_cache, ignored by git), not ~/.cache."""
    if "PATCHCORE_CACHE_DIR" not in os.environ:
        os.environ["PATCHCORE_CACHE_DIR"] = str(REPO_ROOT / ".pytest_cache" / "patchcore")
