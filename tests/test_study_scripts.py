"""The accuracy-study scripts on a tiny real subset, so the README's figures stay reproducible.

benchmarks/map_study.py re-maps a saved bank's patch scores: its default row must be the
pixel AUROC that `evaluate_bank` reports for the same bank and images.
benchmarks/scale_framing_study.py must run end to end, and on square frames its two rules agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.embedding import EmbedderConfig, create_embedder
from app.core.evaluation import evaluate_bank, read_category
from app.core.patchcore import PatchCoreConfig, build_bank
from app.storage import LocalBankStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mini_bank(mini_mvtec, tmp_path_factory):
    """(models dir holding a small bottle bank, the bank, its embedder): 128 px, 25% coreset."""
    config = PatchCoreConfig(embedder=EmbedderConfig(image_size=128), coreset_ratio=0.25)
    embedder = create_embedder(config.embedder, device="cpu")
    bank = build_bank(read_category(mini_mvtec, "bottle").train, config, embedder)
    models = tmp_path_factory.mktemp("models")
    LocalBankStore(models).save("bottle", bank)
    return models, bank, embedder


def _run_study(script: str, models: Path, data: Path, out: Path) -> dict:
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--bank", str(models / "bottle"),
         "--data", str(data), "--category", "bottle", "--json", str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_map_study_default_row_is_the_evaluated_pixel_auroc(mini_mvtec, mini_bank, tmp_path):
    models, bank, embedder = mini_bank
    expected = evaluate_bank(bank, read_category(mini_mvtec, "bottle"), embedder)["pixel_auroc"]
    results = _run_study("map_study.py", models, mini_mvtec, tmp_path / "study.json")["results"]
    assert results["default (nearest row, sigma 4)"] == pytest.approx(expected, abs=1e-4)
    assert {"sigma 12", "mean of 3 nearest rows", "per image: minus median",
            "defect vs good-image pixels", "defect vs defective-image pixels > 0.2"} <= set(results)
    assert all(0.0 <= value <= 1.0 for key, value in results.items() if not key.startswith("mean map"))


@pytest.mark.slow
def test_scale_framing_study_reduces_to_squeeze_on_square_frames(mini_mvtec, tmp_path):
    """bottle's frames are square and all one size, so keeping the pixel scale or the aspect is
    the same resize as squeezing: all three rows must agree, and the study must run end to end."""
    out = tmp_path / "framing.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/scale_framing_study.py", "--data", str(mini_mvtec), "--category", "bottle",
         "--train-every", "2", "--coreset-ratio", "0.25", "--modes", "squeeze", "scale", "aspect",
         "--json", str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    squeeze, *others = json.loads(out.read_text())
    assert [row["mode"] for row in (squeeze, *others)] == ["squeeze", "scale", "aspect"]
    assert squeeze["train_images"] == 5 and squeeze["bank"] > 0
    for other in others:
        assert other["bank"] == squeeze["bank"], other["mode"]
        for key in ("image_auroc", "pixel_auroc"):  # the same resize: equal up to BLAS summation order
            assert other[key] == pytest.approx(squeeze[key], abs=1e-6), (other["mode"], key)
    assert 0.0 <= squeeze["image_auroc"] <= 1.0 and 0.0 <= squeeze["pixel_auroc"] <= 1.0


@pytest.mark.slow
def test_jpeg_auroc_scores_every_decode_path(mini_mvtec, mini_bank, tmp_path):
    """benchmarks/jpeg_auroc.py behind the README's JPEG table: PNG, full, reduced-scale and
    device-path JPEG decoding of the same frames, each against the PNG's scores."""
    models, bank, _ = mini_bank
    report = _run_study("jpeg_auroc.py", models, mini_mvtec, tmp_path / "jpeg.json")
    assert report["device"] == "cpu" and report["feature_dim"] == bank.features.shape[1]
    assert report["png"]["score_vs_png_max"] == 0.0
    for mode in ("jpeg-full", "jpeg-reduced", "jpeg-device"):
        assert 0.0 < report[mode]["score_vs_png_max"] < 0.1, mode
        assert 0.0 <= report[mode]["pixel_auroc"] <= 1.0 and 0.0 <= report[mode]["image_auroc"] <= 1.0


@pytest.mark.slow
def test_exposure_drift_study_runs_and_counts_every_image(mini_mvtec, mini_bank, tmp_path):
    """The tiny bank uses the default exposure normalisation: a darker shot of the good parts
    must not be flagged more than the parts as shot."""
    models, _, _ = mini_bank
    out = tmp_path / "drift.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/exposure_drift.py", "--bank", str(models / "bottle"), "--data", str(mini_mvtec),
         "--category", "bottle", "--json", str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["shot"]: row for row in json.loads(out.read_text())}
    assert len(rows) == 5 and all(row["good"] == 3 and row["defects"] == 3 for row in rows.values())
    assert rows["x0.8 (darker)"]["good_flagged"] <= rows["as shot"]["good_flagged"]
