"""`WS /ws/phone`: a phone's JPEG frames, IMU samples, analysis mode and CSV files up; viewer
commands for it down the same socket. Whatever cannot be taken gets an error frame; the socket
stays open."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket

from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.media import MediaRejected, check_csv
from edgeway.common.schemas.errors import ErrorCode
from edgeway.common.schemas.ingest import (
    HEADER_DEVICE,
    HEADER_FILE_ID,
    HEADER_FILE_NAME,
    HEADER_KIND,
    UPLOAD_FILE_TYPE,
    FileKind,
)
from edgeway.common.topology import Channels
from edgeway.gateway.fanout import stop_tasks
from edgeway.gateway.state import Gateway, GatewayDep
from edgeway.gateway.video.jpeg import JpegError, jpeg_size
from edgeway.gateway.video.phone_files import PhoneUploads, UploadRefused
from edgeway.gateway.video.sockets import (
    DEFAULT_DEVICE,
    OCTET_STREAM,
    REFUSED,
    PhoneSocket,
    admit_phone,
    decode_json,
    message_type,
    read_message,
)
from edgeway.gateway.video.state import PHONE_ENDPOINT

TIMESTAMP_BYTES = 8  # the big-endian ns timestamp before a phone's JPEG
UPLOADS = frozenset(
    {"file_upload", "file_upload_start", "file_upload_chunk", "file_upload_complete"}
)
# Room for the JSON around a whole `file_upload`'s text.
UPLOAD_OVERHEAD = 4096
# ErrorObject codes of the video endpoints beyond the shared ErrorCode set; same frame shape.
INVALID_JPEG = "invalid_jpeg"

router = APIRouter()
log = get_logger("edgeway.gateway.video")


def check_imu(message: dict[str, Any]) -> str | None:
    """The reason an `imu_data` message is unusable, or None (the relay orders by timestamp)."""
    timestamp = message.get("timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        return "imu_data.timestamp must be an integer (ns)"
    for sensor in ("accelerometer", "gyroscope"):
        values = message.get(sensor)
        if not isinstance(values, dict) or not all(
            isinstance(values.get(axis), int | float) and not isinstance(values.get(axis), bool)
            for axis in "xyz"
        ):
            return f"imu_data.{sensor} must be an object with numeric x, y and z"
    return None


class PhoneSession(PhoneSocket):
    """`/ws/phone`: JPEG frames, IMU and analysis mode up; commands for this device down."""

    endpoint = PHONE_ENDPOINT

    def __init__(self, gateway: Gateway, websocket: WebSocket, device: str) -> None:
        super().__init__(gateway, websocket, device)
        self.channels = (Channels.video_control(), Channels.video_control(device))
        self.producer = f"phone/{device}"
        settings = gateway.settings
        self.uploads = PhoneUploads(
            max_bytes=settings.max_phone_file_bytes, max_open=settings.max_phone_uploads
        )

    async def run(self) -> None:
        hub = self.link.hub
        self.gateway.metrics.connections.labels(self.endpoint).inc()
        writer = asyncio.create_task(self.send_queue.run())
        log.info("phone connected", device=self.device, connection=self.connection_id)
        try:
            for channel in self.channels:
                await hub.subscribe(channel, self.send_queue)
            while (data := await read_message(self.websocket)) is not None:
                if isinstance(data, bytes):
                    await self.take_frame(data)
                else:
                    await self.take_text(data)
        finally:
            self.gateway.video.phones.leave(self.device, self.websocket)
            self.gateway.metrics.connections.labels(self.endpoint).dec()
            self.uploads.close()
            await self.drain()
            for channel in self.channels:
                await hub.unsubscribe(channel, self.send_queue)
            self.send_queue.close()
            await stop_tasks(writer)
            log.info("phone disconnected", device=self.device, connection=self.connection_id)

    async def take_frame(self, data: bytes) -> None:
        if not self.gateway.video.phones.holds(self.device, self.websocket):
            return  # replaced by a newer connection for this device: it speaks for it now
        limit = self.gateway.settings.max_jpeg_bytes
        if len(data) - TIMESTAMP_BYTES > limit:
            self.reject(
                ErrorCode.TOO_LARGE.value,
                f"the JPEG is {len(data) - TIMESTAMP_BYTES} bytes; the limit is {limit}",
            )
            return
        if not self.bucket.take():
            self.reject(ErrorCode.RATE_LIMITED.value, "too many messages")
            return
        if len(data) < TIMESTAMP_BYTES:
            self.reject(INVALID_JPEG, "a frame is an 8-byte big-endian ns timestamp, then a JPEG")
            return
        jpeg = data[TIMESTAMP_BYTES:]
        try:
            width, height = jpeg_size(jpeg)
        except JpegError as error:
            self.reject(INVALID_JPEG, str(error))
            return
        timestamp_ns = int.from_bytes(data[:TIMESTAMP_BYTES], "big")
        clock = self.gateway.clock
        received_ns = int(clock.now() * 1e9)
        envelope = Envelope(
            type="video.frame.v1",
            producer=self.producer,
            captured_at=timestamp_ns / 1e9,
            content_type=OCTET_STREAM,
            headers={
                # The seed's headers, as strings, as it sent them.
                "timestamp_ns": str(timestamp_ns),
                "server_received": str(received_ns),
                "ntp_time": str(received_ns),
                "ntp_offset": str(clock.offset_s),
                "width": str(width),
                "height": str(height),
                "x-device": self.device,
            },
        )
        exchange = self.link.topology.worldsystem("video_frames")
        await self.spawn(
            self.confirmed(
                self.link.publish_stream(jpeg, envelope=envelope, exchange=exchange), what="frame"
            )
        )

    async def take_text(self, text: str) -> None:
        if not self.gateway.video.phones.holds(self.device, self.websocket):
            return  # replaced by a newer connection for this device: it speaks for it now
        settings = self.gateway.settings
        # A whole `file_upload` may be as large as a file; anything else is a small message.
        limit = max(settings.max_message_bytes, settings.max_phone_file_bytes + UPLOAD_OVERHEAD)
        if len(text) > limit or (
            len(text) > settings.max_message_bytes and '"file_upload"' not in text[:256]
        ):
            self.reject(
                ErrorCode.TOO_LARGE.value,
                f"text messages are limited to {settings.max_message_bytes} bytes "
                f"({settings.max_phone_file_bytes} for a whole file_upload)",
            )
            return
        message = decode_json(text, bucket=self.bucket, reject=self.reject)
        if message is REFUSED:
            return
        kind = message_type(message)
        if kind == "imu_data":
            reason = check_imu(message)
            if reason is not None:
                self.reject(ErrorCode.INVALID_SHAPE.value, reason)
                return
            envelope = Envelope(
                type="video.imu.v1",
                producer=self.producer,
                captured_at=message["timestamp"] / 1e9,
                headers={"x-device": self.device},
            )
            publish = self.link.publish_stream(
                text.encode(), envelope=envelope, exchange=self.link.topology.video_imu
            )
            await self.spawn(self.confirmed(publish, what="imu_data"))
        elif kind == "analysis_mode":
            mode = message.get("data", "none")
            if not isinstance(mode, str) or mode.lower() not in ("yolo", "none"):
                self.reject(
                    ErrorCode.INVALID_SHAPE.value, 'analysis_mode.data must be "yolo" or "none"'
                )
                return
            body = {"type": "analysis_mode", "data": mode.lower(), "device": self.device}
            publish = self.link.publish_stream(
                orjson.dumps(body),
                envelope=Envelope(type="video.analysis_mode.v1", producer=self.producer),
                exchange=self.link.topology.worldsystem("analysis_mode"),
            )
            await self.spawn(self.confirmed(publish, what="analysis_mode"))
        elif kind in UPLOADS:
            assert isinstance(message, dict)
            await self.take_upload(kind, message)
        else:
            self.reject(
                ErrorCode.INVALID_SHAPE.value,
                f"unknown message type {kind!r}: expected imu_data or analysis_mode",
            )

    async def take_upload(self, kind: str, message: dict[str, Any]) -> None:
        """A CSV file, whole or in chunks, checked here and stored by the ingestion service."""
        try:
            if kind == "file_upload_start":
                self.uploads.start(message)
                return
            if kind == "file_upload_chunk":
                self.uploads.chunk(message)
                return
            file = self.uploads.whole(message) if kind == "file_upload" else None
            file = file or self.uploads.complete(message)
            check_csv(file.content)
        except UploadRefused as refused:
            self.reject(ErrorCode.INVALID_SHAPE.value, f"{kind}: {refused.reason}")
            return
        except MediaRejected as refused:
            self.reject(refused.code, f"{kind}: {refused.reason}")
            return
        file_id = str(uuid.uuid4())
        envelope = Envelope(
            type=UPLOAD_FILE_TYPE,
            producer=self.producer,
            content_type="text/csv",
            headers={
                HEADER_KIND: FileKind.CSV.value,
                HEADER_FILE_ID: file_id,
                HEADER_FILE_NAME: file.name,
                HEADER_DEVICE: self.device,
            },
        )
        await self.spawn(self.file_confirmed(file.name, file_id, file.content, envelope))

    async def file_confirmed(
        self, name: str, file_id: str, content: bytes, envelope: Envelope
    ) -> None:
        """Publish a file durably; the phone hears `file_upload_ack` once the broker has it."""
        try:
            await self.link.publish_work(
                content, envelope=envelope, exchange=self.link.topology.ingest_uploads
            )
        except Exception as exc:  # noqa: BLE001 - any broker failure: tell the phone
            log.warning("file publish failed", device=self.device, error=repr(exc))
            self.reject(
                ErrorCode.UNAVAILABLE.value, f"{name}: not accepted, the broker is unavailable"
            )
            return
        self.gateway.metrics.published.labels(self.endpoint).inc()
        ack = {
            "type": "file_upload_ack",
            "fileName": name,
            "file_id": file_id,
            "bytes": len(content),
        }
        self.send_queue.offer(orjson.dumps(ack).decode())


@router.websocket(PHONE_ENDPOINT)
async def phone(websocket: WebSocket, gateway: GatewayDep, device: str = DEFAULT_DEVICE) -> None:
    if await admit_phone(websocket, gateway, gateway.video.phones, device):
        await PhoneSession(gateway, websocket, device).run()
