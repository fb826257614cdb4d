"""`POST /telemetry`, `POST /api/telemetry`: vehicle loggers' protobuf uploads (`X-Compressed`,
`X-Vehicle-VIN`, `X-Batch` for many records), checked here and published unchanged to the
telemetry work queue (several to a message while the broker is busy: `publisher`); 202 only once
the broker confirmed it, real status codes otherwise."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Security
from fastapi.responses import JSONResponse, Response

from edgeway.common.envelope import Envelope
from edgeway.common.errors import error_responses
from edgeway.common.logging import get_logger
from edgeway.common.schemas.errors import ErrorCode, ErrorFrame
from edgeway.common.telemetry import wire
from edgeway.common.telemetry.uploads import PROTOBUF, UPLOAD_TYPE
from edgeway.gateway.auth import AuthError, Identity, Principal, Scope
from edgeway.gateway.docs import binary_body
from edgeway.gateway.limits import read_body
from edgeway.gateway.link import NotConnectedError
from edgeway.gateway.producers import SeatRefused, check_identity
from edgeway.gateway.state import Gateway, GatewayDep, RequireScope
from edgeway.gateway.telemetry.publisher import UploadsBackloggedError
from edgeway.gateway.telemetry.state import UPLOAD_ENDPOINT, VehicleCheck

# Both paths of the upload route (`direct_upload` serves them the same way; the server gives
# them their upload slots).
UPLOAD_PATHS = (UPLOAD_ENDPOINT, "/api/telemetry")
ACCEPTED_CONTENT_TYPES = frozenset({PROTOBUF, "application/octet-stream"})
# The seed logger's default when it sends no X-Vehicle-VIN header.
SEED_VIN = "5YJ3E1EA1KF000001"

router = APIRouter()
log = get_logger("edgeway.gateway.telemetry")

# Who may upload: one admission for the route and for `direct_upload`.
ADMIT_UPLOAD = RequireScope(Scope.TELEMETRY_PUBLISH, UPLOAD_ENDPOINT)


def refuse(gateway: Gateway, status: int, code: ErrorCode, reason: str) -> JSONResponse:
    """A refusal as the error frame's body, counted."""
    gateway.metrics.rejected.labels(UPLOAD_ENDPOINT, code.value).inc()
    return JSONResponse(ErrorFrame(code=code, reason=reason).model_dump(exclude_none=True), status)


def retry_later(gateway: Gateway, reason: str) -> JSONResponse:
    """503 with Retry-After: the upload is fine, the gateway cannot take it now."""
    response = refuse(gateway, 503, ErrorCode.UNAVAILABLE, reason)
    response.headers["Retry-After"] = str(gateway.settings.upload_retry_after)
    return response


def _flag(value: str | None, header: str) -> bool:
    """`true`/`false` (any case); absent is false, anything else is refused."""
    if value is None or value.strip().lower() == "false":
        return False
    if value.strip().lower() == "true":
        return True
    raise wire.WireError(f"{header} must be true or false, not {value!r}")


UPLOAD_DOCS: dict[str, Any] = {
    "status_code": 202,
    "responses": error_responses(400, 403, 413, 415, 422, 503),
    "openapi_extra": binary_body(
        PROTOBUF,
        "application/octet-stream",
        description="A protobuf `VehicleData` or `CompressedVehicleData` (`X-Compressed: true`), "
        "or a batch of them (`X-Batch: true`), for the vehicle of `X-Vehicle-VIN`.",
    ),
}


@router.post(UPLOAD_PATHS[0], summary="Upload telemetry", **UPLOAD_DOCS)
# The seed README's documented path.
@router.post(UPLOAD_PATHS[1], summary="Upload telemetry (the seed README's path)", **UPLOAD_DOCS)
async def upload(
    request: Request,
    gateway: GatewayDep,
    principal: Annotated[Principal, Security(ADMIT_UPLOAD, scopes=[ADMIT_UPLOAD.scope.value])],
    # Declared for the API documents; `accept_upload` reads them from the request itself.
    x_compressed: str | None = Header(default=None),
    x_vehicle_vin: str | None = Header(default=None),
    x_batch: str | None = Header(default=None),
) -> JSONResponse:
    return await accept_upload(request, gateway, principal)


async def direct_upload(request: Request, gateway: Gateway) -> Response:
    """The upload route without FastAPI's per-request stack, for the server to call directly.

    Loggers post one record per request, and routing, dependency solving and the middlewares
    cost the gateway more than the upload itself (py-spy: ~40% of its CPU per request). The
    admission is the route's own (`ADMIT_UPLOAD`) and so are the answers: an AuthError or
    NotConnectedError becomes the response the app's exception handlers make of it.
    """
    try:
        principal = await ADMIT_UPLOAD(request, gateway)
    except (AuthError, NotConnectedError) as error:
        return error.response()
    return await accept_upload(request, gateway, principal)


async def accept_upload(request: Request, gateway: Gateway, principal: Principal) -> JSONResponse:
    """Check an admitted upload and publish it: 202 once the broker confirmed it, else the
    refusal (400, 403, 413, 415, 422, 503)."""
    headers = request.headers
    content_type = headers.get("content-type", PROTOBUF).split(";")[0].strip().lower()
    if content_type not in ACCEPTED_CONTENT_TYPES:
        return refuse(
            gateway,
            415,
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"content type {content_type!r}: send a protobuf body as {PROTOBUF}",
        )
    limit = gateway.settings.max_upload_bytes
    body = await read_body(request, limit)
    if body is None:
        return refuse(gateway, 413, ErrorCode.TOO_LARGE, f"the body is over the {limit}-byte limit")
    x_vehicle_vin = headers.get("x-vehicle-vin")
    try:
        vin = wire.check_vin(x_vehicle_vin if x_vehicle_vin is not None else SEED_VIN)
        compressed = _flag(headers.get("x-compressed"), "X-Compressed")
        batch = _flag(headers.get("x-batch"), "X-Batch")
        packets = wire.parse_upload(body, compressed=compressed, batch=batch)
    except wire.WireError as error:
        return refuse(gateway, 400, ErrorCode.INVALID_TELEMETRY, error.reason)
    try:
        check_identity(principal, Identity.VIN, vin)
    except SeatRefused as refused:
        return refuse(gateway, 403, refused.code, refused.reason)
    telemetry = gateway.telemetry
    known = await telemetry.vehicles.check(gateway.link, vin)
    if known is VehicleCheck.UNKNOWN:
        return refuse(gateway, 422, ErrorCode.UNKNOWN_VEHICLE, f"vehicle {vin} is not registered")
    if known is VehicleCheck.UNAVAILABLE:  # not "unknown": the logger keeps it and retries
        return retry_later(
            gateway, f"vehicle {vin} cannot be confirmed: the telemetry service is unavailable"
        )
    envelope = Envelope(
        type=UPLOAD_TYPE,
        producer=f"telemetry-logger/{principal.subject}",
        captured_at=packets[0].timestamp_ms / 1000,
        content_type=PROTOBUF,
        headers={
            "x-vehicle-vin": vin,
            "x-compressed": "true" if compressed else "false",
            "x-batch": "true" if batch else "false",
        },
    )
    try:
        await telemetry.uploads.publish(body, envelope)
    except UploadsBackloggedError as exc:
        log.warning("upload refused: too many wait for the broker", reason=str(exc), vin=vin)
        return retry_later(gateway, "not accepted: too many uploads wait for the broker")
    except Exception as exc:  # noqa: BLE001 - any broker failure: the logger must send it again
        log.warning("publish failed", error=repr(exc), vin=vin)
        return refuse(
            gateway, 503, ErrorCode.UNAVAILABLE, "not accepted: the broker did not confirm it"
        )
    telemetry.uploads_published.inc()
    return JSONResponse(
        {"status": "accepted", "records": len(packets), "message_id": envelope.message_id}, 202
    )
