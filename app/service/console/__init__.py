"""The operator console: static HTML, CSS and plain JavaScript served at /console/.

The page talks to the public REST API only (the same calls as curl or app/client.py),
so it needs no routes of its own beyond these files. Everything it loads comes from
this package (no CDN: it works offline on a plant network), which lets the
responses carry a strict Content-Security-Policy: scripts and styles from this
origin only, no inline code, images only from the origin, data: (the heatmaps,
base64 PNG in the JSON) and blob: (the operator's own photos).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time (cheap: ETag / Last-Modified), so an upgraded service
    # never runs against a stale script.
    "Cache-Control": "no-cache",
}
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain"}

router = APIRouter(tags=["console"], include_in_schema=False)


def _files() -> dict[str, Path]:
    """The servable files: regular files directly in static/ with a known type.

    A fixed table, so no request path ever reaches the file system."""
    return {p.name: p for p in sorted(STATIC_DIR.iterdir())
            if p.is_file() and not p.is_symlink() and p.suffix in _MEDIA_TYPES}


FILES = _files()


def _serve(name: str) -> FileResponse:
    path = FILES.get(name)
    if path is None:
        raise HTTPException(status_code=404, detail=f"no console file {name!r}")
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


@router.get("/console")
async def console_redirect() -> RedirectResponse:
    # Relative, so the page also works behind a reverse proxy that adds a path prefix.
    return RedirectResponse("console/", status_code=308)


@router.get("/console/")
async def console_index() -> FileResponse:
    return _serve("index.html")


@router.get("/console/{name}")
async def console_file(name: str) -> FileResponse:
    return _serve(name)
