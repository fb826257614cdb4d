"""`DirectSockets`: the fan-out sockets' upgrades and the loggers' upload POSTs go to their
endpoints without FastAPI's per-request stack, with the same refusals; everything else goes to
the app (`test_telemetry_uploads.py` compares the upload's answers on both paths).

Driven at the ASGI level, without the lifespan (the broker is never reached). The process
tests (`test_occupancy.py`, `tests/test_occupancy_e2e.py`) serve real clients through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.routing import APIWebSocketRoute, iter_route_contexts

from edgeway.common.settings import Environment
from edgeway.common.testing import TEST_SECRET, make_token
from edgeway.gateway.app import DIRECT_POSTS, DIRECT_SOCKETS, DirectSockets, create_app
from edgeway.gateway.settings import GatewaySettings

SUBSCRIBE = make_token("occupancy:subscribe", "telemetry:subscribe")


class Exchange:
    """One WebSocket upgrade: what the server sent, and whether the FastAPI app was asked."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.app_called: list[str] = []

    async def receive(self) -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def refusal(self) -> tuple[int, dict[str, Any]]:
        start, body = self.sent
        assert start["type"] == "websocket.http.response.start"
        return start["status"], orjson.loads(body["body"])


def direct(exchange: Exchange, **settings: Any) -> DirectSockets:
    app = DirectSockets(
        create_app(
            GatewaySettings(
                jwt_secret=TEST_SECRET,
                environment=Environment.DEVELOPMENT,
                metrics_port=None,
                **settings,
            )
        )
    )

    async def fastapi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        exchange.app_called.append(scope.get("path", scope["type"]))

    app.app = fastapi  # type: ignore[assignment]
    return app


def websocket_scope(path: str, *, token: str | None = None, origin: str | None = None) -> Any:
    headers = [(b"host", b"gateway")]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return {
        "type": "websocket",
        "path": path,
        "raw_path": path.encode(),
        "query_string": f"token={token}".encode() if token else b"",
        "headers": headers,
        "scheme": "ws",
        "server": ("gateway", 80),
        "client": ("127.0.0.1", 50000),
        "subprotocols": [],
        "extensions": {"websocket.http.response": {}},
    }


@pytest.mark.parametrize("path", sorted(DIRECT_SOCKETS))
@pytest.mark.parametrize(
    ("token", "origin", "status", "code"),
    [
        (None, None, 401, "unauthorized"),
        ("garbage", None, 401, "unauthorized"),
        (make_token("occupancy:publish"), None, 403, "forbidden"),
        (SUBSCRIBE, "https://evil.example", 403, "forbidden"),
        (SUBSCRIBE, None, 503, "unavailable"),  # admitted, but the broker is not reached
    ],
)
async def test_a_direct_socket_is_refused_like_a_route_without_the_app(
    path: str, token: str | None, origin: str | None, status: int, code: str
) -> None:
    exchange = Exchange()
    await direct(exchange)(
        websocket_scope(path, token=token, origin=origin), exchange.receive, exchange.send
    )
    got, body = exchange.refusal()
    assert (got, body["type"], body["code"]) == (status, "error", code)
    assert body["reason"]
    assert exchange.app_called == []


async def test_other_sockets_and_http_go_to_the_app() -> None:
    exchange = Exchange()
    app = direct(exchange)
    await app(websocket_scope("/model/ws/connect"), exchange.receive, exchange.send)
    await app(
        {**websocket_scope("/client/ws/connect/"), "type": "http"}, exchange.receive, exchange.send
    )
    await app({"type": "lifespan"}, exchange.receive, exchange.send)
    assert exchange.app_called == ["/model/ws/connect", "/client/ws/connect/", "lifespan"]
    assert exchange.sent == []


def test_each_direct_socket_is_the_apps_route_of_its_path() -> None:
    app = create_app(GatewaySettings(jwt_secret=TEST_SECRET, environment=Environment.DEVELOPMENT))
    routes = {
        context.original_route.path: context.original_route.endpoint
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIWebSocketRoute)
    }
    for path, endpoint in DIRECT_SOCKETS.items():
        assert routes[path] is endpoint


def http_scope(path: str, method: str = "POST") -> Any:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"gateway"), (b"content-type", b"application/x-protobuf")],
        "scheme": "http",
        "server": ("gateway", 80),
        "client": ("127.0.0.1", 50000),
    }


async def request_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def answer(exchange: Exchange) -> tuple[int, dict[str, Any]]:
    start, body = exchange.sent
    assert start["type"] == "http.response.start"
    return start["status"], orjson.loads(body["body"])


@pytest.mark.parametrize("path", sorted(DIRECT_POSTS))
async def test_an_upload_is_answered_without_the_app(path: str) -> None:
    exchange = Exchange()
    await direct(exchange)(http_scope(path), request_body, exchange.send)
    status, body = answer(exchange)
    assert (status, body["code"]) == (401, "unauthorized")
    assert exchange.app_called == []


async def test_other_methods_and_exported_traces_go_to_the_app(tmp_path: Path) -> None:
    exchange = Exchange()
    await direct(exchange)(http_scope("/telemetry", "GET"), request_body, exchange.send)
    traced = direct(exchange, otel_exporter="jsonl", otel_file=tmp_path / "spans.jsonl")
    await traced(http_scope("/telemetry"), request_body, exchange.send)
    assert exchange.app_called == ["/telemetry", "/telemetry"]


async def test_an_unexpected_failure_is_the_apps_500() -> None:
    exchange = Exchange()
    app = direct(exchange)

    async def broken(*_: Any) -> Any:
        raise RuntimeError("a bug")

    app.posts = {"/telemetry": broken}
    with pytest.raises(RuntimeError):  # for the server to log, as FastAPI's stack does
        await app(http_scope("/telemetry"), request_body, exchange.send)
    status, body = answer(exchange)
    assert (status, body["code"]) == (500, "internal_error")
