"""The dashboard of ``GET /api/ui`` (and ``/api/ui/<asset>``): static files shipped in this package.

Nothing is built: ``static/`` holds the page, its ES modules and its stylesheet as they are served.
The page talks only to the HTTP API of the same app (its Content-Security-Policy allows no other
host). The routes are anonymous; the API calls the page makes carry the function key the user gives
it (``x-functions-key``), kept in the browser's ``sessionStorage`` only.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
from dataclasses import dataclass, field
from importlib import resources
from urllib.parse import urlsplit

_CONTENT_TYPES = {
    # Without a charset: both hosts add "; charset=utf-8" to text/* types (HttpResponse's default).
    ".html": "text/html",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
_BASE_PLACEHOLDER = "{{base}}"
# Same-origin only: the page may load nothing from, and send nothing to, any other host.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'self'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class Asset:
    """One response of the dashboard routes."""

    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@functools.cache
def _files() -> dict[str, bytes]:
    """Every servable file of ``static/`` by name; read once per process. Only these names are served,
    so no request path can reach anything else on disk."""
    static = resources.files(__package__).joinpath("static")
    return {
        entry.name: entry.read_bytes()
        for entry in static.iterdir()
        if entry.is_file() and any(entry.name.endswith(ext) for ext in _CONTENT_TYPES)
    }


def _not_found(path: str) -> Asset:
    body = {"type": "about:blank", "title": "Not Found", "status": 404, "detail": f"no dashboard file {path}"}
    return Asset(404, "application/problem+json", json.dumps(body).encode())


def serve(path: str, url: str, if_none_match: str | None = None) -> Asset:
    """The response to ``GET`` of dashboard file ``path`` ('' for the page itself) requested as ``url``.

    The page gets a ``<base>`` pointing at the ``ui/`` folder of ``url``, so its relative links work
    whether it was opened as ``/api/ui`` or ``/api/ui/`` and under any route prefix. Unknown files are
    ``404`` (problem+json). An ``If-None-Match`` equal to the file's ETag gets ``304``.
    """
    name = path.strip("/") or "index.html"
    body = _files().get(name)
    extension = name[name.rfind(".") :]
    if body is None:
        return _not_found(name)
    if name == "index.html":
        base = urlsplit(url).path.rstrip("/").removesuffix("/index.html")
        body = body.replace(_BASE_PLACEHOLDER.encode(), html.escape(base + "/", quote=True).encode())
    etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
    # Revalidate on every load: a redeployed app is picked up at once, and an unchanged file costs a 304.
    headers = {**_SECURITY_HEADERS, "Cache-Control": "no-cache", "ETag": etag}
    if if_none_match is not None and etag in (tag.strip() for tag in if_none_match.split(",")):
        return Asset(304, _CONTENT_TYPES[extension], b"", headers)
    return Asset(200, _CONTENT_TYPES[extension], body, headers)
