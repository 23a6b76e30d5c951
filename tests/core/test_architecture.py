"""The algorithm stays free of the web stack, so it can run in a batch job or a Ray actor."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_engine_and_storage_import_no_web_framework():
    code = (
        "import sys, pkgutil, importlib, app.core\n"
        "for m in pkgutil.iter_modules(app.core.__path__): importlib.import_module('app.core.' + m.name)\n"
        "import app.storage\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in {'fastapi', 'starlette', 'pydantic', 'uvicorn'})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"app.core pulled in: {result.stdout.strip()}"
