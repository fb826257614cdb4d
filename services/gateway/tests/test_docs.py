"""The gateway's API documents: what Swagger UI needs to be useful, served without internet.

The OpenAPI document is the one the app builds (as `python -m edgeway.gateway` does in
development); the pages and their assets are asked of the app with a real HTTP client.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
from fastapi.routing import APIWebSocketRoute, iter_route_contexts
from openapi_spec_validator import validate
from starlette.routing import BaseRoute

from edgeway.common.errors import ERROR_REF
from edgeway.common.settings import Environment
from edgeway.gateway.app import create_app
from edgeway.gateway.docs import WEBSOCKET_ROUTES
from edgeway.gateway.settings import GatewaySettings

SETTINGS = GatewaySettings(
    jwt_secret="docs-test-secret-that-is-long-enough-for-hs256",
    environment=Environment.DEVELOPMENT,
    metrics_port=None,
)
APP = create_app(SETTINGS)
DOCUMENT = APP.openapi()
METHODS = {"get", "put", "post", "delete", "patch"}
INGEST_ERROR_REF = "#/components/schemas/IngestError"


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield method.upper(), path, operation


def operation(method: str, path: str) -> dict[str, Any]:
    found: dict[str, Any] = DOCUMENT["paths"][path][method.lower()]
    return found


def error_statuses(method: str, path: str) -> set[int]:
    return {int(status) for status in operation(method, path)["responses"] if int(status) >= 400}


def test_the_document_is_valid_openapi() -> None:
    assert DOCUMENT["openapi"].startswith("3.1")
    validate(DOCUMENT)  # raises with the first violation


def test_routes_that_need_a_scope_list_the_bearer_scheme_and_their_scope() -> None:
    scheme = DOCUMENT["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    assert operation("POST", "/api/v1/ingest/upload")["security"] == [{"bearer": ["ingest:write"]}]
    assert operation("GET", "/status")["security"] == [{"bearer": ["telemetry:subscribe"]}]
    assert "security" not in operation("GET", "/discover/health")  # the one public route
    secured = [op for _, path, op in operations() if path != "/discover/health"]
    assert all(op.get("security") for op in secured)
    for op in secured:  # what the token check answers
        assert {"401", "403", "503"} <= set(op["responses"]), op["operationId"]


def test_operation_ids_and_summaries_are_unique() -> None:
    ids = Counter(op["operationId"] for _, _, op in operations())
    summaries = Counter(op["summary"] for _, _, op in operations())
    assert [name for name, count in ids.items() if count > 1] == []
    assert [name for name, count in summaries.items() if count > 1] == []


def test_routes_that_read_their_own_body_describe_it() -> None:
    upload = operation("POST", "/api/v1/ingest/upload")["requestBody"]
    form = upload["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["camera_id", "files"]
    assert form["properties"]["files"]["items"] == {"type": "string", "format": "binary"}

    rtsp = operation("POST", "/api/v1/ingest/rtsp")["requestBody"]["content"]["application/json"]
    model = DOCUMENT["components"]["schemas"]["RtspIngestionRequest"]
    assert rtsp["schema"] == {"$ref": "#/components/schemas/RtspIngestionRequest"}
    assert {"rtsp_url", "camera_id"} <= set(model["required"])

    for path in ("/telemetry", "/api/telemetry"):
        content = operation("POST", path)["requestBody"]["content"]
        assert set(content) == {"application/x-protobuf", "application/octet-stream"}
    vehicle = operation("POST", "/api/v1/vehicles")["requestBody"]["content"]["application/json"]
    assert vehicle["schema"]["required"] == ["vin"]


def test_the_errors_each_route_answers_are_listed() -> None:
    assert {400, 401, 403, 413, 415, 422, 503, 504} <= error_statuses(
        "POST", "/api/v1/ingest/upload"
    )
    assert {400, 401, 403, 413, 415, 422, 429, 504} <= error_statuses("POST", "/api/v1/ingest/rtsp")
    assert {400, 404, 504} <= error_statuses("GET", "/api/v1/ingest/status/{request_id}")
    assert {400, 401, 403, 413, 415, 422, 503} <= error_statuses("POST", "/telemetry")
    assert {400, 404, 503, 504} <= error_statuses("DELETE", "/api/v1/vehicles/{vin}")


def test_every_error_response_is_the_error_object() -> None:
    for method, path, op in operations():
        for status, response in op["responses"].items():
            if int(status) < 400:
                continue
            schema = response["content"]["application/json"]["schema"]
            expected = {ERROR_REF, INGEST_ERROR_REF} if "/ingest/" in path else {ERROR_REF}
            assert schema["$ref"] in expected, f"{method} {path} {status}: {schema}"
    schemas = DOCUMENT["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    # The ingestion refusals are the error object plus the seed's fields.
    assert set(schemas["ErrorObject"]["properties"]) <= set(schemas["IngestError"]["properties"])


def test_every_reference_in_the_document_resolves() -> None:
    text = orjson.dumps(DOCUMENT).decode()
    names = set(re.findall(r'"#/components/schemas/([^"]+)"', text))
    assert names <= set(DOCUMENT["components"]["schemas"]), names - set(
        DOCUMENT["components"]["schemas"]
    )


def _websocket_paths(routes: list[BaseRoute]) -> set[str]:
    return {
        context.original_route.path
        for context in iter_route_contexts(routes)
        if isinstance(context.original_route, APIWebSocketRoute)
    }


def test_every_websocket_route_is_described() -> None:
    served = _websocket_paths(APP.routes)
    described = {route.path for route in WEBSOCKET_ROUTES}
    assert served == described
    text = DOCUMENT["info"]["description"]
    for route in WEBSOCKET_ROUTES:
        assert f"| `{route.path}` | `{route.scope.value}` |" in text


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=APP)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_documents_load_only_local_assets(http: httpx.AsyncClient, page: str) -> None:
    html = (await http.get(page)).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets, html
    assert all(url.startswith("/docs/assets/") for url in assets), assets
    assert "http://" not in html
    assert "https://" not in html
    for url in assets:
        response = await http.get(url)
        assert response.status_code == 200, url
        assert len(response.content) > 1000, url
    assert '"/openapi.json"' in html or "'/openapi.json'" in html


async def test_the_asyncapi_document_and_its_page_are_served(http: httpx.AsyncClient) -> None:
    document = (await http.get("/docs/asyncapi.json")).json()
    assert document["asyncapi"] == "3.0.0"
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert {route.path for route in WEBSOCKET_ROUTES} <= addresses
    assert SETTINGS.exchanges.broadcast in str(document["channels"])
    page = await http.get("/docs/asyncapi")
    assert page.headers["content-type"].startswith("text/html")
    assert "/docs/asyncapi.json" in page.text
    assert "http://" not in page.text
    assert "https://" not in page.text
    assert "/docs/asyncapi" in DOCUMENT["info"]["description"]


async def test_no_document_is_served_where_docs_are_off() -> None:
    app = create_app(SETTINGS.model_copy(update={"docs": False}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        for path in ("/docs", "/openapi.json", "/docs/asyncapi", "/docs/asyncapi.json"):
            assert (await client.get(path)).status_code == 404, path
