"""Regenerate docs/heatmap_demo.png with the project's own build and predict commands.

    .venv/bin/python scripts/make_readme_figure.py

Builds the demo product from app/demo/images/good in a temporary store, runs
`python -m app predict --heatmap-dir` on two defective demo washers, and puts
each photo beside its heatmap overlay.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFECTS = ["scratch_000.png", "crack_000.png"]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        models, heat = Path(tmp) / "models", Path(tmp) / "heat"
        run = [sys.executable, "-m", "app"]
        subprocess.run([*run, "build", "--product", "demo", "--images", "app/demo/images/good",
                        "--models-dir", str(models)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        photos = [REPO / "app/demo/images/defect" / name for name in DEFECTS]
        subprocess.run([*run, "predict", "--product", "demo", *map(str, photos), "--models-dir", str(models),
                        "--heatmap-dir", str(heat)], cwd=REPO, check=True)
        tiles = []
        for photo in photos:
            tiles.append(Image.open(photo).convert("RGB"))
            tiles.append(Image.open(heat / f"{photo.stem}_heatmap.png").convert("RGB"))
        gap = 10
        figure = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1),
                                   max(t.height for t in tiles)), "white")
        x = 0
        for tile in tiles:
            figure.paste(tile, (x, 0))
            x += tile.width + gap
        out = REPO / "docs" / "heatmap_demo.png"
        figure.save(out, optimize=True)
        print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
