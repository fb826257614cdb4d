"""The web console's files as the gateway serves them: the page, its assets by name, and a clear
503 before `make setup` built it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from edgeway.common.settings import Environment
from edgeway.gateway import console
from edgeway.gateway.app import create_app
from edgeway.gateway.settings import GatewaySettings


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewaySettings(environment=Environment.DEVELOPMENT))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client


@pytest.fixture
def build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A build folder as Vite writes it, in place of web/dist; and a file beside it."""
    (tmp_path / "dist" / "assets").mkdir(parents=True)
    (tmp_path / "dist" / "index.html").write_text('<script src="/assets/index-1a2b.js"></script>')
    (tmp_path / "dist" / "assets" / "index-1a2b.js").write_text("console.log(1)")
    (tmp_path / "secret.txt").write_text("not for browsers")
    monkeypatch.setattr(console, "BUILD_DIR", tmp_path / "dist")
    return tmp_path / "dist"


async def test_the_page_and_its_assets_are_served(http: httpx.AsyncClient, build: Path) -> None:
    page = await http.get("/")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-cache"  # a new build is seen at once
    assert "index-1a2b.js" in page.text
    asset = await http.get("/assets/index-1a2b.js")
    assert asset.status_code == 200
    assert "javascript" in asset.headers["content-type"]
    assert "immutable" in asset.headers["cache-control"]  # its name changes with its content


@pytest.mark.parametrize(
    "path", ["/assets/other.js", "/assets/..%2F..%2Fsecret.txt", "/assets/%2E%2E", "/secret.txt"]
)
async def test_nothing_but_the_build_is_served(
    http: httpx.AsyncClient, build: Path, path: str
) -> None:
    answer = await http.get(path)
    assert answer.status_code == 404
    assert "not for browsers" not in answer.text


async def test_the_console_dir_setting_names_the_build(
    build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "BUILD_DIR", tmp_path / "missing")  # not the default's
    app = create_app(GatewaySettings(environment=Environment.DEVELOPMENT, console_dir=build))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        assert "index-1a2b.js" in (await client.get("/")).text


async def test_before_the_build_the_page_says_how_to_build_it(
    http: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "BUILD_DIR", tmp_path / "missing")
    answer = await http.get("/")
    assert answer.status_code == 503
    assert answer.json()["code"] == "unavailable"
    assert "make setup" in answer.json()["fix"]
    assert (await http.get("/assets/index.js")).status_code == 404
