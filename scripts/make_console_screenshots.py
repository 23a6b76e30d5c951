"""Regenerate docs/console_try.png and docs/console_build.png from the console's browser test.

    .venv/bin/python scripts/make_console_screenshots.py

Runs tests/service/test_console_browser.py (headless chromium against a real server
with the demo product) with PATCHCORE_CONSOLE_SCREENSHOTS pointing at a temporary
folder, then keeps two of its screenshots as small palette PNGs for the README.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
KEEP = ("console_try.png", "console_build.png")
MAX_BYTES = 200_000


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PATCHCORE_CONSOLE_SCREENSHOTS": tmp}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/service/test_console_browser.py"], cwd=REPO, env=env, check=True)
        for name in KEEP:
            source = Path(tmp) / name
            if not source.is_file():
                print(f"{name} was not written (were the browser tests skipped?)", file=sys.stderr)
                return 1
            target = REPO / "docs" / name
            with Image.open(source) as shot:
                # A 256-colour palette holds the UI's flat colours and the heatmap's ramp (octree
                # keeps small areas such as the green score bar, median cut merged them away).
                shot.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE,
                                             dither=Image.Dither.NONE).save(target, optimize=True)
            size = target.stat().st_size
            print(f"{target.relative_to(REPO)}: {size // 1024} KB")
            if size > MAX_BYTES:
                print(f"{name} is over {MAX_BYTES // 1000} KB", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
