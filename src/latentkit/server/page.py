"""The web page: ``/`` and its three files under ``/page/``, read from the package.

The page is plain HTML, CSS and JavaScript (no build step, nothing from outside the
package) and talks to the native API like any other client. It needs no token itself;
when the API answers 401 it asks for one. Only the files named in ``PAGE_FILES`` are
served, looked up by name: no path from a request ever reaches the file system.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

PAGE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page's own files only: no inline scripts, no outside hosts, images from data:/blob: URLs.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def page_file(name: str) -> Response:
    """One of the page's files, or 404 for any other name."""
    media_type = PAGE_FILES.get(name)
    if media_type is None:
        return Response(
            b'{"error": "the page has no such file."}',
            status_code=404,
            media_type="application/json",
        )
    body = (files("latentkit.server") / "page" / name).read_bytes()
    return Response(body, media_type=media_type, headers=SECURITY_HEADERS)


def page_routes() -> APIRouter:
    """``GET /`` (the page) and ``GET /page/{name}`` (its script and style sheet)."""
    routes = APIRouter(include_in_schema=False)

    @routes.get("/")
    async def index() -> Response:
        return page_file("index.html")

    @routes.get("/page/{name}")
    async def asset(name: str) -> Response:
        return page_file(name)

    return routes
