"""`WS /ws/detections`: edge devices' boxes, one message per camera frame; a bad one gets an error
frame and the socket stays open. A token's `device` claim names the cameras it produces for, as
`<environment_id>/<camera_id>`; one connection per camera on a replica (`ProducerSeats`)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import APIRouter, WebSocket
from pydantic import ValidationError

from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.schemas.errors import ErrorCode, ErrorFrame
from edgeway.common.schemas.tracking import (
    DETECTIONS_TYPE,
    EdgeFrame,
)
from edgeway.gateway.auth import Principal, Scope
from edgeway.gateway.limits import TokenBucket
from edgeway.gateway.producers import SeatRefused
from edgeway.gateway.state import Gateway, GatewayDep, admit_websocket
from edgeway.gateway.tracking.state import DETECTIONS_ENDPOINT

router = APIRouter()
log = get_logger("edgeway.gateway.tracking")


class DetectionsSession:
    """One edge device's connection: edge checks, its cameras' seats, publishes, error frames
    back (the tracker's too: unknown environments and cameras, boxes outside the frame)."""

    def __init__(self, gateway: Gateway, websocket: WebSocket, principal: Principal) -> None:
        settings = gateway.settings
        self.gateway = gateway
        self.link = gateway.link
        self.websocket = websocket
        self.principal = principal
        self.connection_id = uuid.uuid4().hex[:12]
        self.reply_channel = self.link.producer_channel(self.connection_id)
        self.replies = gateway.producer_queue(websocket, DETECTIONS_ENDPOINT)
        self.bucket = TokenBucket(settings.producer_rate, settings.producer_burst)
        self.max_bytes = settings.tracking_max_detections_bytes
        self.seats = gateway.tracking.cameras
        self.cameras: set[str] = set()

    def reject(self, code: ErrorCode, reason: str, details: Any = None) -> None:
        self.gateway.metrics.rejected.labels(DETECTIONS_ENDPOINT, code.value).inc()
        self.replies.offer(ErrorFrame(code=code, reason=reason, details=details).encode())

    async def run(self) -> None:
        self.gateway.metrics.connections.labels(DETECTIONS_ENDPOINT).inc()
        log.info(
            "edge device connected", connection=self.connection_id, subject=self.principal.subject
        )
        writer = None
        try:
            await self.link.hub.subscribe(self.reply_channel, self.replies)
            writer = asyncio.create_task(self.replies.run())
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                await self.take(text.encode() if text is not None else message.get("bytes") or b"")
        finally:
            self.gateway.metrics.connections.labels(DETECTIONS_ENDPOINT).dec()
            for camera in self.cameras:
                self.seats.leave(camera, self.websocket)
            await self.link.hub.unsubscribe(self.reply_channel, self.replies)
            self.replies.close()
            if writer is not None:
                writer.cancel()
            log.info("edge device disconnected", connection=self.connection_id)

    async def take(self, raw: bytes) -> None:
        if len(raw) > self.max_bytes:
            self.reject(
                ErrorCode.TOO_LARGE, f"message is {len(raw)} bytes; the limit is {self.max_bytes}"
            )
            return
        if not self.bucket.take():
            self.reject(ErrorCode.RATE_LIMITED, "too many messages")
            return
        try:
            frame = EdgeFrame.model_validate_json(raw)
        except ValidationError as exc:
            refusal = ErrorFrame.invalid(exc)
            self.reject(refusal.code, refusal.reason)
            return
        camera = f"{frame.environment_id}/{frame.camera_id}"
        where = {"camera_id": frame.camera_id, "frame_index": frame.frame_index}
        if camera not in self.cameras:
            try:
                self.seats.take(camera, self.websocket, self.principal)
            except SeatRefused as refused:
                self.reject(refused.code, refused.reason, where)
                return
            self.cameras.add(camera)
        envelope = Envelope(
            type=DETECTIONS_TYPE,
            producer=f"edge/{self.principal.subject}",
            captured_at=frame.timestamp,
            reply_channel=self.reply_channel,
        )
        topology = self.link.topology
        try:
            await self.link.publish_stream(
                raw,
                envelope=envelope,
                exchange=topology.tracking_detections,
                routing_key=topology.tracking_detections_key(frame.environment_id, frame.camera_id),
            )
        except Exception as exc:  # noqa: BLE001 - any broker failure: tell the producer
            log.warning("publish failed", error=repr(exc))
            self.reject(ErrorCode.UNAVAILABLE, "not accepted: the broker did not confirm it", where)
            return
        self.gateway.metrics.published.labels(DETECTIONS_ENDPOINT).inc()


@router.websocket(DETECTIONS_ENDPOINT)
async def detections_socket(websocket: WebSocket, gateway: GatewayDep) -> None:
    principal = await admit_websocket(
        websocket, gateway, scope=Scope.TRACKING_PUBLISH, endpoint=DETECTIONS_ENDPOINT
    )
    if principal is None:
        return
    await DetectionsSession(gateway, websocket, principal).run()
