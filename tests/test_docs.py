"""The offline API documentation pages: Swagger UI at /docs and ReDoc at /redoc."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate
from pytest_aiohttp import AiohttpClient, AiohttpServer

import perfagent.docs
import tests.browser as browser
from perfagent.docs import DOC_ROUTE_NAMES, REDOC_BUNDLE_NAME, find_redoc_bundle, setup_docs
from tests.browser import dump_dom, in_ci, require_chromium

Client = TestClient[web.Request, web.Application]

TITLE = "perfagent <test> & co"  # markup in the title must come out escaped
HEALTH, COLLECT = "/api/v1/health", "/api/v1/metrics/collect"
SUMMARIES = ("Agent health", "Collect metrics now")
SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "perfagent test API", "version": "0.0.1"},
    "paths": {
        HEALTH: {
            "get": {
                "operationId": "get_health",
                "summary": SUMMARIES[0],
                "tags": ["health"],
                "responses": {
                    "200": {
                        "description": "The agent is up",
                        "content": {
                            "application/json": {
                                "schema": {"type": "object", "properties": {"status": {"type": "string"}}}
                            }
                        },
                    }
                },
            }
        },
        COLLECT: {
            "post": {
                "operationId": "collect_metrics",
                "summary": SUMMARIES[1],
                "tags": ["metrics"],
                # `type` as a list is 3.1-only: Swagger UI 4 and older ReDoc would not render it.
                "requestBody": {"content": {"application/json": {"schema": {"type": ["object", "null"]}}}},
                "responses": {"202": {"description": "Collection started"}},
            }
        },
    },
}
JS_TYPES = {"text/javascript", "application/javascript"}


def make_app(*, redoc_dirs: Sequence[Path] = ()) -> web.Application:
    """A tiny app with the two documented endpoints, its OpenAPI document and the docs pages."""

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(SPEC)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def collect(_: web.Request) -> web.Response:
        return web.json_response(None, status=202)

    app = web.Application()
    app.router.add_get("/openapi.json", openapi, name="openapi")
    app.router.add_get(HEALTH, health)
    app.router.add_post(COLLECT, collect)
    setup_docs(app, title=TITLE, redoc_dirs=redoc_dirs)
    return app


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class Dom(HTMLParser):
    """Every element (with its attributes) and every non-blank text node of an HTML document."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.texts: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.texts.append(data.strip())

    def links(self) -> list[str]:
        """URLs the page loads or links to (src and href attributes)."""
        return [el.attrs[a] for el in self.elements for a in ("src", "href") if a in el.attrs]


def assert_self_contained(html: str) -> None:
    """The page names no absolute or protocol-relative URL: everything comes from the app."""
    assert re.search(r"(?i)https?://", html) is None
    for link in Dom(html).links():
        assert link.startswith("/"), link
        assert not link.startswith("//"), link


@pytest.fixture
def redoc_installed() -> Path:
    """The installed ReDoc bundle; missing, it skips locally and fails under CI (`make setup`)."""
    bundle = find_redoc_bundle(())
    if bundle is None:
        message = "ReDoc is not installed: run `make setup` (npm ci --ignore-scripts)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return bundle


@pytest.fixture
def no_default_redoc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the checkout has no node_modules, so only explicitly given directories count."""
    monkeypatch.setattr(perfagent.docs, "DEFAULT_REDOC_DIRS", ())


def test_sample_document_is_valid_openapi_31() -> None:
    validate(SPEC)


async def test_swagger_page(aiohttp_client: AiohttpClient) -> None:
    client: Client = await aiohttp_client(make_app())
    resp = await client.get("/docs")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    html = await resp.text()
    assert "<title>perfagent &lt;test&gt; &amp; co" in html
    assert "<test>" not in html
    assert '"url": "/openapi.json"' in html
    assert '"deepLinking": true' in html
    assert '"validatorUrl": null' in html  # else Swagger UI calls validator.swagger.io
    assert_self_contained(html)


async def test_swagger_assets(aiohttp_client: AiohttpClient) -> None:
    client: Client = await aiohttp_client(make_app())
    dom = Dom(await (await client.get("/docs")).text())
    scripts = [el.attrs["src"] for el in dom.elements if el.tag == "script" and "src" in el.attrs]
    styles = [el.attrs["href"] for el in dom.elements if el.tag == "link" and el.attrs["rel"] == "stylesheet"]
    icons = [el.attrs["href"] for el in dom.elements if el.tag == "link" and el.attrs["rel"] == "icon"]
    assert [s.split("?")[0] for s in scripts] == ["/docs/static/swagger-ui-bundle.js"]
    assert len(styles) == 1
    assert len(icons) == 2
    for url in scripts:
        resp = await client.get(url)
        assert resp.status == 200
        assert resp.content_type in JS_TYPES
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert "SwaggerUIBundle" in await resp.text()
    for url in styles:
        resp = await client.get(url)
        assert (resp.status, resp.content_type) == (200, "text/css")
    for url in icons:
        resp = await client.get(url)
        assert (resp.status, resp.content_type) == (200, "image/png")


async def test_asset_caching(aiohttp_client: AiohttpClient) -> None:
    client: Client = await aiohttp_client(make_app())
    # Without the page's version token the file may have changed since: revalidate.
    resp = await client.get("/docs/static/swagger-ui.css")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-cache"
    etag = resp.headers["ETag"]
    resp = await client.get("/docs/static/swagger-ui.css", headers={"If-None-Match": etag})
    assert resp.status == 304


@pytest.mark.parametrize(
    "path",
    [
        "/docs/static/index.html",  # the package's demo page, wired to the public petstore
        "/docs/static/swagger-initializer.js",
        "/docs/static/..%2Fswagger-ui-bundle.js",
        "/docs/static/%2E%2E%2F%2E%2E%2F__init__.py",
    ],
)
async def test_only_listed_assets_are_served(aiohttp_client: AiohttpClient, path: str) -> None:
    client: Client = await aiohttp_client(make_app())
    resp = await client.get(path)
    assert resp.status == 404


async def test_redoc_page(aiohttp_client: AiohttpClient, redoc_installed: Path) -> None:
    client: Client = await aiohttp_client(make_app())
    resp = await client.get("/redoc")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert resp.headers["Cache-Control"] == "no-cache"
    html = await resp.text()
    assert "<title>perfagent &lt;test&gt; &amp; co" in html
    assert '<redoc spec-url="/openapi.json">' in html
    assert_self_contained(html)
    scripts = [el.attrs["src"] for el in Dom(html).elements if el.tag == "script"]
    assert [s.split("?")[0] for s in scripts] == [f"/redoc/static/{REDOC_BUNDLE_NAME}"]
    resp = await client.get(scripts[0])
    assert resp.status == 200
    assert resp.content_type in JS_TYPES
    assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert await resp.read() == await asyncio.to_thread(redoc_installed.read_bytes)
    assert (await client.get("/redoc/static/redoc.lib.js")).status == 404


async def test_redoc_missing_says_how_to_install(
    aiohttp_client: AiohttpClient, tmp_path: Path, no_default_redoc: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="perfagent.docs"):
        app = make_app(redoc_dirs=[tmp_path])
    assert any(REDOC_BUNDLE_NAME in r.getMessage() for r in caplog.records)
    client: Client = await aiohttp_client(app)
    resp = await client.get("/redoc")
    assert resp.status == 503
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert "make setup" in html
    assert "npm ci" in html
    assert_self_contained(html)
    assert (await client.get(f"/redoc/static/{REDOC_BUNDLE_NAME}")).status == 503
    assert (await client.get("/docs")).status == 200  # Swagger UI does not depend on npm


async def test_redoc_dir_setting_is_used(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    # Given directories win over the checkout's node_modules.
    (tmp_path / REDOC_BUNDLE_NAME).write_text("/* a stand-in bundle */\n")
    client: Client = await aiohttp_client(make_app(redoc_dirs=[tmp_path]))
    assert (await client.get("/redoc")).status == 200
    resp = await client.get(f"/redoc/static/{REDOC_BUNDLE_NAME}")
    assert await resp.text() == "/* a stand-in bundle */\n"


@pytest.mark.parametrize("layout", ["", "bundles", "node_modules/redoc/bundles"])
def test_find_redoc_bundle_layouts(tmp_path: Path, no_default_redoc: None, layout: str) -> None:
    """The setting may name the bundle's dir, the redoc package, or a project with node_modules."""
    assert find_redoc_bundle([tmp_path]) is None
    bundle = tmp_path / layout / REDOC_BUNDLE_NAME
    bundle.parent.mkdir(parents=True, exist_ok=True)
    bundle.write_text("")
    assert find_redoc_bundle([tmp_path / "elsewhere", tmp_path]) == bundle.resolve()


def test_doc_routes_are_marked() -> None:
    """Every docs route carries a name from DOC_ROUTE_NAMES, so the OpenAPI generator can skip them."""
    app = make_app()
    doc_routes = [
        r for r in app.router.routes() if r.resource and r.resource.canonical.startswith(("/docs", "/redoc"))
    ]
    assert {r.name for r in doc_routes} == DOC_ROUTE_NAMES
    assert all(r.name not in DOC_ROUTE_NAMES for r in app.router.routes() if r not in doc_routes)


@pytest.mark.parametrize(("ci", "outcome"), [(None, pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_missing_chromium_skips_only_outside_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ci: str | None, outcome: type[BaseException]
) -> None:
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "chromium")
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome):
        require_chromium()


async def test_swagger_ui_renders_in_chromium(aiohttp_server: AiohttpServer) -> None:
    require_chromium()
    server = await aiohttp_server(make_app())
    dom = Dom(await dump_dom(str(server.make_url("/docs"))))
    blocks = [el for el in dom.elements if "opblock" in el.classes]
    assert len(blocks) == 2, "one operation block per endpoint"
    paths = {el.attrs.get("data-path") for el in dom.elements if "opblock-summary-path" in el.classes}
    assert paths == {HEALTH, COLLECT}
    assert set(SUMMARIES) <= set(dom.texts)
    # Deep linking: every operation has a #/tag/operationId anchor.
    anchors = {el.attrs.get("href") for el in dom.elements if el.tag == "a"}
    assert {"#/health/get_health", "#/metrics/collect_metrics"} <= anchors


async def test_redoc_renders_in_chromium(aiohttp_server: AiohttpServer, redoc_installed: Path) -> None:
    require_chromium()
    server = await aiohttp_server(make_app())
    dom = Dom(await dump_dom(str(server.make_url("/redoc"))))
    sections = {el.attrs.get("data-section-id") for el in dom.elements}
    assert {"operation/get_health", "operation/collect_metrics"} <= sections
    assert {HEALTH, COLLECT, *SUMMARIES} <= set(dom.texts)
