"""The ingestion HTTP API (TrackShift's): image uploads (`POST /api/v1/ingest/upload`, a multipart
form read as it streams, under caps) and RTSP captures (`POST /api/v1/ingest/rtsp`) as requests
the ingestion service opens and runs; their status, cancel and progress socket
(`WS /ws/ingest/{request_id}`). A request is its caller's (the token's subject): to anyone else
but an `ingest:admin` token it does not exist (404). Errors carry the seed's `ErrorResponse`
fields beside the error object's, which its clients parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict, ValidationError

from edgeway.common.envelope import Envelope
from edgeway.common.errors import ErrorObject, error_responses, validation_reason
from edgeway.common.logging import get_logger
from edgeway.common.media import MediaRejected, inspect_image
from edgeway.common.schemas.ingest import (
    HEADER_CAMERA_ID,
    HEADER_FILE_ID,
    HEADER_FILE_NAME,
    HEADER_KIND,
    HEADER_REQUEST_ID,
    MAX_FILE_NAME,
    UPLOAD_FILE_TYPE,
    URL_REFUSED,
    AcceptedFile,
    Caller,
    CancelRequest,
    CreateUpload,
    FileKind,
    FrameMetadata,
    FramesPage,
    GetStatus,
    IngestReply,
    RejectedFile,
    RtspIngestionRequest,
    StartCapture,
    check_camera_id,
)
from edgeway.common.topology import Channels
from edgeway.gateway.auth import Principal, Scope
from edgeway.gateway.docs import json_body
from edgeway.gateway.ingest.multipart import FormError, UploadLimits, read_form
from edgeway.gateway.limits import RefusedBody, read_json_body
from edgeway.gateway.link import ServiceUnavailableError
from edgeway.gateway.state import Gateway, GatewayDep, admit_websocket, require

UPLOAD_ENDPOINT = "/api/v1/ingest/upload"
RTSP_ENDPOINT = "/api/v1/ingest/rtsp"
STATUS_ENDPOINT = "/api/v1/ingest/status/{request_id}"
CANCEL_ENDPOINT = "/api/v1/ingest/rtsp/{request_id}/cancel"
PROGRESS_ENDPOINT = "/ws/ingest/{request_id}"
SERVICE = "ingestion"
MAX_JSON_BYTES = 64 * 1024  # an RTSP request body (a URL and a small `meta`)
PAGE_QUERY = ("limit", "cursor")  # the status's query: which page of frames
# The service's refusals, as HTTP statuses.
REPLY_STATUS = {
    "invalid": 400,
    "not_found": 404,
    "conflict": 409,
    URL_REFUSED: 422,
    "stream_limit": 429,
}

router = APIRouter()
log = get_logger("edgeway.gateway.ingest")


class IngestError(ErrorObject):
    """The error object, plus the fields of the seed's `ErrorResponse`
    (`{error, message, details, request_id, timestamp}`), which TrackShift's clients parse:
    `error` repeats `code` and `message` repeats `reason`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "error",
                    "code": "invalid_camera_id",
                    "reason": "camera_id must be 1 to 100 letters, digits, '_', '-' or '.' ...",
                    "error": "invalid_camera_id",
                    "message": "camera_id must be 1 to 100 letters, digits, '_', '-' or '.' ...",
                    "details": None,
                    "request_id": None,
                    "timestamp": "2026-12-06T14:00:00.000000+00:00",
                }
            ]
        }
    )

    error: str
    message: str
    request_id: str | None = None
    timestamp: str

    def body(self) -> dict[str, Any]:
        # The seed sent `details` and `request_id` always, null when empty.
        return {**super().body(), "details": self.details, "request_id": self.request_id}


def seed_error(
    status: int,
    error: str,
    message: str,
    *,
    details: Any = None,
    request_id: str | None = None,
    fix: str | None = None,
) -> Response:
    """The error object with the seed's fields."""
    return IngestError(
        code=error,
        reason=message,
        fix=fix,
        details=details,
        error=error,
        message=message,
        request_id=request_id,
        timestamp=datetime.now(UTC).isoformat(),
    ).response(status)


def error_response(
    gateway: Gateway,
    status: int,
    error: str,
    message: str,
    *,
    endpoint: str,
    details: Any = None,
    request_id: str | None = None,
    fix: str | None = None,
) -> Response:
    """`seed_error`, counted by endpoint template and code."""
    gateway.metrics.rejected.labels(endpoint, error).inc()
    return seed_error(status, error, message, details=details, request_id=request_id, fix=fix)


def errors(*statuses: int) -> dict[int | str, Any]:
    """A route's documented error responses, in the seed-compatible shape."""
    return error_responses(*statuses, model=IngestError)


# What `POST /api/v1/ingest/upload` takes, for the API documents: the form is read as it
# streams (edgeway.gateway.ingest.multipart), not by FastAPI.
UPLOAD_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["camera_id", "files"],
                    "properties": {
                        "camera_id": {
                            "type": "string",
                            "description": "1 to 100 letters, digits, '_', '-' or '.'",
                        },
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "JPEG, PNG, BMP or TIFF images "
                            "(EDGEWAY_INGEST_MAX_FILES, each up to EDGEWAY_INGEST_MAX_FILE_BYTES)",
                        },
                        "meta": {
                            "type": "string",
                            "description": "optional JSON object: the frames' metadata "
                            "(FrameMetadata)",
                        },
                    },
                }
            }
        },
    }
}


async def ask(gateway: Gateway, command: Any) -> IngestReply:
    """One request to the ingestion service (ServiceUnavailableError when it does not answer)."""
    link = gateway.link
    body = command.model_dump(mode="json", exclude_none=True)
    raw = await link.request_raw(
        service=SERVICE, queue=link.topology.ingest_requests_queue, body=body
    )
    try:
        return IngestReply.model_validate_json(raw)
    except ValidationError:
        # A service of another version: the client gets a clear 504, the log the details.
        log.exception("unreadable reply from the ingestion service")
        raise ServiceUnavailableError(
            "the ingestion service answered something unreadable"
        ) from None


def _reply_error(
    gateway: Gateway, reply: IngestReply, *, endpoint: str, request_id: str
) -> Response:
    return error_response(
        gateway,
        REPLY_STATUS.get(reply.error or "", 502),
        reply.error or "failed",
        reply.message or "the ingestion service refused the request",
        endpoint=endpoint,
        request_id=request_id,
    )


def _accepted(reply: IngestReply, request_id: str) -> JSONResponse:
    """202: the request as it stands, and where to follow it."""
    assert reply.response is not None
    body = reply.response.model_dump(mode="json")
    body["status_url"] = STATUS_ENDPOINT.format(request_id=request_id)
    body["websocket_url"] = PROGRESS_ENDPOINT.format(request_id=request_id)
    return JSONResponse(body, 202)


def _unavailable(
    gateway: Gateway, exc: Exception, *, endpoint: str, request_id: str | None = None
) -> Response:
    return error_response(
        gateway,
        504,
        "unavailable",
        str(exc),
        endpoint=endpoint,
        request_id=request_id,
        fix="try again; the ingestion service may be restarting",
    )


def _caller(principal: Principal) -> Caller:
    return Caller(subject=principal.subject, operator=Scope.INGEST_ADMIN in principal.scopes)


def _request_id(gateway: Gateway, value: str, *, endpoint: str) -> str | Response:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return error_response(
            gateway, 404, "not_found", f"{value!r} is not a request id", endpoint=endpoint
        )


# --- uploads --------------------------------------------------------------------------------


@router.post(
    UPLOAD_ENDPOINT,
    status_code=202,
    summary="Upload images",
    responses=errors(400, 413, 415, 422, 503, 504),
    openapi_extra=UPLOAD_FORM,
)
async def upload(
    request: Request,
    gateway: GatewayDep,
    principal: Annotated[Principal, require(Scope.INGEST_WRITE, UPLOAD_ENDPOINT)],
) -> Response:
    settings = gateway.settings
    limits = UploadLimits(
        max_body_bytes=settings.ingest_max_body_bytes,
        max_file_bytes=settings.ingest_max_file_bytes,
        max_files=settings.ingest_max_files,
    )
    try:
        form = await read_form(request, limits)
    except FormError as exc:
        code = {413: "too_large", 415: "unsupported_media_type"}.get(exc.status, "invalid_form")
        return error_response(gateway, exc.status, code, exc.reason, endpoint=UPLOAD_ENDPOINT)
    try:
        camera_id = check_camera_id(form.fields.get("camera_id", ""))
        meta_text = form.fields.get("meta")
        meta = FrameMetadata.model_validate_json(meta_text) if meta_text else None
    except ValidationError as exc:
        return error_response(
            gateway, 400, "invalid_meta", _problems(exc, "meta"), endpoint=UPLOAD_ENDPOINT
        )
    except ValueError as exc:
        return error_response(gateway, 400, "invalid_camera_id", str(exc), endpoint=UPLOAD_ENDPOINT)

    rejected = [
        RejectedFile(filename=item.filename, code=item.code, reason=item.reason)
        for item in form.rejected
    ]
    accepted: list[tuple[AcceptedFile, bytes, str]] = []
    for file in form.files:
        try:
            header = inspect_image(file.data, max_pixels=settings.ingest_max_pixels)
        except MediaRejected as refused:
            rejected.append(
                RejectedFile(filename=file.filename, code=refused.code, reason=refused.reason)
            )
            continue
        described = AcceptedFile(
            file_id=str(uuid.uuid4()),
            filename=file.filename[:MAX_FILE_NAME],
            size_bytes=len(file.data),
        )
        accepted.append((described, file.data, header.format.content_type))
    if not accepted:
        return error_response(
            gateway,
            422 if rejected else 400,
            "no_file_accepted",
            "no file could be accepted" if rejected else "the form has no `files` part",
            endpoint=UPLOAD_ENDPOINT,
            details={"rejected": [item.model_dump() for item in rejected]},
        )

    request_id = str(uuid.uuid4())
    command = CreateUpload(
        request_id=request_id,
        caller=_caller(principal),
        camera_id=camera_id,
        meta=meta,
        files=[described for described, _, _ in accepted],
        rejected=rejected,
    )
    try:
        reply = await ask(gateway, command)
    except ServiceUnavailableError as exc:
        return _unavailable(gateway, exc, endpoint=UPLOAD_ENDPOINT)
    if not reply.ok:
        return _reply_error(gateway, reply, endpoint=UPLOAD_ENDPOINT, request_id=request_id)

    link = gateway.link
    producer = f"uploader/{principal.subject}"

    async def publish(described: AcceptedFile, data: bytes, content_type: str) -> None:
        envelope = Envelope(
            type=UPLOAD_FILE_TYPE,
            producer=producer,
            content_type=content_type,
            headers={
                HEADER_KIND: FileKind.IMAGE.value,
                HEADER_FILE_ID: described.file_id,
                HEADER_FILE_NAME: described.filename,
                HEADER_REQUEST_ID: request_id,
                HEADER_CAMERA_ID: camera_id,
            },
        )
        await link.publish_work(data, envelope=envelope, exchange=link.topology.ingest_uploads)

    try:
        await asyncio.gather(*(publish(*item) for item in accepted))
    except Exception as exc:  # noqa: BLE001 - any broker failure: the client must send it again
        log.warning("upload publish failed", request_id=request_id, error=repr(exc))
        return error_response(
            gateway,
            503,
            "unavailable",
            "not accepted: the broker did not confirm every file (the request will be failed)",
            endpoint=UPLOAD_ENDPOINT,
            request_id=request_id,
        )
    gateway.metrics.published.labels(UPLOAD_ENDPOINT).inc(len(accepted))
    return _accepted(reply, request_id)


# --- RTSP captures --------------------------------------------------------------------------


@router.post(
    RTSP_ENDPOINT,
    status_code=202,
    summary="Start an RTSP capture",
    responses=errors(400, 413, 415, 422, 429, 504),
    openapi_extra=json_body(RtspIngestionRequest, description="The capture to start."),
)
async def rtsp(
    request: Request,
    gateway: GatewayDep,
    principal: Annotated[Principal, require(Scope.INGEST_WRITE, RTSP_ENDPOINT)],
) -> Response:
    body = await read_json_body(request, MAX_JSON_BYTES)
    if isinstance(body, RefusedBody):
        refusal = body.error
        return error_response(
            gateway, body.status, refusal.code, refusal.reason, endpoint=RTSP_ENDPOINT
        )
    try:
        capture = RtspIngestionRequest.model_validate_json(body)
    except ValidationError as exc:
        unsafe = [error for error in exc.errors() if error["type"] == URL_REFUSED]
        if unsafe:  # not a mistake but an attempt to write into the RTSP request: 422
            return error_response(
                gateway, 422, URL_REFUSED, unsafe[0]["msg"], endpoint=RTSP_ENDPOINT
            )
        # The seed's mapping: a validation error is 400 (not FastAPI's 422).
        return error_response(
            gateway, 400, "validation_error", _problems(exc), endpoint=RTSP_ENDPOINT
        )
    request_id = str(uuid.uuid4())
    command = StartCapture(request_id=request_id, request=capture, caller=_caller(principal))
    try:
        reply = await ask(gateway, command)
    except ServiceUnavailableError as exc:
        return _unavailable(gateway, exc, endpoint=RTSP_ENDPOINT)
    if not reply.ok:
        return _reply_error(gateway, reply, endpoint=RTSP_ENDPOINT, request_id=request_id)
    gateway.metrics.published.labels(RTSP_ENDPOINT).inc()
    return _accepted(reply, request_id)


async def _about_request(
    gateway: Gateway,
    request_id: str,
    command: Callable[..., CancelRequest | GetStatus],
    *,
    principal: Principal,
    endpoint: str,
) -> Response:
    """Ask the service about one request (status, cancel): its IngestionResponse, or why not."""
    checked = _request_id(gateway, request_id, endpoint=endpoint)
    if isinstance(checked, Response):
        return checked
    try:
        reply = await ask(gateway, command(request_id=checked, caller=_caller(principal)))
    except ServiceUnavailableError as exc:
        return _unavailable(gateway, exc, endpoint=endpoint, request_id=checked)
    if not reply.ok or reply.response is None:
        return _reply_error(gateway, reply, endpoint=endpoint, request_id=checked)
    return JSONResponse(reply.response.model_dump(mode="json"))


@router.post(CANCEL_ENDPOINT, summary="Cancel an RTSP capture", responses=errors(404, 409, 504))
async def cancel(
    request_id: str,
    gateway: GatewayDep,
    principal: Annotated[Principal, require(Scope.INGEST_WRITE, CANCEL_ENDPOINT)],
) -> Response:
    return await _about_request(
        gateway, request_id, CancelRequest, principal=principal, endpoint=CANCEL_ENDPOINT
    )


# --- status ---------------------------------------------------------------------------------


@router.get(
    STATUS_ENDPOINT,
    summary="An ingestion request's status",
    responses=errors(400, 404, 504),
)
async def status(
    request_id: str,
    request: Request,
    gateway: GatewayDep,
    principal: Annotated[Principal, require(Scope.INGEST_READ, STATUS_ENDPOINT)],
) -> Response:
    # One page of frames: a capture may have 108,000, each presigned when read.
    query = request.query_params
    try:
        page = FramesPage.model_validate({key: query[key] for key in PAGE_QUERY if key in query})
    except ValidationError as exc:
        return error_response(
            gateway, 400, "validation_error", _problems(exc), endpoint=STATUS_ENDPOINT
        )
    return await _about_request(
        gateway,
        request_id,
        functools.partial(GetStatus, limit=page.limit, cursor=page.cursor),
        principal=principal,
        endpoint=STATUS_ENDPOINT,
    )


@router.websocket(PROGRESS_ENDPOINT)
async def progress(websocket: WebSocket, request_id: str, gateway: GatewayDep) -> None:
    """The request's status at once, then every progress event until the client leaves.

    Its events are watched only once the service has answered the status to this caller (the
    requester or an operator): anyone else gets `not_found` and the socket closes.
    """
    principal = await admit_websocket(
        websocket, gateway, scope=Scope.INGEST_READ, endpoint=PROGRESS_ENDPOINT
    )
    if principal is None:
        return

    async def refuse(code: str, reason: str, close_code: int) -> None:
        error = ErrorObject(code=code, reason=reason).body()
        # The client may have left while the service was asked: nothing to tell it then.
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            await websocket.send_text(orjson.dumps(error).decode())
            await websocket.close(close_code, code)

    try:
        checked = str(uuid.UUID(request_id))
    except ValueError:
        await refuse("not_found", "not a request id", 1008)
        return
    # The first message is the status's first page, as GET answers it without a query.
    ask_status = GetStatus(request_id=checked, caller=_caller(principal))
    try:
        # Only whether this caller may watch it: one frame is enough to say.
        allowed = await ask(gateway, ask_status.model_copy(update={"limit": 1}))
    except ServiceUnavailableError as exc:
        await refuse("unavailable", str(exc), 1011)  # whose request it is is not known
        return
    if allowed.response is None:
        await refuse(allowed.error or "not_found", allowed.message or "no such request", 1008)
        return
    client = gateway.client_queue(websocket, PROGRESS_ENDPOINT)

    async def status_first() -> None:
        # Asked again once the channel is watched: no event between the two is lost.
        first: dict[str, Any]
        try:
            reply = await ask(gateway, ask_status)
        except ServiceUnavailableError as exc:
            first = ErrorObject(code="unavailable", reason=str(exc)).body()
        else:
            if reply.response is None:
                first = ErrorObject(
                    code=reply.error or "failed",
                    reason=reply.message or "the ingestion service refused the request",
                ).body()
            else:
                first = {"type": "ingest_status", **reply.response.model_dump(mode="json")}
        client.push_front([orjson.dumps(first).decode()])

    await gateway.serve_client(
        websocket, client, (Channels.ingest_request(checked),), catch_up=status_first
    )


def _problems(exc: ValidationError, prefix: str | None = None) -> str:
    """What is wrong, as every other endpoint says it (`validation_reason`); `prefix` names the
    field the problems are in (a form's `meta`)."""
    problems = exc.errors(include_url=False, include_input=False)
    if prefix:
        return validation_reason([{**p, "loc": (prefix, *p["loc"])} for p in problems])
    return validation_reason(list(problems))
