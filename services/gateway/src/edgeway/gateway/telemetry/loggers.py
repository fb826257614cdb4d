"""Logger control: `POST /logger/start`, `/logger/stop` and the seed's `/start_script`,
`/stop_script`, `/toggle_offline`, `/clear_data` (scope `telemetry:control`) become commands for
the edge loggers, which keep `WS /telemetry/control/ws` open. Commands travel on the broadcast
exchange, so they reach a logger whichever gateway replica holds its socket."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse

from edgeway.common.envelope import Envelope
from edgeway.common.errors import error_responses
from edgeway.common.logging import get_logger
from edgeway.common.schemas.errors import ErrorCode, ErrorFrame
from edgeway.common.telemetry import wire
from edgeway.common.topology import Channels
from edgeway.gateway.auth import Scope
from edgeway.gateway.fanout import (
    ClientQueue,
    Policy,
)
from edgeway.gateway.limits import TokenBucket
from edgeway.gateway.producers import SeatRefused
from edgeway.gateway.state import Gateway, GatewayDep, admit_websocket, require
from edgeway.gateway.telemetry.dashboards import log_line
from edgeway.gateway.telemetry.state import CONTROL_ENDPOINT, LoggerSession, VehicleCheck
from edgeway.gateway.telemetry.uploads import refuse, retry_later
from edgeway.gateway.telemetry.vehicles import VEHICLES_ENDPOINT, ask_registry

LOG_TYPES = frozenset({"info", "success", "warning", "error"})  # the seed dashboard's

router = APIRouter()
log = get_logger("edgeway.gateway.telemetry")


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


def _unregistered(gateway: Gateway, vin: str) -> JSONResponse:
    return refuse(
        gateway,
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
        answer = await ask_registry(gateway, {"query": "vehicles"})
        if isinstance(answer, JSONResponse):
            return answer
        matches = [known for known in answer.get("vehicles", []) if known.endswith(vin)]
        if not matches:
            return refuse(
                gateway,
                404,
                ErrorCode.UNKNOWN_VEHICLE,
                f"no registered vehicle's VIN ends with {vin}: register one with POST "
                f'{VEHICLES_ENDPOINT} {{"vin": "<17-character VIN>"}} (a telemetry:admin token)',
            )
        if len(matches) > 1:
            return refuse(
                gateway,
                400,
                ErrorCode.INVALID_VIN,
                f"{vin} ends more than one registered VIN ({', '.join(matches)}): "
                "give the full VIN",
            )
        return str(matches[0])
    try:
        vin = wire.check_vin(vin)
    except wire.WireError as error:
        return refuse(
            gateway,
            400,
            ErrorCode.INVALID_VIN,
            f"{error.reason} (or the last {VEHICLE_TAG_LENGTH}, as dashboards show it)",
        )
    known = await gateway.telemetry.vehicles.check(gateway.link, vin)
    if known is VehicleCheck.UNKNOWN:
        return _unregistered(gateway, vin)
    if known is VehicleCheck.UNAVAILABLE:
        return retry_later(
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
            return refuse(
                gateway, 503, ErrorCode.UNAVAILABLE, "the broker did not take the command"
            )
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
    try:
        vin = wire.check_vin(vin)
        gateway.telemetry.controls.take(vin, websocket, principal)
    except wire.WireError as error:
        frame = ErrorFrame(code=ErrorCode.INVALID_TELEMETRY, reason=f"?vin=: {error.reason}")
        await websocket.send_text(frame.encode())
        await websocket.close(1008, "a valid ?vin= is required")
        return
    except SeatRefused as refused:
        gateway.metrics.rejected.labels(CONTROL_ENDPOINT, refused.code.value).inc()
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
            websocket,
            size=64,
            policy=Policy.DROP_OLDEST,
            endpoint=CONTROL_ENDPOINT,
            metrics=gateway.metrics,
        )
        self.channels = (Channels.telemetry_control(), Channels.telemetry_control(session.vin))
        self.bucket = TokenBucket(settings.control_rate, settings.control_burst)
        self.lines = TokenBucket(settings.logger_lines_rate, settings.logger_lines_burst)
        self.lines_dropped = 0  # since the last line that went out

    async def run(self) -> None:
        hub = self.gateway.link.hub
        self.state.loggers.add(self.session)
        self.gateway.metrics.connections.labels(CONTROL_ENDPOINT).inc()
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
            self.gateway.metrics.connections.labels(CONTROL_ENDPOINT).dec()
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
        self.gateway.metrics.rejected.labels(CONTROL_ENDPOINT, code.value).inc()
        self.commands.offer(ErrorFrame(code=code, reason=reason).encode())

    async def tell_dashboards(self, message: str, log_type: str, *, budget: bool = True) -> None:
        """A seed `log` line, prefixed with the vehicle, for every dashboard on any replica.

        Over the logger's line budget a line is dropped; the next one that goes says how many.
        """
        if budget and not self.lines.take():
            self.lines_dropped += 1
            self.gateway.metrics.dropped.labels(CONTROL_ENDPOINT, "line_budget").inc()
            return
        limit = self.gateway.settings.max_log_line_chars
        if len(message) > limit:
            message = f"{message[:limit]}... ({len(message) - limit} more characters)"
        if self.lines_dropped:
            message += f" ({self.lines_dropped} earlier lines dropped: over the line budget)"
            self.lines_dropped = 0
        line = log_line(f"[{self.session.vin[-6:]}] {message}", log_type)
        await self.gateway.link.publish_live(
            line.encode(),
            envelope=Envelope(type="telemetry.log.v1", producer=f"logger/{self.session.vin}"),
            routing_key=Channels.telemetry_log(self.session.vin),
        )
