"""The HTML the service serves: the search page and the OpenAPI UI at ``/docs``, from packaged files
(``static/index.html``; swagger-ui from the ``swagger-ui-bundle`` package, no CDN), each with a
Content-Security-Policy that allows exactly its own inline script and style."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
DOCS_ASSETS = "/docs/assets"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
OPEN_PATHS = frozenset({"/", "/healthz", "/docs", OAUTH2_REDIRECT, "/openapi.json"})
"""Paths served without an API key (plus everything under DOCS_ASSETS)."""


def is_open(path: str) -> bool:
    """True for the paths anyone may read (the page, liveness, the API description and its UI)."""
    return path in OPEN_PATHS or path.startswith(DOCS_ASSETS + "/")


def _hashes(html: str, tag: str) -> str:
    """CSP source expressions ('sha256-...') for the inline ``<tag>`` blocks of ``html``."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'" for block in found)


def _csp(html: str, *, inline_styles: bool = False) -> str:
    """A policy allowing this service's own files and ``html``'s inline scripts (by hash) only.

    ``inline_styles`` allows any inline style (swagger-ui sets style attributes); a hash would
    switch that off again, so then none is given.
    """
    styles = "'unsafe-inline'" if inline_styles else _hashes(html, "style")
    return (
        f"default-src 'none'; script-src 'self' {_hashes(html, 'script')}; style-src 'self' {styles}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


def _with_csp(page: HTMLResponse, *, inline_styles: bool = False) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = _csp(bytes(page.body).decode(), inline_styles=inline_styles)
    return page


@cache
def _page() -> tuple[str, str]:
    html = (STATIC / "index.html").read_text()
    return html, _csp(html)


def search_page() -> HTMLResponse:
    """The search page (static/index.html) with its CSP."""
    html, policy = _page()
    return HTMLResponse(html, headers={"Content-Security-Policy": policy})


def swagger_ui_folder() -> Path | None:
    """The swagger-ui files of the ``swagger-ui-bundle`` package, or None when it is not installed."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return Path(str(swagger_ui_path))


def install_docs(app: FastAPI, title: str) -> None:
    """Serve the OpenAPI UI at ``/docs`` from the packaged swagger-ui (no CDN)."""
    folder = swagger_ui_folder()
    if folder is not None:
        app.mount(DOCS_ASSETS, StaticFiles(directory=folder), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        if folder is None:
            return HTMLResponse(
                "<!doctype html><title>API docs</title><p>The OpenAPI UI needs the swagger-ui-bundle package "
                "(pip install swagger-ui-bundle); the API description is at <a href=/openapi.json>/openapi.json</a>.",
                status_code=503,
            )
        page = get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{title} - API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
            oauth2_redirect_url=OAUTH2_REDIRECT,
        )
        return _with_csp(page, inline_styles=True)

    @app.get(OAUTH2_REDIRECT, include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return _with_csp(get_swagger_ui_oauth2_redirect_html())
