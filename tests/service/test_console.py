"""The console's files as the service serves them: paths, types, security headers.

(The page itself is driven in a real browser by test_console_browser.py.)
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from app.service.api import create_app
from app.service.console import CONTENT_SECURITY_POLICY, FILES, STATIC_DIR

from .conftest import test_settings


class InProcessClient:
    """Requests straight into the ASGI app, without the lifespan: the console
    needs neither the backbone nor a bank."""

    def __init__(self, app):
        self.app = app

    def get(self, path: str, **kw) -> httpx.Response:
        async def run() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as http:
                return await http.get(path, **kw)

        return asyncio.run(run())


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    return InProcessClient(create_app(test_settings(tmp_path_factory.mktemp("models"))))


def test_console_redirects_to_its_folder_and_serves_the_page(client):
    response = client.get("/console", follow_redirects=False)
    assert response.status_code == 308
    assert response.headers["location"] == "console/"  # relative: works behind a path prefix
    page = client.get("/console/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<title>PatchCore console</title>" in page.text


@pytest.mark.parametrize("name, media_type", [("console.js", "text/javascript"), ("console.css", "text/css"),
                                              ("favicon.svg", "image/svg+xml"), ("index.html", "text/html")])
def test_console_files_have_their_types_and_a_strict_policy(client, name, media_type):
    response = client.get(f"/console/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == (STATIC_DIR / name).read_bytes()


def test_policy_allows_nothing_from_outside_and_no_inline_code():
    directives = dict(d.split(" ", 1) for d in CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY and "http" not in CONTENT_SECURITY_POLICY


def test_page_loads_nothing_from_outside_and_has_no_inline_code():
    html = (STATIC_DIR / "index.html").read_text()
    # Every src/href is a file of this folder or a fragment: no CDN, works offline.
    for ref in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert ref.startswith("#") or ref in FILES, ref
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert "<style" not in html and " style=" not in html and not re.search(r"\son[a-z]+=", html)
    script = (STATIC_DIR / "console.js").read_text()
    assert "innerHTML" not in script and "eval(" not in script and "http://" not in script


@pytest.mark.parametrize("path", ["/console/nope.js", "/console/..%2Fapi.py", "/console/__init__.py"])
def test_only_the_console_files_are_served(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_console_is_not_in_the_api_schema(client):
    assert not any(p.startswith("/console") for p in client.get("/openapi.json").json()["paths"])
