"""Telemetry compatibility (docs/seed-systems.md §4): vehicle loggers in, dashboards out.

- `POST /telemetry`, `POST /api/telemetry`: protobuf uploads (`X-Compressed`, `X-Vehicle-VIN`,
  and `X-Batch` for many records). Checked here, published unchanged to the telemetry work queue
  (several to a message while the broker is busy: `edgeway.gateway.telemetry_publisher`); 202
  only once the broker confirmed it, real status codes otherwise.
- `WS /ws`: the seed dashboard protocol: a `log`, the `history` of the last records, a `log`,
  then every `telemetry` record and the loggers' `log` lines.
- `GET /status`: the seed's fields; records and statistics come from the telemetry service.
- Logger control: `POST /logger/start`, `/logger/stop` and the seed's `/start_script`,
  `/stop_script`, `/toggle_offline`, `/clear_data` need the `telemetry:control` scope and become
  commands for the edge loggers, which keep `WS /telemetry/control/ws` open. Commands travel on
  the broadcast exchange, so they reach a logger whichever gateway replica holds its socket.
- Vehicle registry: `POST /api/v1/vehicles` (`{"vin": ...}`), `GET /api/v1/vehicles`,
  `DELETE /api/v1/vehicles/{vin}` need the `telemetry:admin` scope and are requests to the
  telemetry service, which owns the registry (a deleted vehicle is retired, never removed).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Request, WebSocket
from fastapi.responses import JSONResponse, Response

from edgeway.common.envelope import Envelope
from edgeway.common.errors import error_responses
from edgeway.common.logging import get_logger
from edgeway.common.schemas.errors import ErrorCode, ErrorFrame
from edgeway.common.telemetry import wire
from edgeway.common.telemetry.uploads import PROTOBUF, UPLOAD_TYPE
from edgeway.common.topology import Channels
from edgeway.gateway.auth import Identity, Principal, Scope
from edgeway.gateway.docs import binary_body
from edgeway.gateway.fanout import (
    ClientQueue,
    Message,
    Policy,
    SnapshotEcho,
    canonical,
    read_until_gone,
)
from edgeway.gateway.limits import TokenBucket, read_body
from edgeway.gateway.link import ServiceUnavailableError
from edgeway.gateway.metrics import CONNECTIONS, DROPPED, PUBLISHED, REJECTED
from edgeway.gateway.producers import SeatRefused, check_identity
from edgeway.gateway.state import Gateway, GatewayDep, admit_websocket, require
from edgeway.gateway.telemetry_publisher import UploadsBackloggedError
from edgeway.gateway.telemetry_state import CONTROL_ENDPOINT, LoggerSession, VehicleCheck

UPLOAD_ENDPOINT = "/telemetry"
DASHBOARD_ENDPOINT = "/ws"
LOG_TYPES = frozenset({"info", "success", "warning", "error"})  # the seed dashboard's
ACCEPTED_CONTENT_TYPES = frozenset({PROTOBUF, "application/octet-stream"})
# The seed logger's default when it sends no X-Vehicle-VIN header.
SEED_VIN = "5YJ3E1EA1KF000001"
HISTORY_LIMIT = 100  # records a dashboard gets on connect (the seed's)

router = APIRouter()
log = get_logger("edgeway.gateway.telemetry")


def _error(status: int, code: ErrorCode, reason: str) -> JSONResponse:
    REJECTED.labels(UPLOAD_ENDPOINT, code.value).inc()
    return JSONResponse(ErrorFrame(code=code, reason=reason).model_dump(exclude_none=True), status)


def _retry_later(gateway: Gateway, reason: str) -> JSONResponse:
    """503 with Retry-After: the upload is fine, the gateway cannot take it now."""
    response = _error(503, ErrorCode.UNAVAILABLE, reason)
    response.headers["Retry-After"] = str(gateway.settings.upload_retry_after)
    return response


def _flag(value: str | None, header: str) -> bool:
    """`true`/`false` (any case); absent is false, anything else is refused."""
    if value is None or value.strip().lower() == "false":
        return False
    if value.strip().lower() == "true":
        return True
    raise wire.WireError(f"{header} must be true or false, not {value!r}")


# --- upload ---------------------------------------------------------------------------------


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


@router.post(UPLOAD_ENDPOINT, summary="Upload telemetry", **UPLOAD_DOCS)
# The seed README's documented path.
@router.post("/api/telemetry", summary="Upload telemetry (the seed README's path)", **UPLOAD_DOCS)
async def upload(
    request: Request,
    gateway: GatewayDep,
    principal: Annotated[Principal, require(Scope.TELEMETRY_PUBLISH, UPLOAD_ENDPOINT)],
    x_compressed: str | None = Header(default=None),
    x_vehicle_vin: str | None = Header(default=None),
    x_batch: str | None = Header(default=None),
) -> JSONResponse:
    content_type = request.headers.get("content-type", PROTOBUF).split(";")[0].strip().lower()
    if content_type not in ACCEPTED_CONTENT_TYPES:
        return _error(
            415,
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"content type {content_type!r}: send a protobuf body as {PROTOBUF}",
        )
    limit = gateway.settings.max_upload_bytes
    body = await read_body(request, limit)
    if body is None:
        return _error(413, ErrorCode.TOO_LARGE, f"the body is over the {limit}-byte limit")
    try:
        vin = wire.check_vin(x_vehicle_vin if x_vehicle_vin is not None else SEED_VIN)
        compressed = _flag(x_compressed, "X-Compressed")
        batch = _flag(x_batch, "X-Batch")
        packets = wire.parse_upload(body, compressed=compressed, batch=batch)
    except wire.WireError as error:
        return _error(400, ErrorCode.INVALID_TELEMETRY, error.reason)
    try:
        check_identity(principal, Identity.VIN, vin)
    except SeatRefused as refused:
        return _error(403, refused.code, refused.reason)
    known = await gateway.telemetry.vehicles.check(gateway.link, vin)
    if known is VehicleCheck.UNKNOWN:
        return _error(422, ErrorCode.UNKNOWN_VEHICLE, f"vehicle {vin} is not registered")
    if known is VehicleCheck.UNAVAILABLE:  # not "unknown": the logger keeps it and retries
        return _retry_later(
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
        await gateway.telemetry.uploads.publish(body, envelope)
    except UploadsBackloggedError as exc:
        log.warning("upload refused: too many wait for the broker", reason=str(exc), vin=vin)
        return _retry_later(gateway, "not accepted: too many uploads wait for the broker")
    except Exception as exc:  # noqa: BLE001 - any broker failure: the logger must send it again
        log.warning("publish failed", error=repr(exc), vin=vin)
        return _error(503, ErrorCode.UNAVAILABLE, "not accepted: the broker did not confirm it")
    PUBLISHED.labels(UPLOAD_ENDPOINT).inc()
    return JSONResponse(
        {"status": "accepted", "records": len(packets), "message_id": envelope.message_id}, 202
    )


# --- dashboards -----------------------------------------------------------------------------


def _log_line(message: str, log_type: str = "info") -> str:
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
    await websocket.accept()
    hub, state = gateway.link.hub, gateway.telemetry
    client = ClientQueue.text(
        websocket,
        size=gateway.settings.client_queue_size,
        policy=Policy.DROP_OLDEST,
        endpoint=DASHBOARD_ENDPOINT,
    )
    CONNECTIONS.labels(DASHBOARD_ENDPOINT).inc()
    state.dashboards += 1

    async def history_first() -> None:
        greeting: list[Message] = [_log_line("Connected to telemetry server", "success")]
        try:
            history = await _history(gateway)
        except ServiceUnavailableError as exc:
            log.warning("no history for a new dashboard", reason=str(exc))
            history = []
            greeting.append(
                _log_line("History unavailable: the telemetry service is down", "warning")
            )
        greeting.append(orjson.dumps({"type": "history", "data": history}).decode())
        greeting.append(_log_line(f"Loaded {len(history)} historical telemetry records"))
        # A record stored just before the history was read may be broadcast after it: its live
        # copy is dropped, once (a record is named by its data: timestamp, values, arrival time).
        SnapshotEcho(client, map(canonical, history), _record_key).install()
        client.push_front(greeting)

    try:
        await hub.serve(
            client,
            (Channels.TELEMETRY_VEHICLES, Channels.TELEMETRY_LOGS),
            catch_up=history_first,
            read=lambda: read_until_gone(websocket),  # the seed ignores what dashboards send
        )
    finally:
        CONNECTIONS.labels(DASHBOARD_ENDPOINT).dec()
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


# --- logger control -------------------------------------------------------------------------

COMMANDS = {
    "/logger/start": "start",
    "/start_script": "start",
    "/logger/stop": "stop",
    "/stop_script": "stop",
    "/toggle_offline": "toggle_offline",
    "/clear_data": "clear_data",
}


# What each command does, said in its answer (the seed's names do not say it all).
COMMAND_EFFECTS = {
    "start": "the loggers record and send",
    "stop": "the loggers stop recording; what they buffered stays and is sent after a start",
    "toggle_offline": (
        "each logger enters or leaves a simulated dead zone (recording to its buffer, sending "
        "nothing); `loggers` shows each one's new `offline`"
    ),
    "clear_data": (
        "resets the loggers' own counters and restarts their encoders (the next packet is a "
        "resync); deletes nothing on the server, and packets not sent yet stay buffered"
    ),
}
# How long a command's answer waits for the loggers on this replica to acknowledge it, so it
# can say their new state (they answer in milliseconds; a logger that does not is listed as
# not acknowledged, with the state it last reported).
CONTROL_ACK_WAIT_S = 2.0
# The seed dashboards' `vehicle_vin` (the last six characters), which `?vin=` also takes.
VEHICLE_TAG_LENGTH = 6


def _unregistered(vin: str) -> JSONResponse:
    return _error(
        404,
        ErrorCode.UNKNOWN_VEHICLE,
        f"vehicle {vin} is not registered: register it with POST {VEHICLES_ENDPOINT} "
        f'{{"vin": "{vin}"}} (a telemetry:admin token), then start its logger',
    )


async def _control_target(gateway: Gateway, vin: str) -> str | JSONResponse:
    """The registered vehicle `?vin=` names: a full VIN, or the six characters the dashboards
    show as `vehicle_vin` when exactly one registered vehicle ends with them."""
    vin = vin.strip().upper()
    if len(vin) == VEHICLE_TAG_LENGTH:
        answer = await _ask_registry(gateway, {"query": "vehicles"})
        if isinstance(answer, JSONResponse):
            return answer
        matches = [known for known in answer.get("vehicles", []) if known.endswith(vin)]
        if not matches:
            return _error(
                404,
                ErrorCode.UNKNOWN_VEHICLE,
                f"no registered vehicle's VIN ends with {vin}: register one with POST "
                f'{VEHICLES_ENDPOINT} {{"vin": "<17-character VIN>"}} (a telemetry:admin token)',
            )
        if len(matches) > 1:
            return _error(
                400,
                ErrorCode.INVALID_VIN,
                f"{vin} ends more than one registered VIN ({', '.join(matches)}): "
                "give the full VIN",
            )
        return str(matches[0])
    try:
        vin = wire.check_vin(vin)
    except wire.WireError as error:
        return _error(
            400,
            ErrorCode.INVALID_VIN,
            f"{error.reason} (or the last {VEHICLE_TAG_LENGTH}, as dashboards show it)",
        )
    known = await gateway.telemetry.vehicles.check(gateway.link, vin)
    if known is VehicleCheck.UNKNOWN:
        return _unregistered(vin)
    if known is VehicleCheck.UNAVAILABLE:
        return _retry_later(
            gateway, f"vehicle {vin} cannot be confirmed: the telemetry service is unavailable"
        )
    return vin


async def _acknowledged(gateway: Gateway, vin: str | None, command_id: str) -> list[dict[str, Any]]:
    """The loggers on this replica the command went to, once each acknowledged it (or
    CONTROL_ACK_WAIT_S passed): their state after it."""
    sessions = [s for s in gateway.telemetry.loggers if vin is None or s.vin == vin]
    deadline = asyncio.get_running_loop().time() + CONTROL_ACK_WAIT_S
    while not all(command_id in s.acked for s in sessions):
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.02)
    return [
        {
            "vin": s.vin,
            "vehicle_vin": s.vin[-VEHICLE_TAG_LENGTH:],
            "acknowledged": command_id in s.acked,
            "running": s.running,
            "offline": s.offline,
            "buffered": s.buffered,
        }
        for s in sorted(sessions, key=lambda s: s.vin)
    ]


def _control_endpoint(path: str, command: str) -> None:
    async def relay(gateway: GatewayDep, vin: str | None = None) -> JSONResponse:
        """Send the command to the edge loggers (one registered vehicle with `?vin=`: its full
        VIN or the dashboards' six characters; else all). 202 with `loggers`: the state of
        each logger connected here after it acknowledged the command (waited for up to
        CONTROL_ACK_WAIT_S); 404 for a vehicle that is not registered."""
        if vin is not None:
            target = await _control_target(gateway, vin)
            if isinstance(target, JSONResponse):
                return target
            vin = target
        command_id = uuid.uuid4().hex
        body = {"type": "command", "command": command, "command_id": command_id}
        try:
            await gateway.link.publish_live(
                orjson.dumps(body),
                envelope=Envelope(type="telemetry.command.v1", producer="gateway"),
                routing_key=Channels.telemetry_control(vin),
            )
        except Exception as exc:  # noqa: BLE001 - tell the operator, who can try again
            log.warning("command not published", command=command, error=repr(exc))
            return _error(503, ErrorCode.UNAVAILABLE, "the broker did not take the command")
        return JSONResponse(
            {
                "status": "accepted",
                "command": command,
                "command_id": command_id,
                "vin": vin,
                "effect": COMMAND_EFFECTS[command],
                "loggers": await _acknowledged(gateway, vin, command_id),
            },
            202,
        )

    router.add_api_route(
        path,
        relay,
        methods=["POST"],
        status_code=202,
        summary=f"Logger command: {command}",
        responses=error_responses(400, 404, 503, 504),
        dependencies=[require(Scope.TELEMETRY_CONTROL, path)],
        name=f"control {path}",
    )


for _path, _command in COMMANDS.items():
    _control_endpoint(_path, _command)


@router.websocket(CONTROL_ENDPOINT)
async def control(websocket: WebSocket, gateway: GatewayDep, vin: str = "") -> None:
    principal = await admit_websocket(
        websocket, gateway, scope=Scope.TELEMETRY_PUBLISH, endpoint=CONTROL_ENDPOINT
    )
    if principal is None:
        return
    await websocket.accept()
    try:
        vin = wire.check_vin(vin)
        gateway.telemetry.controls.take(vin, websocket, principal)
    except wire.WireError as error:
        frame = ErrorFrame(code=ErrorCode.INVALID_TELEMETRY, reason=f"?vin=: {error.reason}")
        await websocket.send_text(frame.encode())
        await websocket.close(1008, "a valid ?vin= is required")
        return
    except SeatRefused as refused:
        REJECTED.labels(CONTROL_ENDPOINT, refused.code.value).inc()
        log.info("logger refused", vin=vin, reason=refused.reason)
        await websocket.send_text(ErrorFrame(code=refused.code, reason=refused.reason).encode())
        await websocket.close(1008, refused.code.value)
        return
    try:
        await LoggerLink(gateway, websocket, LoggerSession(vin)).run()
    finally:
        gateway.telemetry.controls.leave(vin, websocket)


class LoggerLink:
    """One logger's control socket: commands down, status and log lines up.

    Its messages are limited in size and rate, and its lines to the dashboards by a budget of
    their own: every dashboard on every replica gets each line.
    """

    def __init__(self, gateway: Gateway, websocket: WebSocket, session: LoggerSession) -> None:
        settings = gateway.settings
        self.gateway = gateway
        self.websocket = websocket
        self.session = session
        self.state = gateway.telemetry
        self.commands = ClientQueue.text(
            websocket, size=64, policy=Policy.DROP_OLDEST, endpoint=CONTROL_ENDPOINT
        )
        self.channels = (Channels.telemetry_control(), Channels.telemetry_control(session.vin))
        self.bucket = TokenBucket(settings.control_rate, settings.control_burst)
        self.lines = TokenBucket(settings.logger_lines_rate, settings.logger_lines_burst)
        self.lines_dropped = 0  # since the last line that went out

    async def run(self) -> None:
        hub = self.gateway.link.hub
        self.state.loggers.add(self.session)
        CONNECTIONS.labels(CONTROL_ENDPOINT).inc()
        writer = asyncio.create_task(self.commands.run())
        try:
            for channel in self.channels:
                await hub.subscribe(channel, self.commands)
            await self.tell_dashboards("edge logger connected", "success", budget=False)
            limit = self.gateway.settings.max_control_message_bytes
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text") or message.get("bytes") or b""
                if len(raw) > limit:
                    self.reject(ErrorCode.TOO_LARGE, f"messages are limited to {limit} bytes")
                elif not self.bucket.take():
                    self.reject(ErrorCode.RATE_LIMITED, "too many messages")
                elif self.state.controls.holds(self.session.vin, self.websocket):
                    await self.take(raw)
        finally:
            self.state.loggers.discard(self.session)
            CONNECTIONS.labels(CONTROL_ENDPOINT).dec()
            for channel in self.channels:
                await hub.unsubscribe(channel, self.commands)
            self.commands.close()
            writer.cancel()
            with contextlib.suppress(Exception):
                await self.tell_dashboards("edge logger disconnected", "warning", budget=False)

    async def take(self, raw: str | bytes) -> None:
        try:
            message = orjson.loads(raw)
            kind = message["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.reject(ErrorCode.MALFORMED_JSON, 'expected a JSON object with a "type"')
            return
        if kind in ("status", "ack"):
            reason = self.describe(message)
            if reason is not None:
                self.reject(ErrorCode.INVALID_SHAPE, f"{kind}: {reason}")
                return
            if kind == "ack":
                self.session.acked.append(str(message.get("command_id")))
                outcome = f"failed: {message['error']}" if message.get("error") else "done"
                await self.tell_dashboards(
                    f"command {message.get('command_id', '?')} {outcome}; running="
                    f"{self.session.running} offline={self.session.offline} "
                    f"buffered={self.session.buffered}",
                    "error" if message.get("error") else "info",
                )
        elif kind == "log":
            text, log_type = message.get("message", ""), message.get("log_type", "info")
            if (
                not isinstance(text, str)
                or not isinstance(log_type, str)
                or (log_type not in LOG_TYPES)
            ):
                self.reject(
                    ErrorCode.INVALID_SHAPE,
                    f"log: message must be text and log_type one of {', '.join(sorted(LOG_TYPES))}",
                )
                return
            await self.tell_dashboards(text, log_type)
        else:
            self.reject(
                ErrorCode.INVALID_SHAPE,
                f"unknown message type {kind!r}: expected status, ack or log",
            )

    def describe(self, message: dict[str, Any]) -> str | None:
        """Take a status's (or ack's) `running`, `offline` and `buffered`; None, or why not."""
        session = self.session
        running = message.get("running", session.running)
        offline = message.get("offline", session.offline)
        buffered = message.get("buffered", session.buffered)
        if not isinstance(running, bool) or not isinstance(offline, bool):
            return "running and offline must be true or false"
        if isinstance(buffered, bool) or not isinstance(buffered, int) or buffered < 0:
            return "buffered must be a whole number of records, 0 or more"
        session.running, session.offline, session.buffered = running, offline, buffered
        return None

    def reject(self, code: ErrorCode, reason: str) -> None:
        REJECTED.labels(CONTROL_ENDPOINT, code.value).inc()
        self.commands.offer(ErrorFrame(code=code, reason=reason).encode())

    async def tell_dashboards(self, message: str, log_type: str, *, budget: bool = True) -> None:
        """A seed `log` line, prefixed with the vehicle, for every dashboard on any replica.

        Over the logger's line budget a line is dropped; the next one that goes says how many.
        """
        if budget and not self.lines.take():
            self.lines_dropped += 1
            DROPPED.labels(CONTROL_ENDPOINT, "line_budget").inc()
            return
        limit = self.gateway.settings.max_log_line_chars
        if len(message) > limit:
            message = f"{message[:limit]}... ({len(message) - limit} more characters)"
        if self.lines_dropped:
            message += f" ({self.lines_dropped} earlier lines dropped: over the line budget)"
            self.lines_dropped = 0
        line = _log_line(f"[{self.session.vin[-6:]}] {message}", log_type)
        await self.gateway.link.publish_live(
            line.encode(),
            envelope=Envelope(type="telemetry.log.v1", producer=f"logger/{self.session.vin}"),
            routing_key=Channels.telemetry_log(self.session.vin),
        )


# --- vehicle registry -----------------------------------------------------------------------

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
    status: int, code: ErrorCode, reason: str, *, retry_after: int | None = None
) -> JSONResponse:
    REJECTED.labels(VEHICLES_ENDPOINT, code.value).inc()
    response = JSONResponse(
        ErrorFrame(code=code, reason=reason).model_dump(exclude_none=True), status
    )
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _checked_vin(vin: str) -> str | JSONResponse:
    try:
        return wire.check_vin(vin)
    except wire.WireError as error:
        return _admin_error(400, ErrorCode.INVALID_VIN, error.reason)


async def _ask_registry(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any] | JSONResponse:
    """The telemetry service's answer, or the refusal it makes for the caller.

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
            503, ErrorCode.UNAVAILABLE, reason, retry_after=gateway.settings.upload_retry_after
        )
    if code in VEHICLE_REFUSALS:
        status, error_code = VEHICLE_REFUSALS[code]
        return _admin_error(status, error_code, reason)
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
            413, ErrorCode.TOO_LARGE, f"the body is over the {MAX_VEHICLE_BODY_BYTES}-byte limit"
        )
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _admin_error(400, ErrorCode.MALFORMED_JSON, 'expected {"vin": "<VIN>"}')
    vin = document.get("vin") if isinstance(document, dict) else None
    if not isinstance(vin, str):
        return _admin_error(
            400, ErrorCode.INVALID_SHAPE, 'expected {"vin": "<VIN>"} with the VIN as a string'
        )
    checked = _checked_vin(vin)
    if isinstance(checked, JSONResponse):
        return checked
    answer = await _ask_registry(gateway, {"query": "register_vehicle", "vin": checked})
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
    answer = await _ask_registry(gateway, {"query": "vehicles"})
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
    checked = _checked_vin(vin)
    if isinstance(checked, JSONResponse):
        return checked
    answer = await _ask_registry(gateway, {"query": "retire_vehicle", "vin": checked})
    if isinstance(answer, JSONResponse):
        return answer
    gateway.telemetry.vehicles.learn(checked, registered=False)
    log.info("vehicle retired", vin=checked)
    return Response(status_code=204)
