"""The embedded demo product: a turned steel washer, drawn by scripts/make_demo_images.py.

The images are generated (not photographed) and released with the project under
Apache-2.0; see LICENSE.md here. Layout, MVTec-style:

    images/good/NNN.png                   nominal parts (the demo bank is built from these)
    images/good_test/NNN.png              more nominal parts, not in the bank: to try predictions
    images/defect/<kind>_NNN.png          defective parts
    images/mask/<kind>_NNN_mask.png       their pixel masks, 0 = normal, 255 = defect
"""

from __future__ import annotations

from pathlib import Path

DEMO_PRODUCT = "demo"  # the name the service gives the embedded product
IMAGES_DIR = Path(__file__).resolve().parent / "images"


def _pngs(folder: str) -> list[Path]:
    return sorted((IMAGES_DIR / folder).glob("*.png"))


def demo_nominal_images() -> list[Path]:
    """The nominal (good) demo images, sorted by name."""
    return _pngs("good")


def demo_test_nominal_images() -> list[Path]:
    """Nominal demo images kept out of the bank, sorted: they should score as normal."""
    return _pngs("good_test")


def demo_defect_images() -> list[Path]:
    """The defective demo images, sorted by name."""
    return _pngs("defect")


def demo_mask(path: Path | str) -> Path:
    """The pixel mask of a defective demo image (raises FileNotFoundError if it has none)."""
    mask = IMAGES_DIR / "mask" / f"{Path(path).stem}_mask.png"
    if not mask.is_file():
        raise FileNotFoundError(f"no mask for demo image {Path(path).name}")
    return mask
