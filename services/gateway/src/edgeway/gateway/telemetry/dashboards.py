"""`WS /ws`: the seed dashboard protocol (a `log`, the `history` of the last records, a `log`, then
every `telemetry` record and the loggers' `log` lines); `GET /status`, the seed's fields, with
records and statistics from the telemetry service; `GET /api/v1/telemetry/sessions`, a vehicle's
offline (store-and-forward) sessions, from the telemetry service."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, WebSocket
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime

from edgeway.common.errors import ErrorObject, error_responses
from edgeway.common.logging import get_logger
from edgeway.common.topology import Channels
from edgeway.gateway.auth import Scope
from edgeway.gateway.fanout import (
    Message,
    SnapshotEcho,
    canonical,
)
from edgeway.gateway.link import ServiceUnavailableError
from edgeway.gateway.state import Gateway, GatewayDep, admit_websocket, require
from edgeway.gateway.telemetry.vehicles import ask_registry, checked_vin

DASHBOARD_ENDPOINT = "/ws"
HISTORY_LIMIT = 100  # records a dashboard gets on connect (the seed's)

router = APIRouter()
log = get_logger("edgeway.gateway.telemetry")


def log_line(message: str, log_type: str = "info") -> str:
    return orjson.dumps({"type": "log", "message": message, "log_type": log_type}).decode()


async def _history(gateway: Gateway) -> list[Any]:
    link = gateway.link
    answer = await link.request(
        service="telemetry",
        queue=link.topology.telemetry_requests_queue,
        body={"query": "history", "limit": HISTORY_LIMIT},
    )
    if not isinstance(answer, list):
        raise ServiceUnavailableError(f"telemetry answered {answer!r}")
    return answer


def _record_key(message: Any) -> bytes | None:
    """A live record's `data`, as its history item holds it; None for anything else (logs)."""
    if isinstance(message, dict) and message.get("type") == "telemetry":
        return canonical(message.get("data"))
    return None


@router.websocket(DASHBOARD_ENDPOINT)
async def dashboard(websocket: WebSocket, gateway: GatewayDep) -> None:
    principal = await admit_websocket(
        websocket, gateway, scope=Scope.TELEMETRY_SUBSCRIBE, endpoint=DASHBOARD_ENDPOINT
    )
    if principal is None:
        return
    state = gateway.telemetry
    client = gateway.client_queue(websocket, DASHBOARD_ENDPOINT)
    state.dashboards += 1

    async def history_first() -> None:
        greeting: list[Message] = [log_line("Connected to telemetry server", "success")]
        try:
            history = await _history(gateway)
        except ServiceUnavailableError as exc:
            log.warning("no history for a new dashboard", reason=str(exc))
            history = []
            greeting.append(
                log_line("History unavailable: the telemetry service is down", "warning")
            )
        greeting.append(orjson.dumps({"type": "history", "data": history}).decode())
        greeting.append(log_line(f"Loaded {len(history)} historical telemetry records"))
        # A record stored just before the history was read may be broadcast after it: its live
        # copy is dropped, once (a record is named by its data: timestamp, values, arrival time).
        SnapshotEcho(client, map(canonical, history), _record_key).install()
        client.push_front(greeting)

    try:
        await gateway.serve_client(
            websocket,
            client,
            (Channels.TELEMETRY_VEHICLES, Channels.TELEMETRY_LOGS),
            catch_up=history_first,
        )
    finally:
        state.dashboards -= 1


@router.get(
    "/status",
    summary="Telemetry status (the seed's fields)",
    responses=error_responses(504),
    dependencies=[require(Scope.TELEMETRY_SUBSCRIBE, "/status")],
)
async def status(gateway: GatewayDep) -> dict[str, Any]:
    """The seed's `/status`; records and statistics from the telemetry service (504 if down).

    `active_websockets` and `script_running` describe this gateway replica's connections.
    """
    link, state = gateway.link, gateway.telemetry
    answer = await link.request(
        service="telemetry", queue=link.topology.telemetry_requests_queue, body={"query": "status"}
    )
    if not isinstance(answer, dict) or "error" in answer:
        raise ServiceUnavailableError(f"telemetry answered {answer!r}")
    return {
        "total_records": answer["total_records"],
        "active_websockets": state.dashboards,
        "latest": answer["latest"],
        "script_running": any(session.running for session in state.loggers),
        "compression_stats": answer["compression_stats"],
    }


SESSIONS_ENDPOINT = "/api/v1/telemetry/sessions"
SESSIONS_LIMIT = 20  # the telemetry service's default
SESSIONS_MAX = 100  # and its most


@router.get(
    SESSIONS_ENDPOINT,
    summary="A vehicle's offline (store-and-forward) sessions",
    responses=error_responses(400, 404, 422, 503, 504),
    dependencies=[require(Scope.TELEMETRY_SUBSCRIBE, SESSIONS_ENDPOINT)],
)
async def offline_sessions(
    gateway: GatewayDep,
    vin: Annotated[str, Query(description="the vehicle's 17-character VIN")],
    limit: Annotated[
        int, Query(ge=1, le=SESSIONS_MAX, description="most sessions, newest first")
    ] = SESSIONS_LIMIT,
    since: Annotated[
        AwareDatetime | None,
        Query(description="only sessions still open or ended at or after this time (ISO 8601)"),
    ] = None,
    until: Annotated[
        AwareDatetime | None, Query(description="only sessions started before this time")
    ] = None,
) -> JSONResponse:
    """`{"vin", "sessions": [{"id", "vin", "started_at", "ended_at", "arrived_at",
    "records_buffered", "records_uploaded", "status"}]}`, newest first.

    A session is a run of records the vehicle's logger buffered while it could not send and
    replayed later (they reached the gateway more than the service's `offline_after_s` after
    their own time). `started_at` and `ended_at` are the records' own times (the live record
    that ended it; null while it is `syncing`, then `synced`), `arrived_at` when the replay
    reached the gateway; `records_buffered` counts what the logger numbered in it, lost
    packets included, `records_uploaded` what was stored. A retired vehicle's sessions are
    still given; 404 for a VIN never registered.
    """
    checked = checked_vin(gateway, vin, endpoint=SESSIONS_ENDPOINT)
    if isinstance(checked, JSONResponse):
        return checked
    if since is not None and until is not None and since > until:
        gateway.metrics.rejected.labels(SESSIONS_ENDPOINT, "validation_error").inc()
        refusal = ErrorObject(code="validation_error", reason="since is after until")
        return JSONResponse(refusal.body(), 422)
    query: dict[str, Any] = {"query": "offline_sessions", "vin": checked, "limit": limit}
    for name, at in (("since", since), ("until", until)):
        if at is not None:
            query[name] = at.isoformat()
    answer = await ask_registry(gateway, query, endpoint=SESSIONS_ENDPOINT)
    if isinstance(answer, JSONResponse):
        return answer
    if not isinstance(answer.get("sessions"), list):
        raise ServiceUnavailableError(f"telemetry answered {answer!r}")
    return JSONResponse(answer)
