"""The vehicle registry: `POST /api/v1/vehicles` (`{"vin": ...}`), `GET /api/v1/vehicles`,
`DELETE /api/v1/vehicles/{vin}` (scope `telemetry:admin`), requests to the telemetry service,
which owns it (a deleted vehicle is retired, never removed)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from edgeway.common.errors import error_responses
from edgeway.common.logging import get_logger
from edgeway.common.schemas.errors import ErrorCode, ErrorFrame
from edgeway.common.telemetry import wire
from edgeway.gateway.auth import Scope
from edgeway.gateway.limits import read_body
from edgeway.gateway.link import ServiceUnavailableError
from edgeway.gateway.state import Gateway, GatewayDep, require

router = APIRouter()
log = get_logger("edgeway.gateway.telemetry")


VEHICLES_ENDPOINT = "/api/v1/vehicles"
VEHICLE_ENDPOINT = "/api/v1/vehicles/{vin}"
MAX_VEHICLE_BODY_BYTES = 1024  # {"vin": "..."} is 27 bytes
# The telemetry service's error answers (`code`), as HTTP statuses; `unavailable` (its database
# is down) is 503 with Retry-After, anything else it may say a 504 (edgeway.gateway.app).
VEHICLE_REFUSALS = {
    "invalid_vin": (400, ErrorCode.INVALID_VIN),
    "not_found": (404, ErrorCode.NOT_FOUND),
}


def _admin_error(
    gateway: Gateway,
    status: int,
    code: ErrorCode,
    reason: str,
    *,
    retry_after: int | None = None,
    endpoint: str = VEHICLES_ENDPOINT,
) -> JSONResponse:
    gateway.metrics.rejected.labels(endpoint, code.value).inc()
    response = JSONResponse(
        ErrorFrame(code=code, reason=reason).model_dump(exclude_none=True), status
    )
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def checked_vin(
    gateway: Gateway, vin: str, *, endpoint: str = VEHICLES_ENDPOINT
) -> str | JSONResponse:
    """The VIN, or its 400 (`invalid_vin`) counted against `endpoint`."""
    try:
        return wire.check_vin(vin)
    except wire.WireError as error:
        return _admin_error(gateway, 400, ErrorCode.INVALID_VIN, error.reason, endpoint=endpoint)


async def ask_registry(
    gateway: Gateway, body: dict[str, Any], *, endpoint: str = VEHICLES_ENDPOINT
) -> dict[str, Any] | JSONResponse:
    """The telemetry service's answer, or the refusal it makes for the caller (counted against
    `endpoint`).

    Raises ServiceUnavailableError (504) when the service does not answer in time, or answers
    what this gateway cannot read (a service of another version).
    """
    link = gateway.link
    answer = await link.request(
        service="telemetry", queue=link.topology.telemetry_requests_queue, body=body
    )
    if not isinstance(answer, dict):
        raise ServiceUnavailableError(f"telemetry answered {answer!r}")
    if "error" not in answer:
        return answer
    code, reason = answer.get("code"), str(answer["error"])
    if code == "unavailable":
        return _admin_error(
            gateway,
            503,
            ErrorCode.UNAVAILABLE,
            reason,
            retry_after=gateway.settings.upload_retry_after,
            endpoint=endpoint,
        )
    if code in VEHICLE_REFUSALS:
        status, error_code = VEHICLE_REFUSALS[code]
        return _admin_error(gateway, status, error_code, reason, endpoint=endpoint)
    raise ServiceUnavailableError(f"telemetry answered {answer!r}")


@router.post(
    VEHICLES_ENDPOINT,
    status_code=201,
    summary="Register a vehicle",
    responses=error_responses(400, 413, 503, 504),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["vin"],
                        "properties": {"vin": {"type": "string", "minLength": 17, "maxLength": 17}},
                    }
                }
            },
        }
    },
    dependencies=[require(Scope.TELEMETRY_ADMIN, VEHICLES_ENDPOINT)],
)
async def register_vehicle(request: Request, gateway: GatewayDep) -> JSONResponse:
    """Register a vehicle (`{"vin": "..."}`) so its loggers' uploads are taken.

    201 when it is new or was retired (it is active again with its id and its records); 200
    when it was registered already. The registry is the telemetry service's (request/reply):
    504 when it does not answer, 503 with Retry-After when its database is down.
    """
    body = await read_body(request, MAX_VEHICLE_BODY_BYTES)
    if body is None:
        return _admin_error(
            gateway,
            413,
            ErrorCode.TOO_LARGE,
            f"the body is over the {MAX_VEHICLE_BODY_BYTES}-byte limit",
        )
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _admin_error(gateway, 400, ErrorCode.MALFORMED_JSON, 'expected {"vin": "<VIN>"}')
    vin = document.get("vin") if isinstance(document, dict) else None
    if not isinstance(vin, str):
        return _admin_error(
            gateway,
            400,
            ErrorCode.INVALID_SHAPE,
            'expected {"vin": "<VIN>"} with the VIN as a string',
        )
    checked = checked_vin(gateway, vin)
    if isinstance(checked, JSONResponse):
        return checked
    answer = await ask_registry(gateway, {"query": "register_vehicle", "vin": checked})
    if isinstance(answer, JSONResponse):
        return answer
    gateway.telemetry.vehicles.learn(checked, registered=True)
    registration = answer.get("registration")
    log.info("vehicle registered", vin=checked, registration=registration)
    return JSONResponse(
        {"vin": checked, "registration": registration}, 200 if registration == "existing" else 201
    )


@router.get(
    VEHICLES_ENDPOINT,
    summary="Registered vehicles",
    responses=error_responses(503, 504),
    dependencies=[require(Scope.TELEMETRY_ADMIN, VEHICLES_ENDPOINT)],
)
async def list_vehicles(gateway: GatewayDep) -> JSONResponse:
    """The registered (active) vehicles' VINs, oldest registration first."""
    answer = await ask_registry(gateway, {"query": "vehicles"})
    if isinstance(answer, JSONResponse):
        return answer
    return JSONResponse({"vehicles": answer.get("vehicles", [])})


@router.delete(
    VEHICLE_ENDPOINT,
    status_code=204,
    summary="Retire a vehicle",
    responses=error_responses(400, 404, 503, 504),
    dependencies=[require(Scope.TELEMETRY_ADMIN, VEHICLES_ENDPOINT)],
)
async def retire_vehicle(vin: str, gateway: GatewayDep) -> Response:
    """Retire a vehicle: its uploads are refused as unknown from now on (on this replica at
    once, on every replica and at the telemetry service within their cache times), and what
    was accepted for it stays stored. Registering the VIN again reactivates it. 404 when no
    registered vehicle has that VIN."""
    checked = checked_vin(gateway, vin)
    if isinstance(checked, JSONResponse):
        return checked
    answer = await ask_registry(gateway, {"query": "retire_vehicle", "vin": checked})
    if isinstance(answer, JSONResponse):
        return answer
    gateway.telemetry.vehicles.learn(checked, registered=False)
    log.info("vehicle retired", vin=checked)
    return Response(status_code=204)
