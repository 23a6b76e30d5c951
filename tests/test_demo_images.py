"""The embedded demo product's images: present, well-formed, small, and reproducible."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.demo import (
    IMAGES_DIR,
    demo_defect_images,
    demo_mask,
    demo_nominal_images,
    demo_test_nominal_images,
)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_demo_images.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_demo_images", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_demo_sets_have_expected_sizes():
    good, held_out, defect = demo_nominal_images(), demo_test_nominal_images(), demo_defect_images()
    assert (len(good), len(held_out), len(defect)) == (24, 4, 8)
    assert len(set(good) | set(held_out) | set(defect)) == 36
    for path in good + held_out + defect:
        with Image.open(path) as image:
            assert image.size == (256, 256)
            assert image.mode == "L"


def test_every_defect_has_a_binary_mask_inside_the_image():
    for path in demo_defect_images():
        with Image.open(demo_mask(path)) as mask_image:
            mask = np.asarray(mask_image)
        assert mask.shape == (256, 256)
        assert set(np.unique(mask).tolist()) == {0, 255}
        # Defects are small: well under a tenth of the image, but not a speck.
        assert 20 < int((mask > 0).sum()) < 256 * 256 // 10
        # and inside the 224 centre crop a backbone typically sees.
        ys, xs = np.nonzero(mask)
        assert ys.min() >= 16 and xs.min() >= 16 and ys.max() < 240 and xs.max() < 240


def test_defects_differ_from_nominal_where_the_mask_says():
    # The masked pixels must be where the image changed: compare against the
    # median nominal part, which is a blurry but fair stand-in for "no defect".
    nominal = np.median(
        np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in demo_nominal_images()]),
        axis=0,
    )
    for path in demo_defect_images():
        image = np.asarray(Image.open(path), dtype=np.float32)
        mask = np.asarray(Image.open(demo_mask(path))) > 0
        diff = np.abs(image - nominal)
        assert diff[mask].mean() > 2 * np.median(diff[~mask]), path.name


def test_good_images_have_no_mask():
    for path in (demo_nominal_images()[0], demo_test_nominal_images()[0]):
        with pytest.raises(FileNotFoundError):
            demo_mask(path)


def test_demo_images_stay_small():
    total = sum(p.stat().st_size for p in IMAGES_DIR.rglob("*.png"))
    assert total < 1_500_000


def test_committed_images_match_the_generator():
    script = _load_script()
    assert script.stale_files(script.generate(), IMAGES_DIR) == []
