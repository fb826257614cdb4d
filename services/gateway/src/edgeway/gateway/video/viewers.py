"""`WS /ws/viewer`: trajectory updates, restarts and IMU out; commands to phones in."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, WebSocket

from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.schemas.errors import ErrorCode
from edgeway.common.topology import Channels
from edgeway.common.video import check_device
from edgeway.gateway.auth import Principal, Scope
from edgeway.gateway.fanout import (
    ClientQueue,
    Policy,
    stop_tasks,
)
from edgeway.gateway.limits import TokenBucket
from edgeway.gateway.state import Gateway, GatewayDep, admit_websocket
from edgeway.gateway.video.sockets import (
    REFUSED,
    decode_json,
    error_frame,
    message_type,
    read_message,
)

VIEWER_ENDPOINT = "/ws/viewer"
# Viewer commands the seed relays verbatim to phones.
COMMANDS = frozenset({"joystick", "movement", "rotation", "camera", "flightmode"})

router = APIRouter()
log = get_logger("edgeway.gateway.video")


class ViewerSession:
    """`/ws/viewer`: trajectory, restarts and IMU out; commands for phones in."""

    def __init__(self, gateway: Gateway, websocket: WebSocket, principal: Principal) -> None:
        self.gateway = gateway
        self.link = gateway.link
        self.websocket = websocket
        self.principal = principal
        self.can_control = Scope.VIDEO_CONTROL in principal.scopes
        settings = gateway.settings
        self.bucket = TokenBucket(settings.viewer_command_rate, settings.viewer_command_burst)
        self.send_queue = ClientQueue.text(
            websocket,
            size=gateway.settings.client_queue_size,
            policy=Policy.DROP_OLDEST,  # IMU and poses: a viewer far behind wants fresh ones
            endpoint=VIEWER_ENDPOINT,
            metrics=gateway.metrics,
        )
        self.channels = (Channels.VIDEO_VIEWER, Channels.video_imu("*"))

    def reject(self, code: str, reason: str) -> None:
        self.gateway.metrics.rejected.labels(VIEWER_ENDPOINT, code).inc()
        self.send_queue.offer(error_frame(code, reason))

    async def run(self) -> None:
        hub = self.link.hub
        self.gateway.metrics.connections.labels(VIEWER_ENDPOINT).inc()
        writer = asyncio.create_task(self.send_queue.run())
        try:
            for channel in self.channels:
                await hub.subscribe(channel, self.send_queue)
            while (data := await read_message(self.websocket)) is not None:
                await self.take(data)
        finally:
            self.gateway.metrics.connections.labels(VIEWER_ENDPOINT).dec()
            for channel in self.channels:
                await hub.unsubscribe(channel, self.send_queue)
            self.send_queue.close()
            await stop_tasks(writer)

    async def take(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            self.reject(ErrorCode.INVALID_SHAPE.value, "viewers send JSON text messages")
            return
        if len(data) > self.gateway.settings.max_message_bytes:
            self.reject(ErrorCode.TOO_LARGE.value, "the message is too large")
            return
        message = decode_json(
            data, bucket=self.bucket, reject=self.reject, rate_reason="too many commands"
        )
        if message is REFUSED:
            return
        kind = message_type(message)
        if kind not in COMMANDS:
            self.reject(
                ErrorCode.INVALID_SHAPE.value,
                f"unknown message type {kind!r}: expected one of {', '.join(sorted(COMMANDS))}",
            )
            return
        if not self.can_control:
            self.reject(
                ErrorCode.FORBIDDEN.value,
                f"{kind}: commands to phones need the scope {Scope.VIDEO_CONTROL}",
            )
            return
        # The seed sends every command to every phone; "device" addresses one.
        device = message.get("device")
        if device is not None and (not isinstance(device, str) or check_device(device)):
            self.reject(ErrorCode.INVALID_SHAPE.value, "device must be a device id")
            return
        try:
            await self.link.publish_live(
                data.encode(),  # verbatim, as the seed relays it
                envelope=Envelope(
                    type="video.command.v1", producer=f"viewer/{self.principal.subject}"
                ),
                routing_key=Channels.video_control(device),
            )
        except Exception as exc:  # noqa: BLE001 - tell the viewer, who can send it again
            log.warning("command not published", kind=kind, error=repr(exc))
            self.reject(ErrorCode.UNAVAILABLE.value, f"{kind} not sent: the broker is unavailable")


@router.websocket(VIEWER_ENDPOINT)
async def viewer(websocket: WebSocket, gateway: GatewayDep) -> None:
    principal = await admit_websocket(
        websocket, gateway, scope=Scope.VIDEO_SUBSCRIBE, endpoint=VIEWER_ENDPOINT
    )
    if principal is not None:
        await ViewerSession(gateway, websocket, principal).run()
