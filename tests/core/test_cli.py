"""The command line as an engineer uses it: real processes, real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _run(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_build_then_predict_with_heatmaps(mini_mvtec, tmp_path):
    models = tmp_path / "models"
    built = _run("build", "--product", "bottle", "--images", str(mini_mvtec / "bottle" / "train" / "good"),
                 "--models-dir", str(models), "--image-size", "128", "--coreset-ratio", "0.2", "--device", "cpu")
    assert built.returncode == 0, built.stderr
    summary = json.loads(built.stdout)
    assert summary["product"] == "bottle" and summary["bank_size"] > 0
    assert (models / "bottle" / summary["version"] / "manifest.json").is_file()

    images = sorted((mini_mvtec / "bottle" / "test" / "broken_large").glob("*.png"))[:2]
    predicted = _run("predict", "--product", "bottle", *map(str, images), "--models-dir", str(models),
                     "--heatmap-dir", str(tmp_path / "heat"), "--device", "cpu")
    assert predicted.returncode == 0, predicted.stderr
    records = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert len(records) == 2 and all(r["is_anomalous"] for r in records)
    with Image.open(records[0]["heatmap"]) as heatmap:
        assert heatmap.size == (900, 900)
    # Two folders' 000.png: each keeps its own heatmap (they once overwrote each other).
    same_name = [sorted((mini_mvtec / "bottle" / "test" / kind).glob("*.png"))[0] for kind in ("good", "broken_large")]
    assert same_name[0].name == same_name[1].name
    predicted = _run("predict", "--product", "bottle", *map(str, same_name), "--models-dir", str(models),
                     "--heatmap-dir", str(tmp_path / "heat2"), "--device", "cpu")
    assert predicted.returncode == 0, predicted.stderr
    heatmaps = [json.loads(line)["heatmap"] for line in predicted.stdout.splitlines()]
    assert len(set(heatmaps)) == 2 and all(Path(h).is_file() for h in heatmaps)
    not_a_folder = _run("predict", "--product", "bottle", str(same_name[0]), "--models-dir", str(models),
                        "--heatmap-dir", records[0]["heatmap"], "--device", "cpu")
    assert not_a_folder.returncode == 2 and "not a folder" in not_a_folder.stderr


def test_patch_size_is_a_build_option_kept_by_the_bank(mini_mvtec, tmp_path):
    """A 5x5-neighbourhood bank: stored, listed as such, and served by an embedder that matches it."""
    from app.service.registry import describe_bank
    from app.storage import LocalBankStore

    models = tmp_path / "models"
    built = _run("build", "--product", "wide", "--images", str(mini_mvtec / "bottle" / "train" / "good"),
                 "--models-dir", str(models), "--image-size", "128", "--coreset-ratio", "0.2", "--patch-size", "5",
                 "--device", "cpu")
    assert built.returncode == 0, built.stderr
    bank = LocalBankStore(models).load("wide")[1]
    assert bank.embedder["patch_size"] == 5 and describe_bank(bank)["patch_size"] == 5
    scores = {}
    for kind in ("broken_large", "good"):
        image = sorted((mini_mvtec / "bottle" / "test" / kind).glob("*.png"))[0]
        predicted = _run("predict", "--product", "wide", str(image), "--models-dir", str(models), "--device", "cpu")
        assert predicted.returncode == 0, predicted.stderr
        scores[kind] = json.loads(predicted.stdout)["raw_score"]
    # (5 fit and 5 held-out images: the threshold of so small a bank is no test of the option.)
    assert scores["broken_large"] > 1.5 * scores["good"], scores


def test_append_build_is_a_new_version_descending_from_the_active_one(mini_mvtec, tmp_path):
    models = tmp_path / "models"
    common = ("--models-dir", str(models), "--device", "cpu")
    built = _run("build", "--product", "bottle", "--images", str(mini_mvtec / "bottle" / "train" / "good"),
                 "--image-size", "128", "--coreset-ratio", "0.2", *common)
    assert built.returncode == 0, built.stderr
    base = json.loads(built.stdout)
    # test/good holds nominal images the base never saw; backbone settings come from the base bank.
    appended = _run("build", "--product", "bottle", "--images", str(mini_mvtec / "bottle" / "test" / "good"),
                    "--append", *common)
    assert appended.returncode == 0, appended.stderr
    summary = json.loads(appended.stdout)
    assert summary["base_version"] == base["version"] != summary["version"]
    assert summary["bank_size"] > base["bank_size"] == summary["base_bank_size"]
    assert summary["lineage"] == {"images": 13, "base_versions": [base["version"]], "stopped_by": "size"}
    assert (models / "bottle" / "ACTIVE").read_text().strip() == summary["version"]
    manifest = json.loads((models / "bottle" / summary["version"] / "manifest.json").read_text())
    assert manifest["embedder"]["image_size"] == 128 and manifest["coreset"]["ratio"] == 0.2
    # The base stays an ordinary version next to it.
    again = _run("build", "--product", "bottle", "--images", str(mini_mvtec / "bottle" / "test" / "good"),
                 "--append", "--base-version", base["version"], "--until", "radius", "--no-activate", *common)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["base_version"] == base["version"]
    assert (models / "bottle" / "ACTIVE").read_text().strip() == summary["version"]
    wrong = _run("build", "--product", "bottle", "--images", str(tmp_path), "--base-version", base["version"],
                 *common)
    assert wrong.returncode == 2 and "--append" in wrong.stderr
    wrong = _run("build", "--product", "bottle", "--images", str(tmp_path), "--until", "radius", *common)
    assert wrong.returncode == 2 and "--append" in wrong.stderr
    # What the base was built and calibrated with is refused by name, never silently ignored.
    kept = _run("build", "--product", "bottle", "--images", str(mini_mvtec / "bottle" / "test" / "good"),
                "--append", "--map-sigma", "8", "--aspect", "squeeze", "--false-alarm-rate", "0.001", *common)
    assert kept.returncode == 2 and "--aspect, --map-sigma, --false-alarm-rate" in kept.stderr, kept.stderr
    # Named even at its default value (and abbreviated): the base may have been built otherwise.
    at_default = _run("build", "--product", "bottle", "--images", str(mini_mvtec / "bottle" / "test" / "good"),
                      "--append", "--aspect=keep", "--map-sig", "4", *common)
    assert at_default.returncode == 2 and "--aspect, --map-sigma" in at_default.stderr, at_default.stderr


def test_clear_errors_for_bad_input(tmp_path):
    missing = _run("predict", "--product", "nope", str(tmp_path / "x.png"), "--models-dir", str(tmp_path))
    assert missing.returncode == 2 and "no bank" in missing.stderr
    bad_name = _run("build", "--product", "../evil", "--images", str(tmp_path), "--models-dir", str(tmp_path))
    assert bad_name.returncode == 2 and "invalid product name" in bad_name.stderr
    # uvicorn would bind 70000 mod 65536 and log 70000.
    bad_port = _run("serve", "--port", "70000")
    assert bad_port.returncode == 2 and "0-65535" in bad_port.stderr


def test_eval_writes_the_metrics(mini_mvtec, tmp_path):
    out = tmp_path / "eval.json"
    result = _run("eval", "--data", str(mini_mvtec), "--category", "bottle", "--image-size", "128",
                  "--coreset-ratio", "0.2", "--json", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    for key in ("image_auroc", "pixel_auroc", "bank_size", "build_seconds", "predict_ms_per_image", "peak_rss_mb"):
        assert metrics[key] is not None, key
    assert metrics["image_auroc"] == 1.0
    assert 0.8 < metrics["pixel_auroc"] <= 1.0
    assert set(metrics["predict_ms_split"]) == {"decode", "backbone", "search", "map", "total"}


def test_eval_takes_the_framing_and_scoring_options(mini_mvtec, tmp_path):
    out = tmp_path / "eval_roi.json"
    result = _run("eval", "--data", str(mini_mvtec), "--category", "bottle", "--image-size", "128",
                  "--coreset-ratio", "0.2", "--roi", "100,100,800,800", "--aggregation", "flatten",
                  "--stage-dim", "64", "--top-k", "3", "--false-alarm-rate", "0.001", "--holdout-fraction", "0.3",
                  "--map-sigma", "8", "--patch-size", "5",
                  "--json", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    assert metrics["framing"] == {"mode": "roi", "fraction": 1.0, "roi": [100, 100, 800, 800], "aspect": "keep"}
    assert metrics["aggregation"] == "flatten" and metrics["feature_dim"] == 128 and metrics["top_k"] == 3
    assert metrics["map_sigma"] == 8.0 and metrics["patch_size"] == 5
    assert metrics["pixel_auroc"] is not None and metrics["image_auroc"] is not None
    centre = _run("eval", "--data", str(mini_mvtec), "--category", "bottle", "--image-size", "128",
                  "--coreset-ratio", "0.2", "--centre-crop", "0.875", "--aspect", "squeeze",
                  "--json", str(tmp_path / "c.json"), "--device", "cpu")
    assert centre.returncode == 0, centre.stderr
    assert json.loads((tmp_path / "c.json").read_text())["framing"] == \
        {"mode": "centre", "fraction": 0.875, "roi": None, "aspect": "squeeze"}
    stretched = _run("eval", "--data", str(mini_mvtec), "--category", "bottle", "--aspect", "stretch")
    assert stretched.returncode == 2 and "--aspect: invalid choice" in stretched.stderr
    both = _run("eval", "--data", str(mini_mvtec), "--category", "bottle", "--roi", "0,0,9,9",
                "--centre-crop", "0.5")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    blurred = _run("eval", "--data", str(mini_mvtec), "--category", "bottle", "--map-sigma", "40")
    assert blurred.returncode == 2 and "--map-sigma: must be between 0 and 32" in blurred.stderr
    even = _run("eval", "--data", str(mini_mvtec), "--category", "bottle", "--patch-size", "4")
    assert even.returncode == 2 and "patch_size must be odd" in even.stderr
