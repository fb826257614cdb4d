"""The error object on everything FastAPI, Starlette and a service's internal server answer.

A small FastAPI app with the handlers installed, asked with a real HTTP client (httpx over
ASGI); WebSocket upgrades go to a real uvicorn server (the project's configuration) on a free
port, since a refused upgrade is the server's doing as much as the app's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from fastapi import FastAPI, HTTPException, WebSocket
from faststream.rabbit import RabbitBroker

from edgeway.common.errors import ERROR_REF, ErrorObject, install_error_handlers
from edgeway.common.http_limits import uvicorn_config
from edgeway.common.schemas.errors import ErrorCode, ErrorFrame
from edgeway.common.service import service_app
from edgeway.common.settings import CommonSettings
from edgeway.common.testing import free_port

ERROR_KEYS = {"type", "code", "reason", "fix", "details"}


def sample_app(*, docs_url: str | None = "/docs") -> FastAPI:
    app = FastAPI(docs_url=docs_url)

    @app.get("/items/{number}")
    async def item(number: int, size: int = 1) -> dict[str, int]:
        return {"number": number, "size": size}

    @app.get("/taken")
    async def taken() -> None:
        raise HTTPException(409, "that name is taken")

    @app.get("/broken")
    async def broken() -> None:
        raise RuntimeError("a bug")

    @app.websocket("/live/{room}")
    async def live(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        await websocket.send_text(room)
        await websocket.close()

    install_error_handlers(app, docs_url=docs_url)
    return app


def client(app: Any) -> httpx.AsyncClient:
    # An exception after the 500 was sent is the server's to log: the client sees the answer.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response's body, checked to be the error object with this status and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) <= ERROR_KEYS, body
    assert body["type"] == "error"
    assert body["code"] == code, body
    assert body["reason"], body
    return body


async def test_an_unknown_route_is_a_404_that_points_at_the_documents() -> None:
    async with client(sample_app()) as http:
        body = error_of(await http.get("/itemz/1"), 404, "not_found")
    assert body["reason"] == "no route GET /itemz/1"
    assert body["fix"] == "the routes are listed at /docs"


async def test_without_documents_the_404_points_nowhere() -> None:
    async with client(sample_app(docs_url=None)) as http:
        body = error_of(await http.post("/itemz/1"), 404, "not_found")
    assert "fix" not in body


async def test_plain_http_on_a_websocket_route_is_426_with_upgrade() -> None:
    async with client(sample_app()) as http:
        response = await http.get("/live/kitchen")
    body = error_of(response, 426, "websocket_route")
    assert response.headers["upgrade"] == "websocket"
    assert "/live/kitchen is a WebSocket route" in body["reason"]
    assert "WebSocket client" in body["fix"]


async def test_a_method_the_route_does_not_take_is_405_with_allow() -> None:
    async with client(sample_app()) as http:
        response = await http.delete("/items/3")
    body = error_of(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET"
    assert body["reason"] == "DELETE is not allowed on /items/3"
    assert body["fix"] == "use GET"


async def test_http_exception_keeps_its_status_and_detail() -> None:
    async with client(sample_app()) as http:
        body = error_of(await http.get("/taken"), 409, "conflict")
    assert body["reason"] == "that name is taken"


async def test_validation_errors_are_422_with_each_error_in_details() -> None:
    async with client(sample_app()) as http:
        body = error_of(await http.get("/items/three?size=big"), 422, "validation_error")
    assert body["reason"].startswith("path.number: Input should be a valid integer")
    assert "query.size" in body["reason"]
    assert [detail["loc"] for detail in body["details"]] == [["path", "number"], ["query", "size"]]
    assert all(set(detail) == {"loc", "msg", "type"} for detail in body["details"])


async def test_an_unhandled_exception_is_a_500_without_a_traceback() -> None:
    async with client(sample_app()) as http:
        body = error_of(await http.get("/broken"), 500, "internal_error")
    assert "a bug" not in json.dumps(body)
    assert "Traceback" not in json.dumps(body)


async def test_the_openapi_document_describes_422_as_the_error_object() -> None:
    document = sample_app().openapi()
    responses = document["paths"]["/items/{number}"]["get"]["responses"]
    assert responses["422"]["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert set(schemas["ErrorObject"]["required"]) == {"code", "reason"}


def test_websocket_error_frames_are_the_same_object() -> None:
    frame = json.loads(ErrorFrame(code=ErrorCode.TOO_LARGE, reason="over 1 MiB").encode())
    assert frame == {"type": "error", "code": "too_large", "reason": "over 1 MiB"}
    assert set(ErrorObject.model_fields) <= set(ErrorFrame.model_fields)


# --- real servers ----------------------------------------------------------------------------


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    """Serve an ASGI app with uvicorn (the project's configuration, no lifespan) on a free
    port; yields a function that starts one and returns its base URL."""
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(app: Any) -> str:
        port = free_port()
        config = uvicorn_config(
            app, CommonSettings(), host="127.0.0.1", port=port, lifespan="off", loop="asyncio"
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        servers.append((server, task))
        for _ in range(500):
            if server.started:
                return f"127.0.0.1:{port}"
            await asyncio.sleep(0.01)
        raise AssertionError("the server did not start in 5 s")

    yield start
    for server, task in servers:
        server.should_exit = True
        await task


async def refused_upgrade(url: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url):
            pass
    response = refused.value.response
    return response.status_code, json.loads(response.body or b"{}")


async def test_an_unknown_websocket_path_is_refused_with_404_not_403(serve: Any) -> None:
    address = await serve(sample_app())
    status, body = await refused_upgrade(f"ws://{address}/live")  # /live/{room} needs a room
    assert status == 404
    assert body["code"] == "not_found"
    assert body["reason"] == "no WebSocket route at /live"
    assert body["fix"] == "the WebSocket routes are listed at /docs"
    async with websockets.connect(f"ws://{address}/live/kitchen") as ws:  # the real route works
        assert await ws.recv() == "kitchen"


def internal_app() -> Any:
    # Never started (no lifespan): the operations endpoints answer without a broker.
    return service_app(
        RabbitBroker("amqp://guest:guest@127.0.0.1:1/"),
        service="sample",
        settings=CommonSettings(),
        checks={},
    )


async def test_a_services_internal_port_answers_unknown_paths_with_the_error_object() -> None:
    async with client(internal_app()) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        body = error_of(await http.get("/api/v1/anything"), 404, "not_found")
        assert "internal port" in body["reason"]
        assert body["fix"] == "it serves /healthz, /readyz, /metrics"
        response = await http.post("/healthz")
        body = error_of(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "GET, HEAD"


async def test_a_services_internal_port_refuses_websockets_with_404(serve: Any) -> None:
    address = await serve(internal_app())
    status, body = await refused_upgrade(f"ws://{address}/healthz")
    assert status == 404
    assert body["code"] == "not_found"
