"""API documentation pages that work offline: Swagger UI at `/docs`, ReDoc at `/redoc`.

Every asset comes from an installed dependency and is served by the app itself, never from a CDN:
Swagger UI 5 (the first major version that renders OpenAPI 3.1) from the `swagger-ui-bundle-v2`
wheel, and ReDoc's standalone bundle from the npm package `redoc` (`npm ci` puts it in
`node_modules/`). A strict Content-Security-Policy on both pages keeps the browser from reaching
anything but this app, so the pages behave the same on a machine without internet.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

import jinja2
from aiohttp import web

__all__ = [
    "DEFAULT_REDOC_DIRS",
    "DOC_ROUTE_NAMES",
    "REDOC_BUNDLE_NAME",
    "find_redoc_bundle",
    "setup_docs",
]

log = logging.getLogger(__name__)

# Route names; the OpenAPI generator skips any route whose `route.name` is in DOC_ROUTE_NAMES.
DOCS_ROUTE: Final = "docs"
DOCS_STATIC_ROUTE: Final = "docs-static"
REDOC_ROUTE: Final = "redoc"
REDOC_STATIC_ROUTE: Final = "redoc-static"
DOC_ROUTE_NAMES: Final = frozenset({DOCS_ROUTE, DOCS_STATIC_ROUTE, REDOC_ROUTE, REDOC_STATIC_ROUTE})

REDOC_BUNDLE_NAME: Final = "redoc.standalone.js"
# The checkout's root (parent of the package dir), where `npm ci` creates node_modules/.
_REPO_ROOT: Final = Path(__file__).resolve().parent.parent
DEFAULT_REDOC_DIRS: Final[tuple[Path, ...]] = (_REPO_ROOT / "node_modules" / "redoc" / "bundles",)

# Only these files of the Swagger UI package are served: the package also ships an index.html and
# initializer that point at the public petstore demo, which must not be reachable from here.
_SWAGGER_ASSETS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
        "swagger-ui-bundle.js.map": "application/json",
        "swagger-ui.css": "text/css; charset=utf-8",
        "swagger-ui.css.map": "application/json",
        "favicon-32x32.png": "image/png",
        "favicon-16x16.png": "image/png",
    }
)
_REDOC_ASSETS: Final[Mapping[str, str]] = MappingProxyType(
    {
        REDOC_BUNDLE_NAME: "text/javascript; charset=utf-8",
        f"{REDOC_BUNDLE_NAME}.map": "application/json",
    }
)

# Asset URLs carry `?v=<token of the file>`, so a matching request may be cached for good; the
# pages themselves are revalidated every time so an upgrade shows up at once.
_IMMUTABLE: Final = "public, max-age=31536000, immutable"
_REVALIDATE: Final = "no-cache"

# 'self' only: nothing on these pages may come from, or report to, another host. Styles must allow
# inline: both UIs set styles from JavaScript. ReDoc runs its search index in a blob: worker.
_CSP: Final = (
    "default-src 'none'; script-src 'self'{nonce}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'self'"
)

_SWAGGER_PAGE: Final = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} – API docs</title>
<link rel="stylesheet" href="{{ asset('swagger-ui.css') }}">
<link rel="icon" type="image/png" sizes="32x32" href="{{ asset('favicon-32x32.png') }}">
<link rel="icon" type="image/png" sizes="16x16" href="{{ asset('favicon-16x16.png') }}">
<style>body { margin: 0; background: #fafafa; }</style>
</head>
<body>
<noscript>Swagger UI needs JavaScript. The OpenAPI document is at
<a href="{{ openapi_url }}">{{ openapi_url }}</a>.</noscript>
<div id="swagger-ui"></div>
<script src="{{ asset('swagger-ui-bundle.js') }}"></script>
<script nonce="{{ nonce }}">
window.ui = SwaggerUIBundle(Object.assign({{ config | tojson }}, {
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout"
}));
</script>
</body>
</html>
"""

_REDOC_PAGE: Final = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} – API reference</title>
<style>body { margin: 0; padding: 0; }</style>
</head>
<body>
<noscript>ReDoc needs JavaScript. The OpenAPI document is at
<a href="{{ openapi_url }}">{{ openapi_url }}</a>.</noscript>
<redoc spec-url="{{ openapi_url }}"></redoc>
<script src="{{ bundle_url }}"></script>
</body>
</html>
"""

_REDOC_MISSING_PAGE: Final = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }} – ReDoc is not installed</title>
</head>
<body>
<h1>ReDoc is not installed</h1>
<p>This page needs ReDoc's standalone bundle (<code>{{ bundle_name }}</code>), which is installed
from npm with the rest of the development setup. In the perfagent checkout run
<code>make setup</code> (or just <code>npm ci --ignore-scripts</code>), or point the
<code>redoc_dir</code> setting at a directory holding <code>{{ bundle_name }}</code>,
then restart perfagent.</p>
<p>Swagger UI needs no extra install: <a href="{{ docs_url }}">{{ docs_url }}</a>.
The OpenAPI document is at <a href="{{ openapi_url }}">{{ openapi_url }}</a>.</p>
</body>
</html>
"""


def find_redoc_bundle(search: Sequence[Path]) -> Path | None:
    """First `redoc.standalone.js` found in `search`, then in DEFAULT_REDOC_DIRS; None if absent.

    Each directory may hold the bundle itself, be the `redoc` package (bundle under `bundles/`), or
    be a project with `node_modules/`, so a setting can name whichever is at hand.
    """
    for base in (*search, *DEFAULT_REDOC_DIRS):
        base = base.expanduser()
        for where in (base, base / "bundles", base / "node_modules" / "redoc" / "bundles"):
            candidate = where / REDOC_BUNDLE_NAME
            if candidate.is_file():
                return candidate.resolve()
    return None


def _swagger_ui_dir() -> Path:
    """Directory of the installed Swagger UI 5 assets.

    Imported by name: the package has no type information, and its own `swagger_ui_path` names the
    versioned vendor dir, so an upgrade of the wheel needs no change here.
    """
    module = importlib.import_module("swagger_ui_bundle")
    return Path(str(module.swagger_ui_path))


def _cache_token(path: Path) -> str:
    """Short token that changes whenever the file does (it is replaced on every upgrade)."""
    st = path.stat()
    return hashlib.blake2s(f"{st.st_size}:{st.st_mtime_ns}".encode(), digest_size=6).hexdigest()


def _assets(directory: Path, allowed: Mapping[str, str]) -> Mapping[str, tuple[Path, str]]:
    """The allowed files that exist in `directory`, each with its cache token."""
    found = {name: directory / name for name in allowed}
    return MappingProxyType(
        {name: (path, _cache_token(path)) for name, path in found.items() if path.is_file()}
    )


def _page_headers(nonce: str | None = None) -> dict[str, str]:
    return {
        "Cache-Control": _REVALIDATE,
        "Content-Security-Policy": _CSP.format(nonce=f" 'nonce-{nonce}'" if nonce else ""),
        "X-Content-Type-Options": "nosniff",
    }


@dataclass(frozen=True, slots=True)
class _Docs:
    """Configuration and handlers of the documentation routes of one app."""

    title: str
    openapi_url: str
    swagger_assets: Mapping[str, tuple[Path, str]]
    redoc_assets: Mapping[str, tuple[Path, str]]  # empty when the bundle is not installed
    swagger_page: jinja2.Template
    redoc_page: jinja2.Template
    redoc_missing_page: jinja2.Template

    async def swagger(self, request: web.Request) -> web.Response:
        """Swagger UI page; assets are linked through the router so a sub-app prefix is kept."""
        static = request.app.router[DOCS_STATIC_ROUTE]

        def asset(name: str) -> str:
            return str(static.url_for(filename=name).with_query(v=self.swagger_assets[name][1]))

        nonce = secrets.token_urlsafe(16)
        config = {
            "url": self.openapi_url,
            "dom_id": "#swagger-ui",
            "deepLinking": True,
            # Swagger UI would otherwise send the document to validator.swagger.io for a badge.
            "validatorUrl": None,
            "docExpansion": "list",
            "displayRequestDuration": True,
            "showExtensions": True,
            "showCommonExtensions": True,
        }
        html = self.swagger_page.render(
            title=self.title, openapi_url=self.openapi_url, asset=asset, nonce=nonce, config=config
        )
        return web.Response(text=html, content_type="text/html", headers=_page_headers(nonce))

    async def swagger_static(self, request: web.Request) -> web.StreamResponse:
        return _serve(request, self.swagger_assets, _SWAGGER_ASSETS)

    async def redoc(self, request: web.Request) -> web.Response:
        """ReDoc page, or a 503 page saying how to install ReDoc when its bundle is missing."""
        if REDOC_BUNDLE_NAME not in self.redoc_assets:
            html = self.redoc_missing_page.render(
                title=self.title,
                bundle_name=REDOC_BUNDLE_NAME,
                docs_url=str(request.app.router[DOCS_ROUTE].url_for()),
                openapi_url=self.openapi_url,
            )
            return web.Response(status=503, text=html, content_type="text/html", headers=_page_headers())
        static = request.app.router[REDOC_STATIC_ROUTE]
        bundle_url = static.url_for(filename=REDOC_BUNDLE_NAME).with_query(
            v=self.redoc_assets[REDOC_BUNDLE_NAME][1]
        )
        html = self.redoc_page.render(
            title=self.title, openapi_url=self.openapi_url, bundle_url=str(bundle_url)
        )
        return web.Response(text=html, content_type="text/html", headers=_page_headers())

    async def redoc_static(self, request: web.Request) -> web.StreamResponse:
        if not self.redoc_assets:
            return web.Response(
                status=503,
                text="ReDoc is not installed: run `make setup` (or `npm ci --ignore-scripts`) and restart.\n",
                headers={"Cache-Control": "no-store"},
            )
        return _serve(request, self.redoc_assets, _REDOC_ASSETS)


def _serve(
    request: web.Request, assets: Mapping[str, tuple[Path, str]], content_types: Mapping[str, str]
) -> web.StreamResponse:
    """One allow-listed file; cached for good only when asked for with its current token."""
    name = request.match_info["filename"]
    if name not in assets:
        raise web.HTTPNotFound()
    path, token = assets[name]
    cache = _IMMUTABLE if request.query.get("v") == token else _REVALIDATE
    # Not compressed: aiohttp 3.14's FileResponse with enable_compression() writes a deflate trailer
    # after a 304 reply, which corrupts the connection; the immutable caching makes it moot anyway.
    return web.FileResponse(
        path,
        headers={
            "Content-Type": content_types[name],
            "Cache-Control": cache,
            "X-Content-Type-Options": "nosniff",
        },
    )


def setup_docs(
    app: web.Application,
    *,
    openapi_url: str = "/openapi.json",
    title: str = "perfagent",
    redoc_dirs: Sequence[Path] = (),
) -> None:
    """Add `GET /docs` (Swagger UI) and `GET /redoc` (ReDoc) with their assets to `app`.

    The routes are named after DOC_ROUTE_NAMES. The ReDoc bundle is looked up once, here, in
    `redoc_dirs` and then the checkout's node_modules; without it `/redoc` answers 503 with
    install instructions. The Swagger UI wheel is a hard dependency, so its absence raises.
    """
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    bundle = find_redoc_bundle(redoc_dirs)
    if bundle is None:
        searched = ", ".join(str(p) for p in (*redoc_dirs, *DEFAULT_REDOC_DIRS))
        log.warning(
            "ReDoc bundle %s not found (searched %s): /redoc will answer 503", REDOC_BUNDLE_NAME, searched
        )
    else:
        log.debug("serving ReDoc from %s", bundle)
    docs = _Docs(
        title=title,
        openapi_url=openapi_url,
        swagger_assets=_assets(_swagger_ui_dir(), _SWAGGER_ASSETS),
        redoc_assets=_assets(bundle.parent, _REDOC_ASSETS) if bundle else MappingProxyType({}),
        swagger_page=env.from_string(_SWAGGER_PAGE),
        redoc_page=env.from_string(_REDOC_PAGE),
        redoc_missing_page=env.from_string(_REDOC_MISSING_PAGE),
    )
    missing = {name for name in _SWAGGER_ASSETS if not name.endswith(".map")} - docs.swagger_assets.keys()
    if missing:
        raise RuntimeError(f"the swagger-ui-bundle-v2 package lacks {sorted(missing)}; reinstall it")
    app.router.add_get("/docs", docs.swagger, name=DOCS_ROUTE)
    app.router.add_get("/docs/static/{filename}", docs.swagger_static, name=DOCS_STATIC_ROUTE)
    app.router.add_get("/redoc", docs.redoc, name=REDOC_ROUTE)
    app.router.add_get("/redoc/static/{filename}", docs.redoc_static, name=REDOC_STATIC_ROUTE)
