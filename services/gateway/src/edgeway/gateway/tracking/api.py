"""The tracking HTTP API (SpotOn's): environments, their cameras' videos, processing tasks, their
tracks and media. Every route asks the tracker over request/reply (504 when it does not answer);
the gateway checks ids, shapes and sizes first. Errors are `{"type": "error", "code", "reason"}`."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ValidationError

from edgeway.common.envelope import Envelope
from edgeway.common.errors import error_response, error_responses
from edgeway.common.logging import get_logger
from edgeway.common.schemas.errors import ErrorFrame
from edgeway.common.schemas.tracking import (
    HEADER_CAMERA_ID,
    HEADER_ENVIRONMENT_ID,
    HEADER_VIDEO_ID,
    ID_PATTERN,
    MAX_MEDIA_CHUNK,
    MEDIA_FILE_PATTERN,
    MEDIA_PATH,
    VIDEO_TYPE,
    CreateEnvironment,
    DeleteEnvironment,
    EnvironmentSpec,
    GetEnvironment,
    GetTaskStatus,
    ListEnvironments,
    PrepareVideo,
    QueryTracks,
    ReadMedia,
    ReplaceEnvironment,
    StartTask,
    StartTaskBody,
    StopTask,
    TrackingReply,
)
from edgeway.gateway import docs
from edgeway.gateway.auth import Principal, Scope
from edgeway.gateway.limits import RefusedBody, read_body, read_json_body
from edgeway.gateway.link import ServiceUnavailableError
from edgeway.gateway.state import Gateway, GatewayDep, require

ENVIRONMENTS = "/api/v1/environments"
ENVIRONMENT = "/api/v1/environments/{environment_id}"
VIDEO = "/api/v1/environments/{environment_id}/cameras/{camera_id}/video"
SPOTON_ENVIRONMENTS = "/api/v1/detection-processing-tasks/environments"
TASKS = "/api/v1/processing-tasks"
SPOTON_TASKS = "/api/v1/detection-processing-tasks"  # SpotOn HEAD's prefix, as an alias
TRACKS = TASKS + "/{task_id}/tracks"
TRACKING_ENDPOINT = "/ws/tracking/{task_id}"
SERVICE = "tracker"
# An environment body: 16 cameras, each with a base64 `.npz` of up to 256 KiB, and room.
MAX_ENVIRONMENT_BYTES = 5 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024
VIDEO_TYPES = frozenset(
    {
        "video/mp4",
        "video/quicktime",
        "video/x-matroska",
        "video/webm",
        "video/x-msvideo",
        "video/avi",
        "video/mp2t",
        "application/octet-stream",
    }
)

router = APIRouter()

# What the routes document (edgeway.gateway.docs): the bodies they read themselves, the errors
# they answer besides the token check's (401, 403, 503) and the 504 of a tracker that is silent.
ENVIRONMENT_BODY = docs.json_body(
    EnvironmentSpec, description="The environment: its cameras, homographies, overlaps."
)
START_BODY = docs.json_body(StartTaskBody, description="The environment to process, and the mode.")
VIDEO_BODY = docs.binary_body(
    *sorted(VIDEO_TYPES), description="The camera's video file, as the request's body."
)
log = get_logger("edgeway.gateway.tracking")
_ID = re.compile(ID_PATTERN)
_MEDIA_FILE = re.compile(MEDIA_FILE_PATTERN)
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def error(
    gateway: Gateway,
    status: int,
    code: str,
    reason: str,
    *,
    endpoint: str,
    headers: dict[str, str] | None = None,
) -> Response:
    """The error object, counted by endpoint template and code."""
    gateway.metrics.rejected.labels(endpoint, code).inc()
    return error_response(status, code, reason, headers=headers)


def bad_id(gateway: Gateway, kind: str, value: str, *, endpoint: str) -> Response | None:
    """400 for an id that could never be one (a path, a dot, a space), before anything else."""
    if _ID.match(value):
        return None
    return error(
        gateway,
        400,
        "invalid_id",
        f"{kind} {value[:80]!r} is not an id: 1-64 letters, digits, '-' or '_', starting with "
        "a letter or digit",
        endpoint=endpoint,
    )


def shape_error(gateway: Gateway, exc: ValidationError, *, endpoint: str) -> Response:
    frame = ErrorFrame.invalid(exc, what="body")
    return error(gateway, 400, frame.code.value, frame.reason, endpoint=endpoint)


async def ask(gateway: Gateway, request: BaseModel) -> TrackingReply:
    """One request to the tracker (ServiceUnavailableError, hence 504, when it does not answer)."""
    link = gateway.link
    raw = await link.request_raw(
        service=SERVICE,
        queue=link.topology.tracking_requests_queue,
        body=request.model_dump(mode="json", exclude_none=True),
    )
    try:
        return TrackingReply.model_validate_json(raw)
    except ValidationError:
        log.exception("unreadable reply from the tracker")
        raise ServiceUnavailableError("the tracker answered something unreadable") from None


def respond(gateway: Gateway, reply: TrackingReply, *, endpoint: str) -> Response:
    """The tracker's answer as it is: its status and body (a refusal is counted)."""
    if reply.status == 204:
        return Response(status_code=204)
    if reply.status >= 400 and isinstance(reply.body, dict):
        gateway.metrics.rejected.labels(endpoint, str(reply.body.get("code", "refused"))).inc()
    return JSONResponse(reply.body, status_code=reply.status)


async def json_body(
    gateway: Gateway, request: Request, limit: int, *, endpoint: str
) -> bytes | Response:
    body = await read_json_body(request, limit)
    if isinstance(body, RefusedBody):
        return error(gateway, body.status, body.error.code, body.error.reason, endpoint=endpoint)
    return body


# --- environments ----------------------------------------------------------------------------


async def _environment_body(
    gateway: Gateway, request: Request, *, endpoint: str
) -> EnvironmentSpec | Response:
    body = await json_body(gateway, request, MAX_ENVIRONMENT_BYTES, endpoint=endpoint)
    if isinstance(body, Response):
        return body
    try:
        return EnvironmentSpec.model_validate_json(body)
    except ValidationError as exc:
        return shape_error(gateway, exc, endpoint=endpoint)


@router.post(
    ENVIRONMENTS,
    status_code=201,
    openapi_extra=ENVIRONMENT_BODY,
    responses=error_responses(400, 409, 413, 415, 504),
)
async def create_environment(
    request: Request,
    gateway: GatewayDep,
    _: Annotated[Principal, require(Scope.TRACKING_ADMIN, ENVIRONMENTS)],
) -> Response:
    spec = await _environment_body(gateway, request, endpoint=ENVIRONMENTS)
    if isinstance(spec, Response):
        return spec
    reply = await ask(gateway, CreateEnvironment(environment=spec))
    return respond(gateway, reply, endpoint=ENVIRONMENTS)


@router.get(ENVIRONMENTS, responses=error_responses(504))
async def list_environments(
    gateway: GatewayDep, _: Annotated[Principal, require(Scope.TRACKING_READ, ENVIRONMENTS)]
) -> Response:
    return respond(gateway, await ask(gateway, ListEnvironments()), endpoint=ENVIRONMENTS)


@router.get(SPOTON_ENVIRONMENTS, responses=error_responses(504))
async def spoton_environments(
    gateway: GatewayDep,
    _: Annotated[Principal, require(Scope.TRACKING_READ, SPOTON_ENVIRONMENTS)],
) -> Response:
    """SpotOn's list of what can be processed: each environment's id, name and cameras."""
    reply = await ask(gateway, ListEnvironments())
    if reply.status != 200:
        return respond(gateway, reply, endpoint=SPOTON_ENVIRONMENTS)
    summary = [
        {
            "environment_id": env["environment_id"],
            "name": env["name"],
            "cameras": [camera["camera_id"] for camera in env["cameras"]],
            "ready": env["ready"],
        }
        for env in reply.body["environments"]
    ]
    return JSONResponse({"environments": summary, "total": len(summary)})


@router.get(ENVIRONMENT, responses=error_responses(400, 404, 504))
async def get_environment(
    environment_id: str,
    gateway: GatewayDep,
    _: Annotated[Principal, require(Scope.TRACKING_READ, ENVIRONMENT)],
) -> Response:
    if refused := bad_id(gateway, "environment_id", environment_id, endpoint=ENVIRONMENT):
        return refused
    reply = await ask(gateway, GetEnvironment(environment_id=environment_id))
    return respond(gateway, reply, endpoint=ENVIRONMENT)


@router.put(
    ENVIRONMENT,
    openapi_extra=ENVIRONMENT_BODY,
    responses=error_responses(400, 404, 409, 413, 415, 504),
)
async def replace_environment(
    environment_id: str,
    request: Request,
    gateway: GatewayDep,
    _: Annotated[Principal, require(Scope.TRACKING_ADMIN, ENVIRONMENT)],
) -> Response:
    if refused := bad_id(gateway, "environment_id", environment_id, endpoint=ENVIRONMENT):
        return refused
    spec = await _environment_body(gateway, request, endpoint=ENVIRONMENT)
    if isinstance(spec, Response):
        return spec
    reply = await ask(gateway, ReplaceEnvironment(environment_id=environment_id, environment=spec))
    return respond(gateway, reply, endpoint=ENVIRONMENT)


@router.delete(ENVIRONMENT, responses=error_responses(400, 404, 409, 504))
async def delete_environment(
    environment_id: str,
    gateway: GatewayDep,
    _: Annotated[Principal, require(Scope.TRACKING_ADMIN, ENVIRONMENT)],
) -> Response:
    if refused := bad_id(gateway, "environment_id", environment_id, endpoint=ENVIRONMENT):
        return refused
    reply = await ask(gateway, DeleteEnvironment(environment_id=environment_id))
    return respond(gateway, reply, endpoint=ENVIRONMENT)


def video_container(data: bytes) -> bool:
    """Whether the bytes start like a container the tracker reads (its header, no decode)."""
    return (
        data[4:8] == b"ftyp"  # MP4, QuickTime
        or data.startswith(b"\x1a\x45\xdf\xa3")  # Matroska, WebM
        or (data.startswith(b"RIFF") and data[8:12] == b"AVI ")
        or (len(data) > 188 and data[0] == 0x47 and data[188] == 0x47)  # MPEG-TS
    )


@router.put(
    VIDEO,
    status_code=202,
    openapi_extra=VIDEO_BODY,
    responses=error_responses(400, 404, 409, 413, 415, 504),
)
async def upload_video(
    environment_id: str,
    camera_id: str,
    request: Request,
    gateway: GatewayDep,
    principal: Annotated[Principal, require(Scope.TRACKING_ADMIN, VIDEO)],
) -> Response:
    if refused := bad_id(gateway, "environment_id", environment_id, endpoint=VIDEO) or bad_id(
        gateway, "camera_id", camera_id, endpoint=VIDEO
    ):
        return refused
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in VIDEO_TYPES:
        return error(
            gateway,
            415,
            "unsupported_media_type",
            f"content type {content_type or 'none'!r}: send the file as video/mp4, "
            "video/x-matroska, video/webm, video/x-msvideo or application/octet-stream",
            endpoint=VIDEO,
        )
    slots = gateway.tracking.video_slots
    if slots.locked():
        return error(
            gateway,
            503,
            "busy",
            "too many video uploads at once",
            endpoint=VIDEO,
            headers={"Retry-After": str(gateway.settings.upload_retry_after)},
        )
    async with slots:
        reply = await ask(gateway, PrepareVideo(environment_id=environment_id, camera_id=camera_id))
        if reply.status != 200:
            return respond(gateway, reply, endpoint=VIDEO)
        limit = min(gateway.settings.tracking_max_video_bytes, int(reply.body["max_bytes"]))
        data = await read_body(request, limit)
        if data is None:
            return error(
                gateway, 413, "too_large", f"the video is over {limit} bytes", endpoint=VIDEO
            )
        if not video_container(data):
            return error(
                gateway,
                415,
                "unsupported_media_type",
                "the body is not an MP4, Matroska/WebM, AVI or MPEG-TS file",
                endpoint=VIDEO,
            )
        video_id = str(reply.body["video_id"])
        envelope = Envelope(
            type=VIDEO_TYPE,
            producer=f"operator/{principal.subject}",
            content_type=content_type,
            headers={
                HEADER_ENVIRONMENT_ID: environment_id,
                HEADER_CAMERA_ID: camera_id,
                HEADER_VIDEO_ID: video_id,
            },
        )
        link = gateway.link
        try:
            await link.publish_work(data, envelope=envelope, exchange=link.topology.tracking_videos)
        except Exception as exc:  # noqa: BLE001 - any broker failure: the client sends it again
            log.warning("video publish failed", video_id=video_id, error=repr(exc))
            return error(
                gateway,
                503,
                "unavailable",
                "not accepted: the broker did not confirm it",
                endpoint=VIDEO,
            )
    gateway.metrics.published.labels(VIDEO).inc()
    return JSONResponse(
        {
            "environment_id": environment_id,
            "camera_id": camera_id,
            "video_id": video_id,
            "size_bytes": len(data),
            "status": "processing",
            "status_url": ENVIRONMENT.format(environment_id=environment_id),
        },
        status_code=202,
    )


# --- tasks -----------------------------------------------------------------------------------


async def _start(request: Request, gateway: Gateway, prefix: str) -> Response:
    endpoint = prefix + "/start"
    body = await json_body(gateway, request, MAX_JSON_BYTES, endpoint=endpoint)
    if isinstance(body, Response):
        return body
    try:
        start = StartTaskBody.model_validate_json(body)
    except ValidationError as exc:
        return shape_error(gateway, exc, endpoint=endpoint)
    reply = await ask(gateway, StartTask(environment_id=start.environment_id, mode=start.mode))
    if reply.status != 202:
        return respond(gateway, reply, endpoint=endpoint)
    task_id = reply.body["task_id"]
    return JSONResponse(
        {
            "task_id": task_id,
            "message": f"Processing task ({start.mode}) initiated.",
            "status_url": f"{prefix}/{task_id}/status",
            "websocket_url": TRACKING_ENDPOINT.format(task_id=task_id),
        },
        status_code=202,
    )


def _start_endpoint(prefix: str) -> Callable[[Request, Gateway], Awaitable[Response]]:
    async def endpoint(request: Request, gateway: GatewayDep) -> Response:
        return await _start(request, gateway, prefix)

    return endpoint


def _start_routes() -> None:
    """`POST .../start` under our prefix, and SpotOn HEAD's as an alias."""
    for prefix, name in ((TASKS, "start_task"), (SPOTON_TASKS, "start_task_spoton")):
        path = prefix + "/start"
        router.add_api_route(
            path,
            _start_endpoint(prefix),
            methods=["POST"],
            name=name,
            status_code=202,
            openapi_extra=START_BODY,
            dependencies=[require(Scope.TRACKING_ADMIN, path)],
            responses=error_responses(400, 404, 409, 413, 415, 504),
        )


_start_routes()


def task_id_of(gateway: Gateway, value: str, *, endpoint: str) -> str | Response:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return error(
            gateway, 404, "not_found", f"{value[:80]!r} is not a task id", endpoint=endpoint
        )


async def _status(task_id: str, gateway: Gateway, endpoint: str) -> Response:
    checked = task_id_of(gateway, task_id, endpoint=endpoint)
    if isinstance(checked, Response):
        return checked
    reply = await ask(gateway, GetTaskStatus(task_id=checked))
    if reply.status != 200:
        return respond(gateway, reply, endpoint=endpoint)
    return JSONResponse(reply.body["status"])


async def _stop(task_id: str, gateway: Gateway, endpoint: str) -> Response:
    checked = task_id_of(gateway, task_id, endpoint=endpoint)
    if isinstance(checked, Response):
        return checked
    return respond(gateway, await ask(gateway, StopTask(task_id=checked)), endpoint=endpoint)


def _task_endpoint(
    action: Callable[[str, Gateway, str], Awaitable[Response]], path: str
) -> Callable[[str, Gateway], Awaitable[Response]]:
    async def endpoint(task_id: str, gateway: GatewayDep) -> Response:
        return await action(task_id, gateway, path)

    return endpoint


def _task_routes(prefix: str) -> None:
    """Status, stop and DELETE under one prefix (ours, and SpotOn HEAD's as an alias). The
    scopes are route dependencies: annotations here could not see this function's locals."""
    for method, suffix, name, scope, action, description in (
        ("GET", "/{task_id}/status", "task_status", Scope.TRACKING_READ, _status, None),
        ("POST", "/{task_id}/stop", "stop_task", Scope.TRACKING_ADMIN, _stop, None),
        (
            "DELETE",
            "/{task_id}",
            "delete_task",
            Scope.TRACKING_ADMIN,
            _stop,
            "SpotOn HEAD's DELETE: stops the task (its stored tracks stay until retention).",
        ),
    ):
        path = prefix + suffix
        router.add_api_route(
            path,
            _task_endpoint(action, path),
            methods=[method],
            name=name,
            description=description,
            dependencies=[require(scope, path)],
            responses=error_responses(404, 504),
        )


for _prefix in (TASKS, SPOTON_TASKS):
    _task_routes(_prefix)


@router.get(TRACKS, responses=error_responses(400, 404, 504))
async def tracks(
    task_id: str,
    request: Request,
    gateway: GatewayDep,
    _: Annotated[Principal, require(Scope.TRACKING_READ, TRACKS)],
) -> Response:
    """Stored observations: `camera_id`, `global_id`, `since`/`until` (ISO 8601), `after` (the
    previous page's `next_after`), `limit` (<= 10 000); `format=mot` for MOTChallenge text."""
    checked = task_id_of(gateway, task_id, endpoint=TRACKS)
    if isinstance(checked, Response):
        return checked
    params: dict[str, Any] = dict(request.query_params)
    try:
        query = QueryTracks.model_validate({**params, "task_id": checked})
    except ValidationError as exc:
        return shape_error(gateway, exc, endpoint=TRACKS)
    reply = await ask(gateway, query)
    if reply.status != 200 or query.format != "mot":
        return respond(gateway, reply, endpoint=TRACKS)
    headers = {}
    if reply.body.get("next_after") is not None:
        headers["X-Next-After"] = str(reply.body["next_after"])
    return PlainTextResponse(reply.body["text"], headers=headers)


# --- a batch task's videos --------------------------------------------------------------------


def byte_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """The first and last byte a `Range` header asks for (RFC 9110 §14.1.2); None: the whole
    file (no header, or one this does not serve: several ranges, another unit); a string: why
    it cannot be satisfied."""
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last `last` bytes
        count = int(last)
        if count == 0 or size == 0:
            return f"no bytes to give in a file of {size}"
        return max(0, size - count), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or end < start:
        return f"bytes {start}-{last} are not in a file of {size}"
    return start, end


@router.get(MEDIA_PATH, responses=error_responses(400, 404, 416, 504))
async def media(
    task_id: str,
    environment_id: str,
    camera_id: str,
    filename: str,
    request: Request,
    gateway: GatewayDep,
    _: Annotated[Principal, require(Scope.TRACKING_READ, MEDIA_PATH)],
) -> Response:
    """A video a batch task read (`media_available` names it), with Range requests."""
    checked = task_id_of(gateway, task_id, endpoint=MEDIA_PATH)
    if isinstance(checked, Response):
        return checked
    for kind, value in (("environment_id", environment_id), ("camera_id", camera_id)):
        refused = bad_id(gateway, kind, value, endpoint=MEDIA_PATH)
        if refused is not None:
            return refused
    if not _MEDIA_FILE.match(filename):
        return error(
            gateway,
            400,
            "invalid_id",
            f"{filename[:80]!r} is not a video's name",
            endpoint=MEDIA_PATH,
        )

    def read(offset: int, length: int) -> ReadMedia:
        return ReadMedia(
            task_id=checked,
            environment_id=environment_id,
            camera_id=camera_id,
            filename=filename,
            offset=offset,
            length=length,
        )

    head = await ask(gateway, read(0, 0))
    if head.status != 200:
        return respond(gateway, head, endpoint=MEDIA_PATH)
    if head.body.get("redirect"):  # an S3 store: a presigned URL, made now
        return RedirectResponse(head.body["redirect"], status_code=307)
    size, content_type = int(head.body["size"]), str(head.body["content_type"])
    wanted = byte_range(request.headers.get("range"), size)
    if isinstance(wanted, str):
        return error(
            gateway,
            416,
            "range_not_satisfiable",
            wanted,
            endpoint=MEDIA_PATH,
            headers={"Content-Range": f"bytes */{size}"},
        )
    start, end = (0, size - 1) if wanted is None else wanted
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(max(0, end - start + 1))}
    if wanted is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"

    async def chunks() -> AsyncIterator[bytes]:
        offset = start
        while offset <= end:
            reply = await ask(gateway, read(offset, min(MAX_MEDIA_CHUNK, end + 1 - offset)))
            data = base64.b64decode(reply.body["data"]) if reply.status == 200 else b""
            if not data:  # gone meanwhile (retention), or shorter than it said: end here
                log.warning("a video ended early", task_id=checked, at=offset, status=reply.status)
                return
            yield data
            offset += len(data)

    return StreamingResponse(
        chunks(),
        status_code=200 if wanted is None else 206,
        media_type=content_type,
        headers=headers,
    )
