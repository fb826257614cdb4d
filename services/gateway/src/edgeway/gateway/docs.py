"""How the gateway describes itself: what its OpenAPI document adds to FastAPI's.

- **Tokens**: every route that needs a scope lists the `bearer` scheme with that scope
  (`edgeway.gateway.state.RequireScope`), so Swagger UI has an Authorize button; those routes
  also list the 401, 403 and 503 their token check can answer.
- **Errors**: every error response refers to the one `ErrorObject` schema
  (`edgeway.common.errors`; the ingestion routes' `IngestError` adds the seed's fields to it).
- **Bodies**: routes that read their body themselves (to hold it to a limit while it streams)
  describe it with `openapi_extra`; a JSON body's model is added to the components here.
- **WebSocket routes**: OpenAPI cannot describe them, so they are a section of the document's
  description, one row per route (a test checks every WebSocket route the app serves has one).
- **Names**: a summary shared by several operations (a seed path and its newer alias) gets the
  path added, so Swagger UI never shows two operations of the same name.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from edgeway.common import asyncapi
from edgeway.common.errors import ERROR_REF, STATUS_DESCRIPTIONS
from edgeway.common.settings import ExchangeNames
from edgeway.gateway.auth import HOW_TO_AUTHENTICATE, Scope

# What the token check of a route with a scope can answer, besides the route's own errors.
SECURITY_STATUSES = (401, 403, 503)
COMPONENTS = "#/components/schemas/{model}"
ASYNCAPI_URL = "/docs/asyncapi"
ASYNCAPI_JSON_URL = "/docs/asyncapi.json"

# Models of JSON bodies that routes read themselves, added to the document's components.
_body_models: dict[str, type[BaseModel]] = {}


def json_body(model: type[BaseModel], *, description: str) -> dict[str, Any]:
    """`openapi_extra` for a route that reads a JSON body of `model` itself."""
    _body_models[model.__name__] = model
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {
                "application/json": {"schema": {"$ref": COMPONENTS.format(model=model.__name__)}}
            },
        }
    }


def binary_body(*media_types: str, description: str) -> dict[str, Any]:
    """`openapi_extra` for a route that reads a binary body (any of `media_types`) itself."""
    schema = {"type": "string", "format": "binary"}
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {media_type: {"schema": schema} for media_type in media_types},
        }
    }


@dataclass(frozen=True, slots=True)
class WebSocketRoute:
    path: str
    scope: Scope
    what: str


WEBSOCKET_ROUTES = (
    WebSocketRoute(
        "/model/ws/connect",
        Scope.OCCUPANCY_PUBLISH,
        "camera models send `frame_result` JSON; bad input gets an error frame (Project Omega)",
    ),
    WebSocketRoute(
        "/client/ws/connect",
        Scope.OCCUPANCY_SUBSCRIBE,
        "room occupancy: each place's latest at once, then every change (Project Omega)",
    ),
    WebSocketRoute(
        "/ws",
        Scope.TELEMETRY_SUBSCRIBE,
        "telemetry dashboards: `log`, `history`, then each `telemetry` record and logger line",
    ),
    WebSocketRoute(
        "/telemetry/control/ws",
        Scope.TELEMETRY_PUBLISH,
        "vehicle loggers (`?vin=`): commands in, acknowledgements and log lines out",
    ),
    WebSocketRoute(
        "/ws/phone",
        Scope.VIDEO_PUBLISH,
        "phones (`?device=`): JPEG frames with an 8-byte timestamp, IMU and mode JSON, files",
    ),
    WebSocketRoute(
        "/ws/video",
        Scope.VIDEO_PUBLISH,
        "phones and drones (`?device=`): the H.264 byte stream",
    ),
    WebSocketRoute(
        "/ws/video/consume",
        Scope.VIDEO_SUBSCRIBE,
        "H.264 packets of a stream, from its last keyframe; text `ping` is answered `pong`; "
        "`?timing=1`: each packet's capture time before it",
    ),
    WebSocketRoute(
        "/ws/video/frames",
        Scope.VIDEO_SUBSCRIBE,
        "a stream's decoded JPEGs, the latest at once, for viewers without H.264; "
        "`?timing=1` as for `/ws/video/consume`",
    ),
    WebSocketRoute(
        "/ws/viewer",
        Scope.VIDEO_SUBSCRIBE,
        "viewers: trajectory, restarts and IMU out; commands to the phones in (`video:control`)",
    ),
    WebSocketRoute(
        "/ws/ingest/{request_id}",
        Scope.INGEST_READ,
        "an ingestion request's status at once, then each of its progress events",
    ),
    WebSocketRoute(
        "/ws/tracking/{task_id}",
        Scope.TRACKING_SUBSCRIBE,
        "a tracking task's `tracking_update`, `status_update` and `media_available` messages",
    ),
    WebSocketRoute(
        "/ws/detections",
        Scope.TRACKING_PUBLISH,
        "edge devices send their cameras' detections; bad input gets an error frame",
    ),
)


def description(*, docs_url: str | None) -> str:
    """The document's description: tokens, the error object, and the WebSocket routes."""
    rows = "\n".join(
        f"| `{route.path}` | `{route.scope.value}` | {route.what} |" for route in WEBSOCKET_ROUTES
    )
    return f"""\
The only public surface of Edgeway: HTTP and WebSocket routes for producers (camera models,
phones, vehicle loggers, uploaders) and clients (dashboards, viewers, operators).

## Tokens

Routes that need a scope take a JWT as `Authorization: Bearer <token>` (the **Authorize**
button) or as `?token=`. {HOW_TO_AUTHENTICATE}.

## Errors

Every error, HTTP or WebSocket, is one object:
`{{"type": "error", "code", "reason", "fix"?, "details"?}}` (the `ErrorObject` schema). `code` is
for programs, `reason` says what went wrong, `fix` what to do about it, `details` what a
program may need (validation errors, rejected files). The ingestion routes add the fields
their seed's clients read (`error`, `message`, `details`, `request_id`, `timestamp`). A path
no route has is a 404 whose `fix` points here; plain HTTP on a WebSocket route is a 426.

## WebSocket routes

OpenAPI cannot describe WebSockets, so they are listed here; their messages, and every AMQP
exchange, queue and routing key behind them, are in the AsyncAPI document (`{ASYNCAPI_URL}`,
JSON at `{ASYNCAPI_JSON_URL}`). Each takes its token as
`?token=` (browsers cannot set headers on a WebSocket) or the `Authorization` header, and
refuses the upgrade with an HTTP status and the error object when it is missing or lacks
the scope; an unknown WebSocket path is refused with 404.

| path | scope | what |
|---|---|---|
{rows}
"""


def asyncapi_routes(names: ExchangeNames) -> APIRouter:
    """`/docs/asyncapi` (a page) and `/docs/asyncapi.json`: the AsyncAPI 3.0 document of every
    WebSocket message and AMQP flow (`edgeway.common.asyncapi`), built once, on first ask."""
    router = APIRouter(include_in_schema=False)

    @functools.cache
    def built() -> bytes:
        return orjson.dumps(asyncapi.document(names))

    @router.get(ASYNCAPI_JSON_URL)
    async def asyncapi_json() -> Response:
        return Response(built(), media_type="application/json")

    @router.get(ASYNCAPI_URL)
    async def asyncapi_page() -> HTMLResponse:
        return HTMLResponse(asyncapi.html(ASYNCAPI_JSON_URL))

    return router


def document(app: FastAPI) -> None:
    """Extend the app's OpenAPI document (FastAPI's documented way: replace `app.openapi`)."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _extend(build())
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _extend(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if _body_models:
        _, defs = models_json_schema(
            [(model, "validation") for model in _body_models.values()], ref_template=COMPONENTS
        )
        components.update(defs.get("$defs", {}))
    operations = [
        (path, operation)
        for path, methods in schema.get("paths", {}).items()
        for operation in methods.values()
    ]
    for _, operation in operations:
        if operation.get("security"):
            responses = operation.setdefault("responses", {})
            for status in SECURITY_STATUSES:
                responses.setdefault(
                    str(status),
                    {
                        "description": STATUS_DESCRIPTIONS[status],
                        "content": {"application/json": {"schema": {"$ref": ERROR_REF}}},
                    },
                )
    summaries = Counter(operation.get("summary") for _, operation in operations)
    for path, operation in operations:
        if summaries[operation.get("summary")] > 1:
            operation["summary"] = f"{operation.get('summary')} ({path})"
