"""The one error object of every Edgeway HTTP answer, and what puts it on every error.

`{"type": "error", "code", "reason", "fix"?, "details"?}`: `code` is for programs (snake_case,
stable), `reason` says what went wrong in words, `fix` what the caller can do about it, and
`details` carries what a program may need (the validation errors, the rejected files). WebSocket
error frames are the same object (`edgeway.common.schemas.errors.ErrorFrame`), so a client
parses one shape wherever it meets an error.

`install_error_handlers` gives a FastAPI app this shape for everything FastAPI and Starlette
answer on their own: HTTPException (404, 405 ...), request validation (422), an unhandled
exception (500), a path no route has (404 with a pointer to the API documents), plain HTTP on a
WebSocket route (426), and a WebSocket upgrade to a path no WebSocket route has (404 instead of
Starlette's 403, which reads as an auth problem). `edgeway.common.service` does the same for
each service's internal HTTP server.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Literal

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketClose

# `code` for an HTTP status when the answer has no more precise one. The names already used by
# Edgeway's own refusals win over the HTTP phrase (`too_large`, not `content_too_large`).
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    426: "websocket_route",
    429: "rate_limited",
    431: "headers_too_large",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
}

# The error object's schema in an OpenAPI document (FastAPI names components after the class).
ERROR_REF = "#/components/schemas/ErrorObject"

# What each status means in the API documents' response lists.
STATUS_DESCRIPTIONS = {
    400: "The request is malformed: its body, a header or a parameter cannot be used.",
    401: "No valid token: send `Authorization: Bearer <token>` (or `?token=`).",
    403: "The token lacks the scope this route needs, or may not act for what it names.",
    404: "No such thing (or no such route).",
    405: "The route does not take this method (`Allow` lists those it takes).",
    409: "The request conflicts with the state of what it names.",
    413: "The body is over its limit.",
    415: "The body's content type is not one this route takes.",
    422: "The request is well formed but cannot be taken (see `code`).",
    426: "A WebSocket route asked with plain HTTP: connect with a WebSocket client.",
    429: "Too many at once: try again later.",
    502: "The service behind the gateway refused in a way the gateway cannot name.",
    503: "Not available now (the broker or a service's database): try again (`Retry-After`).",
    504: "The service behind the gateway did not answer in time.",
}


class ErrorObject(BaseModel):
    """An error answer: what went wrong (`code`, `reason`) and what to do about it (`fix`)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "error",
                    "code": "not_found",
                    "reason": "no route GET /api/v1/ingest/stauts/42",
                    "fix": "the routes are listed at /docs",
                }
            ]
        },
    )

    type: Literal["error"] = "error"
    code: str = Field(description="What went wrong, for programs: stable, snake_case.")
    reason: str = Field(description="What went wrong, in words.")
    fix: str | None = Field(default=None, description="What the caller can do about it.")
    details: Any = Field(
        default=None, description="What a program may need: validation errors, rejected files."
    )

    def body(self) -> dict[str, Any]:
        """The JSON object as it is sent: fields without a value are left out."""
        return self.model_dump(mode="json", exclude_none=True)

    def response(self, status: int, *, headers: Mapping[str, str] | None = None) -> Response:
        """This error as an HTTP answer (or, on a WebSocket upgrade, as its denial response)."""
        return Response(
            orjson.dumps(self.body()), status, headers=headers, media_type="application/json"
        )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def code_for(status: int) -> str:
    """The `code` of an error that has only its HTTP status to go by."""
    known = STATUS_CODES.get(status)
    if known is not None:
        return known
    return _phrase(status).lower().replace(" ", "_").replace("-", "_").replace("'", "")


def error_response(
    status: int,
    code: str,
    reason: str,
    *,
    fix: str | None = None,
    details: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """`ErrorObject(code, reason, fix, details)` answered with `status`."""
    return ErrorObject(code=code, reason=reason, fix=fix, details=details).response(
        status, headers=headers
    )


def error_responses(*statuses: int, model: type[ErrorObject] = ErrorObject) -> dict[int | str, Any]:
    """A route's `responses=`: each status documented with the error object's schema."""
    return {
        status: {"model": model, "description": STATUS_DESCRIPTIONS.get(status, code_for(status))}
        for status in statuses
    }


# --- FastAPI ---------------------------------------------------------------------------------


def validation_reason(errors: list[Any], *, limit: int = 3) -> str:
    """Pydantic's errors in one line: `where: what; ...` for the first `limit` of them."""
    parts = []
    for error in errors[:limit]:
        where = ".".join(str(part) for part in error.get("loc", ()))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    more = len(errors) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _validation_details(errors: list[Any]) -> list[dict[str, Any]]:
    # Without `input` (it may hold a token or a large body) and `ctx` (not always JSON).
    return [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg"), "type": error.get("type")}
        for error in errors
    ]


def install_error_handlers(app: FastAPI, *, docs_url: str | None) -> None:
    """Give every error FastAPI or Starlette answers on its own the error object.

    `docs_url` is where the API documents are served (None when they are off): a 404 for an
    unknown route points there.
    """

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        if status in (204, 304):  # no body allowed
            return Response(status_code=status, headers=exc.headers)
        phrase = _phrase(status)
        reason = exc.detail if exc.detail and exc.detail != phrase else phrase
        fix = None
        if status == 404:
            reason = f"nothing at {request.url.path}"
            fix = _docs_fix(docs_url)
        elif status == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            reason = f"{request.method} is not allowed on {request.url.path}"
            fix = f"use {allowed}" if allowed else None
        return ErrorObject(code=code_for(status), reason=reason, fix=fix).response(
            status, headers=exc.headers
        )

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        return ErrorObject(
            code="validation_error",
            reason=validation_reason(errors),
            fix=_docs_fix(docs_url, "the route's parameters are described at"),
            details=_validation_details(errors),
        ).response(422)

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Starlette's ServerErrorMiddleware sends this, then raises the exception again for the
        # server to log with its traceback.
        return ErrorObject(
            code="internal_error",
            reason="the server failed to answer this request; its log has the details",
            fix="try again; if it keeps failing, report it with the time of the request",
        ).response(500)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    app.router.default = UnmatchedRoute(app, docs_url=docs_url)

    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_errors(build_openapi())
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it


def _docs_fix(docs_url: str | None, lead: str = "the routes are listed at") -> str | None:
    return f"{lead} {docs_url}" if docs_url else None


class UnmatchedRoute:
    """What answers a request no route took (the app router's `default`).

    - plain HTTP to a WebSocket route: 426 with `Upgrade: websocket`;
    - any other HTTP request: 404, pointing at the API documents;
    - a WebSocket upgrade: a 404 denial response (Starlette's default closes before accepting,
      which the server turns into a 403 that looks like an auth failure). A server without the
      denial-response extension gets a close with the reason instead.
    """

    def __init__(self, app: FastAPI, *, docs_url: str | None) -> None:
        self.app = app
        self.docs_url = docs_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "websocket":
            reason = f"no WebSocket route at {path}"
            if "websocket.http.response" in scope.get("extensions", {}):
                await ErrorObject(code="not_found", reason=reason, fix=self._ws_fix()).response(
                    404
                )(scope, receive, send)
            else:
                await WebSocketClose(code=1008, reason=reason)(scope, receive, send)
            return
        if self.is_websocket_route(scope):
            error = ErrorObject(
                code="websocket_route",
                reason=f"{path} is a WebSocket route: plain HTTP cannot use it",
                fix="connect with a WebSocket client (ws:// or wss://), which sends the "
                "Upgrade: websocket handshake",
            )
            headers = {"Upgrade": "websocket", "Connection": "Upgrade"}
            await error.response(426, headers=headers)(scope, receive, send)
            return
        method = scope.get("method", "GET")
        error = ErrorObject(
            code="not_found", reason=f"no route {method} {path}", fix=_docs_fix(self.docs_url)
        )
        await error.response(404)(scope, receive, send)

    def _ws_fix(self) -> str | None:
        return _docs_fix(self.docs_url, "the WebSocket routes are listed at")

    def is_websocket_route(self, scope: Scope) -> bool:
        """Whether a WebSocket route takes this path (asked as an upgrade would be)."""
        probe = {**scope, "type": "websocket"}
        for route in self.app.router.routes:
            match, _ = route.matches(probe)
            if match is Match.FULL:
                return True
        return False


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document as the handlers answer: the `ErrorObject` schema among its
    components, and FastAPI's own 422 (`HTTPValidationError`) replaced by it."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault(
        ErrorObject.__name__,
        ErrorObject.model_json_schema(ref_template="#/components/schemas/{model}"),
    )
    error_ref = {"$ref": ERROR_REF}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            response = operation.get("responses", {}).get("422")
            if response is None:
                continue
            for content in response.get("content", {}).values():
                if content.get("schema") == {"$ref": "#/components/schemas/HTTPValidationError"}:
                    content["schema"] = error_ref
                    response["description"] = STATUS_DESCRIPTIONS[422]
    text = orjson.dumps(schema.get("paths", {}))
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{unused}".encode() not in text:
            components.pop(unused, None)
    return schema
