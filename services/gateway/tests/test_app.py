"""Every HTTP error the gateway answers is the one error object (`edgeway.common.errors`).

The gateway app as `python -m edgeway.gateway` builds it, asked with a real HTTP client over
ASGI, without its lifespan: it has not reached the broker, so a route that passes its token
check answers 503. WebSocket upgrades need a real server: the last test starts the gateway
process (connected: it reaches a private RabbitMQ virtual host).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets

from edgeway.common.settings import Environment
from edgeway.common.testing import (
    TEST_SECRET,
    ServiceProcess,
    bearer,
    gateway_fixture,
)
from edgeway.gateway.app import create_app
from edgeway.gateway.ingest.api import seed_error
from edgeway.gateway.settings import GatewaySettings

ERROR_KEYS = {"type", "code", "reason", "fix", "details"}
SEED_INGEST_KEYS = {"error", "message", "details", "request_id", "timestamp"}


def settings(**overrides: Any) -> GatewaySettings:
    return GatewaySettings(
        jwt_secret=TEST_SECRET, environment=Environment.DEVELOPMENT, metrics_port=None, **overrides
    )


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(settings()))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) <= ERROR_KEYS, body
    assert (body["type"], body["code"]) == ("error", code), body
    assert body["reason"]
    return body


async def test_an_unknown_route_points_at_the_documents(http: httpx.AsyncClient) -> None:
    body = error_of(await http.get("/api/v1/ingest/stauts/1"), 404, "not_found")
    assert body["reason"] == "no route GET /api/v1/ingest/stauts/1"
    assert body["fix"] == "the routes are listed at /docs"


@pytest.mark.parametrize(
    "path", ["/ws", "/client/ws/connect", "/ws/ingest/0190a0a0-0000-7000-8000-000000000000"]
)
async def test_plain_http_on_a_websocket_route_is_426(http: httpx.AsyncClient, path: str) -> None:
    response = await http.get(path)
    body = error_of(response, 426, "websocket_route")
    assert response.headers["upgrade"] == "websocket"
    assert f"{path} is a WebSocket route" in body["reason"]


async def test_a_wrong_method_is_405_with_allow(http: httpx.AsyncClient) -> None:
    response = await http.delete("/model/count")
    error_of(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET"


async def test_refused_tokens_are_the_error_object(http: httpx.AsyncClient) -> None:
    missing = await http.post("/api/v1/ingest/upload")
    body = error_of(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "edgeway-token" in body["reason"]
    wrong_scope = bearer("video:subscribe")
    body = error_of(await http.get("/model/count", headers=wrong_scope), 403, "forbidden")
    assert body["reason"] == "the token lacks scope occupancy:subscribe"


async def test_before_the_broker_is_reached_routes_answer_503_with_retry_after(
    http: httpx.AsyncClient,
) -> None:
    headers = bearer("occupancy:subscribe")
    response = await http.get("/model/count", headers=headers)
    body = error_of(response, 503, "unavailable")
    assert response.headers["retry-after"] == "5"
    assert body["fix"] == "try again in 5 s"


def test_ingestion_errors_keep_the_seed_fields_beside_the_error_object() -> None:
    """TrackShift's clients parse `error` and `message` (replaced-systems.md)."""
    response = seed_error(400, "invalid_camera_id", "camera_id must be ...")
    body = json.loads(bytes(response.body))
    assert set(body) == {"type", "code", "reason"} | SEED_INGEST_KEYS
    assert (body["type"], body["code"], body["reason"]) == (
        "error",
        "invalid_camera_id",
        "camera_id must be ...",
    )
    assert (body["error"], body["message"]) == (body["code"], body["reason"])
    assert body["details"] is None
    assert body["request_id"] is None
    assert body["timestamp"].endswith("+00:00")


async def test_without_documents_there_is_no_pointer_and_no_docs() -> None:
    transport = httpx.ASGITransport(app=create_app(settings(docs=False)))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        for path in ("/docs", "/openapi.json", "/docs/assets/swagger-ui-bundle.js"):
            body = error_of(await http.get(path), 404, "not_found")
            assert "fix" not in body


# --- the real process ------------------------------------------------------------------------


gateway = gateway_fixture(EDGEWAY_DOCS="true")


@pytest.mark.connected
async def test_the_real_server_refuses_an_unknown_websocket_path_with_404(
    gateway: ServiceProcess,
) -> None:
    url = gateway.url.replace("http", "ws")
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(f"{url}/ws/nothing-here"):
            pass
    assert refused.value.response.status_code == 404  # not 403: nothing was wrong with auth
    body = json.loads(refused.value.response.body or b"{}")
    assert (body["type"], body["code"]) == ("error", "not_found")
    assert body["reason"] == "no WebSocket route at /ws/nothing-here"
    assert body["fix"] == "the WebSocket routes are listed at /docs"
    # And plain HTTP on a WebSocket route, through the real server: 426.
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{gateway.url}/client/ws/connect")
    assert response.status_code == 426
    assert response.headers["upgrade"] == "websocket"
    assert response.json()["code"] == "websocket_route"
