"""WorldSystem compatibility (docs/seed-systems.md §3): phones in, video consumers and viewers out.

- `WS /ws/phone`: JPEG frames (8-byte big-endian ns timestamp + JPEG) to `video_frames_exchange`
  with the seed's headers, `imu_data` to the video relay, `analysis_mode` to
  `analysis_mode_exchange`; viewer commands for this phone come back down the same socket.
- `WS /ws/video`: the phone's H.264 byte stream, one WebSocket message at a time, unchanged to
  the video relay, which parses it.
- `WS /ws/video/consume`: the relay's GOP for a late joiner, then live packets, as the seed's
  binary frames; a consumer that falls behind skips to the next keyframe.
- `WS /ws/viewer`: trajectory updates, restarts and IMU out; commands to phones in.
- `GET /health/video`, `GET /video/status`, `GET /h264/test`, `POST /api/restart`.

Several phones at once: each names itself with `?device=<id>` (default "phone", the seed's one
phone). Whatever a phone sends that cannot be taken gets an error frame; the socket stays open.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse, Response

from edgeway.common.envelope import Envelope
from edgeway.common.errors import ErrorObject, error_response, error_responses
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
from edgeway.common.video import check_device
from edgeway.common.video.packets import PacketParser, PacketType
from edgeway.gateway.auth import Principal, Scope
from edgeway.gateway.fanout import (
    ClientQueue,
    Packet,
    Policy,
    VideoQueue,
    prepared_writer,
    send_frames,
    stop_tasks,
)
from edgeway.gateway.jpeg import JpegError, jpeg_size
from edgeway.gateway.limits import TokenBucket
from edgeway.gateway.link import ServiceUnavailableError
from edgeway.gateway.metrics import CONNECTIONS, PUBLISHED, REJECTED
from edgeway.gateway.phone_files import PhoneUploads, UploadRefused
from edgeway.gateway.producers import ProducerSeats, SeatRefused
from edgeway.gateway.state import Gateway, GatewayDep, admit_websocket, require
from edgeway.gateway.video_state import PHONE_ENDPOINT, VIDEO_ENDPOINT

CONSUME_ENDPOINT = "/ws/video/consume"
VIEWER_ENDPOINT = "/ws/viewer"
RELAY = "video-relay"
OCTET_STREAM = "application/octet-stream"  # the seed's content type for JPEG frames
DEFAULT_DEVICE = "phone"
TIMESTAMP_BYTES = 8  # the big-endian ns timestamp before a phone's JPEG
GOP_SEQ_BYTES = 8  # the big-endian last_seq before the packets of a GOP reply
# Viewer commands the seed relays verbatim to phones.
COMMANDS = frozenset({"joystick", "movement", "rotation", "camera", "flightmode"})
UPLOADS = frozenset(
    {"file_upload", "file_upload_start", "file_upload_chunk", "file_upload_complete"}
)
PACKET_KINDS = {
    PacketType.SPS: "sps",
    PacketType.PPS: "pps",
    PacketType.KEYFRAME: "keyframe",
    PacketType.FRAME: "frame",
}
# Room for the JSON around a whole `file_upload`'s text.
UPLOAD_OVERHEAD = 4096
# Lines a `/ws/video` socket's text messages may add to the log: 10 at once, then 1 a minute.
TEXT_LOG_BURST = 10
TEXT_LOG_RATE = 1 / 60
# Commands and error frames waiting for a phone or viewer that does not read; older ones go.
OUTBOX_SIZE = 256

# ErrorObject codes of the video endpoints beyond the shared ErrorCode set; same frame shape.
INVALID_JPEG = "invalid_jpeg"

router = APIRouter()
log = get_logger("edgeway.gateway.video")


def error_frame(code: str, reason: str) -> str:
    """The error object (`edgeway.common.errors`) as WebSocket text."""
    return orjson.dumps(ErrorObject(code=code, reason=reason).body()).decode()


def message_type(message: Any) -> str | None:
    """A JSON message's `type`, or None where it has none that is text (`{"type": {}}` too:
    an object would break the membership tests that route it)."""
    kind = message.get("type") if isinstance(message, dict) else None
    return kind if isinstance(kind, str) else None


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


def parse_gop(body: bytes) -> tuple[list[Packet], int]:
    """The relay's GOP reply: its packets, as the socket sends them, and its last_seq."""
    if len(body) < GOP_SEQ_BYTES:
        raise ValueError(f"a GOP reply of {len(body)} bytes has no last_seq")
    last_seq = int.from_bytes(body[:GOP_SEQ_BYTES], "big")
    parser = PacketParser()
    packets = [
        Packet(packet.payload, kind=PACKET_KINDS[packet.type])
        for packet in parser.feed(body[GOP_SEQ_BYTES:])
        if packet.type in PACKET_KINDS
    ]
    if parser.corrupt or parser.buffered:
        raise ValueError("the GOP reply holds a corrupt or incomplete packet")
    return packets, last_seq


async def _read(websocket: WebSocket) -> str | bytes | None:
    """The next message's text or bytes; None once the client has left."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        return None
    text: str | None = message.get("text")
    if text is not None:
        return text
    data: bytes = message.get("bytes") or b""
    return data


async def _admit_device(websocket: WebSocket, device: str) -> bool:
    """After accept: a bad `?device=` gets an error frame and the socket is closed (1008)."""
    reason = check_device(device)
    if reason is None:
        return True
    await websocket.send_text(error_frame(ErrorCode.INVALID_SHAPE.value, reason))
    await websocket.close(1008, "a valid ?device= is required")
    return False


async def _seat_phone(
    websocket: WebSocket, seats: ProducerSeats, device: str, principal: Principal
) -> bool:
    """After accept: the device's producer seat, or an error frame and a close (1008) saying why
    (a token bound to another device; the device connected already, for an unbound caller)."""
    if not await _admit_device(websocket, device):
        return False
    try:
        seats.take(device, websocket, principal)
    except SeatRefused as refused:
        REJECTED.labels(seats.endpoint, refused.code.value).inc()
        log.info("phone refused", endpoint=seats.endpoint, device=device, reason=refused.reason)
        await websocket.send_text(error_frame(refused.code.value, refused.reason))
        await websocket.close(1008, refused.code)
        return False
    return True


# --- phones ---------------------------------------------------------------------------------


class PhoneLink:
    """What a phone connection shares: its outbox, rate limit and publish window."""

    endpoint: str

    def __init__(self, gateway: Gateway, websocket: WebSocket, device: str) -> None:
        settings = gateway.settings
        self.gateway = gateway
        self.link = gateway.link
        self.websocket = websocket
        self.device = device
        self.connection_id = uuid.uuid4().hex[:12]
        self.outbox = ClientQueue.text(
            websocket,
            size=OUTBOX_SIZE,
            policy=Policy.DROP_OLDEST,
            endpoint=self.endpoint,
        )
        self.bucket = TokenBucket(settings.producer_rate, settings.producer_burst)
        # Up to this many publishes unconfirmed at once, started in arrival order.
        self.window = asyncio.Semaphore(settings.publish_window)
        self.in_flight: set[asyncio.Task[None]] = set()

    def reject(self, code: str, reason: str) -> None:
        REJECTED.labels(self.endpoint, code).inc()
        self.outbox.offer(error_frame(code, reason))

    async def spawn(self, publish: Coroutine[Any, Any, None]) -> None:
        await self.window.acquire()
        task = asyncio.create_task(publish)
        self.in_flight.add(task)
        task.add_done_callback(self._published)

    def _published(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        self.window.release()

    async def confirmed(self, publish: Coroutine[Any, Any, None], *, what: str) -> None:
        """Run one publish; tell the phone if the broker did not take it."""
        try:
            await publish
        except Exception as exc:  # noqa: BLE001 - any broker failure: tell the phone
            log.warning(
                "publish failed", endpoint=self.endpoint, device=self.device, error=repr(exc)
            )
            self.reject(
                ErrorCode.UNAVAILABLE.value, f"{what} not accepted: the broker is unavailable"
            )
            return
        PUBLISHED.labels(self.endpoint).inc()

    async def drain(self) -> None:
        """What was received is published even if the phone left meanwhile."""
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=self.gateway.settings.graceful_timeout)


class PhoneSession(PhoneLink):
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
        CONNECTIONS.labels(self.endpoint).inc()
        writer = asyncio.create_task(self.outbox.run())
        log.info("phone connected", device=self.device, connection=self.connection_id)
        try:
            for channel in self.channels:
                await hub.subscribe(channel, self.outbox)
            while (data := await _read(self.websocket)) is not None:
                if isinstance(data, bytes):
                    await self.take_frame(data)
                else:
                    await self.take_text(data)
        finally:
            self.gateway.video.phones.leave(self.device, self.websocket)
            CONNECTIONS.labels(self.endpoint).dec()
            self.uploads.close()
            await self.drain()
            for channel in self.channels:
                await hub.unsubscribe(channel, self.outbox)
            self.outbox.close()
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
        if not self.bucket.take():
            self.reject(ErrorCode.RATE_LIMITED.value, "too many messages")
            return
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.reject(ErrorCode.MALFORMED_JSON.value, "the message is not valid JSON")
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
        PUBLISHED.labels(self.endpoint).inc()
        ack = {
            "type": "file_upload_ack",
            "fileName": name,
            "file_id": file_id,
            "bytes": len(content),
        }
        self.outbox.offer(orjson.dumps(ack).decode())


class StreamSession(PhoneLink):
    """`/ws/video`: every binary message, unchanged, to the relay's stream queue, numbered."""

    endpoint = VIDEO_ENDPOINT

    def __init__(self, gateway: Gateway, websocket: WebSocket, device: str) -> None:
        super().__init__(gateway, websocket, device)
        self.chunk_seq = 0
        self.producer = f"phone/{device}"
        self.log_budget = TokenBucket(TEXT_LOG_RATE, TEXT_LOG_BURST)

    async def run(self) -> None:
        state = self.gateway.video
        CONNECTIONS.labels(self.endpoint).inc()
        writer = asyncio.create_task(self.outbox.run())
        log.info("video stream connected", device=self.device, connection=self.connection_id)
        try:
            while (data := await _read(self.websocket)) is not None:
                if isinstance(data, bytes):
                    await self.take_chunk(data)
                else:
                    self.take_text(data)
        finally:
            state.streams.leave(self.device, self.websocket)
            CONNECTIONS.labels(self.endpoint).dec()
            await self.drain()
            self.outbox.close()
            await stop_tasks(writer)
            log.info(
                "video stream disconnected",
                device=self.device,
                connection=self.connection_id,
                chunks=self.chunk_seq,
            )

    async def take_chunk(self, data: bytes) -> None:
        # Every chunk received takes a number, published or not: the relay sees a gap where one
        # was refused and restarts its parser there instead of splicing unrelated bytes.
        self.chunk_seq += 1
        limit = self.gateway.settings.max_video_message_bytes
        if len(data) > limit:
            self.reject(
                ErrorCode.TOO_LARGE.value, f"message is {len(data)} bytes; the limit is {limit}"
            )
            return
        if not self.bucket.take():
            self.reject(ErrorCode.RATE_LIMITED.value, "too many messages")
            return
        if not self.gateway.video.streams.holds(self.device, self.websocket):
            return  # replaced by a newer connection for this device: it owns the stream now
        envelope = Envelope(
            type="video.chunk.v1",
            producer=self.producer,
            content_type=OCTET_STREAM,
            headers={
                "x-device": self.device,
                "x-connection": self.connection_id,
                "x-chunk-seq": str(self.chunk_seq),
            },
        )
        exchange = self.link.topology.worldsystem("video_stream")
        await self.spawn(
            self.confirmed(
                self.link.publish_stream(data, envelope=envelope, exchange=exchange), what="chunk"
            )
        )

    def take_text(self, text: str) -> None:
        limit = self.gateway.settings.max_message_bytes
        if len(text) > limit:
            self.reject(ErrorCode.TOO_LARGE.value, f"text messages are limited to {limit} bytes")
            return
        if not self.bucket.take():
            self.reject(ErrorCode.RATE_LIMITED.value, "too many messages")
            return
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.reject(ErrorCode.MALFORMED_JSON.value, "the message is not valid JSON")
            return
        kind = message_type(message)
        # The seed only logs the encoder's configuration (the stream itself carries SPS and
        # PPS): a phone sends one at the start, so a few lines a minute are plenty.
        if self.log_budget.take():
            log.info("video text message", device=self.device, kind=kind, message=text[:512])


@router.websocket(PHONE_ENDPOINT)
async def phone(websocket: WebSocket, gateway: GatewayDep, device: str = DEFAULT_DEVICE) -> None:
    principal = await admit_websocket(
        websocket, gateway, scope=Scope.VIDEO_PUBLISH, endpoint=PHONE_ENDPOINT
    )
    if principal is not None:
        await websocket.accept()
        if await _seat_phone(websocket, gateway.video.phones, device, principal):
            await PhoneSession(gateway, websocket, device).run()


@router.websocket(VIDEO_ENDPOINT)
async def video(websocket: WebSocket, gateway: GatewayDep, device: str = DEFAULT_DEVICE) -> None:
    principal = await admit_websocket(
        websocket, gateway, scope=Scope.VIDEO_PUBLISH, endpoint=VIDEO_ENDPOINT
    )
    if principal is not None:
        await websocket.accept()
        if await _seat_phone(websocket, gateway.video.streams, device, principal):
            await StreamSession(gateway, websocket, device).run()


# --- consumers ------------------------------------------------------------------------------


async def _gop(gateway: Gateway, device: str) -> tuple[list[Packet], int]:
    """The relay's GOP for `device`; empty when it cannot give one (logged)."""
    link = gateway.link
    try:
        reply = await link.request_raw(
            service=RELAY,
            queue=link.topology.video_requests_queue,
            body={"query": "gop", "device": device},
        )
        return parse_gop(reply)
    except (ServiceUnavailableError, ValueError) as exc:
        log.warning(
            "no GOP for a new consumer: it starts at the next keyframe",
            device=device,
            reason=str(exc),
        )
        return [], 0


@router.websocket(CONSUME_ENDPOINT)
async def consume(websocket: WebSocket, gateway: GatewayDep, device: str = DEFAULT_DEVICE) -> None:
    if not await admit_websocket(
        websocket, gateway, scope=Scope.VIDEO_SUBSCRIBE, endpoint=CONSUME_ENDPOINT
    ):
        return
    await websocket.accept()
    if not await _admit_device(websocket, device):
        return
    hub, state = gateway.link.hub, gateway.video
    client = VideoQueue(
        send_frames(websocket),
        write=prepared_writer(websocket, binary=True),
        size=gateway.settings.video_queue_size,
        endpoint=CONSUME_ENDPOINT,
    )
    state.consumers[device] += 1
    CONNECTIONS.labels(CONSUME_ENDPOINT).inc()

    async def gop_first() -> None:
        # What the GOP already holds is dropped from the live packets by sequence number.
        gop, last_seq = await _gop(gateway, device)
        if not gop:
            # Not silence: the consumer hears why nothing comes (a device id with a typo, or
            # a phone not connected yet); packets follow on their own once a stream starts.
            client.offer(no_stream_yet(device))
        client.start(gop, last_seq)

    try:
        await hub.serve(
            client,
            (Channels.video_stream(device),),
            catch_up=gop_first,
            read=lambda: _answer_pings(websocket, client),
        )
    finally:
        state.consumer_left(device)
        CONNECTIONS.labels(CONSUME_ENDPOINT).dec()


def no_stream_yet(device: str) -> str:
    """The one text message a consumer gets besides "pong": its device has no stream yet."""
    return orjson.dumps(
        {
            "type": "status",
            "code": "no_stream",
            "reason": f"no stream for device {device} yet; it starts when the phone streams",
            "device": device,
        }
    ).decode()


async def _answer_pings(websocket: WebSocket, client: ClientQueue) -> None:
    """The seed's keepalive: text "ping" gets "pong" (through the queue, in order)."""
    while (data := await _read(websocket)) is not None:
        if data == "ping":
            client.offer("pong")


# --- viewers --------------------------------------------------------------------------------


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
        self.outbox = ClientQueue.text(
            websocket,
            size=gateway.settings.client_queue_size,
            policy=Policy.DROP_OLDEST,  # IMU and poses: a viewer far behind wants fresh ones
            endpoint=VIEWER_ENDPOINT,
        )
        self.channels = (Channels.VIDEO_VIEWER, Channels.video_imu("*"))

    def reject(self, code: str, reason: str) -> None:
        REJECTED.labels(VIEWER_ENDPOINT, code).inc()
        self.outbox.offer(error_frame(code, reason))

    async def run(self) -> None:
        hub = self.link.hub
        CONNECTIONS.labels(VIEWER_ENDPOINT).inc()
        writer = asyncio.create_task(self.outbox.run())
        try:
            for channel in self.channels:
                await hub.subscribe(channel, self.outbox)
            while (data := await _read(self.websocket)) is not None:
                await self.take(data)
        finally:
            CONNECTIONS.labels(VIEWER_ENDPOINT).dec()
            for channel in self.channels:
                await hub.unsubscribe(channel, self.outbox)
            self.outbox.close()
            await stop_tasks(writer)

    async def take(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            self.reject(ErrorCode.INVALID_SHAPE.value, "viewers send JSON text messages")
            return
        if len(data) > self.gateway.settings.max_message_bytes:
            self.reject(ErrorCode.TOO_LARGE.value, "the message is too large")
            return
        if not self.bucket.take():
            self.reject(ErrorCode.RATE_LIMITED.value, "too many commands")
            return
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.reject(ErrorCode.MALFORMED_JSON.value, "the message is not valid JSON")
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
        await websocket.accept()
        await ViewerSession(gateway, websocket, principal).run()


# --- HTTP -----------------------------------------------------------------------------------


async def _relay_status(gateway: Gateway) -> dict[str, Any]:
    link = gateway.link
    answer = await link.request(
        service=RELAY, queue=link.topology.video_requests_queue, body={"query": "status"}
    )
    if not isinstance(answer, dict) or not isinstance(answer.get("streams"), dict):
        raise ServiceUnavailableError(f"{RELAY} answered {answer!r}")
    return answer


@router.get(
    "/health/video",
    summary="Video health (WorldSystem's fields)",
    dependencies=[require(Scope.VIDEO_SUBSCRIBE, "/health/video")],
)
async def health_video(gateway: GatewayDep) -> dict[str, Any]:
    """The seed's fields; `has_sps_pps` is false while the relay does not answer."""
    streams: dict[str, Any] = {}
    try:
        streams = (await _relay_status(gateway))["streams"]
    except ServiceUnavailableError as exc:
        log.warning("video relay status unavailable", reason=str(exc))
    has_sps_pps = any(bool(s.get("has_sps_pps")) for s in streams.values())
    # A URL that plays: the seed had one phone, named nothing; here each names itself, so
    # point at a device that streams now (the first, by name), or the seed's default.
    playing = sorted(d for d, s in streams.items() if s.get("has_sps_pps")) or sorted(streams)
    device = playing[0] if playing else DEFAULT_DEVICE
    return {
        "active_consumers": sum(gateway.video.consumer_counts().values()),
        "has_sps_pps": has_sps_pps,
        "video_url": f"{CONSUME_ENDPOINT}?device={device}",
        "devices": sorted(streams),
    }


@router.get(
    "/video/status",
    summary="Video streams and consumers",
    responses=error_responses(504),
    dependencies=[require(Scope.VIDEO_SUBSCRIBE, "/video/status")],
)
async def video_status(gateway: GatewayDep) -> dict[str, Any]:
    """The relay's streams (504 if it does not answer) and this replica's consumers."""
    return {**await _relay_status(gateway), "consumers": gateway.video.consumer_counts()}


@router.get(
    "/h264/test",
    summary="Whether the relay decodes H.264",
    responses=error_responses(504),
    dependencies=[require(Scope.VIDEO_SUBSCRIBE, "/h264/test")],
)
async def h264_test(gateway: GatewayDep) -> dict[str, Any]:
    """Whether the relay can decode H.264 (it holds the decoder, not the gateway)."""
    answer = await _relay_status(gateway)
    return {"h264_decoder": bool(answer.get("h264_decoder")), "pyav": answer.get("pyav")}


@router.post(
    "/api/restart",
    status_code=202,
    summary="Restart the video pipeline",
    responses=error_responses(503),
)
async def restart(
    gateway: GatewayDep,
    principal: Annotated[Principal, require(Scope.VIDEO_CONTROL, "/api/restart")],
) -> Response:
    """`{"type":"restart"}` to restart_exchange; the relay tells the viewers."""
    envelope = Envelope(type="video.restart.v1", producer=f"operator/{principal.subject}")
    try:
        await gateway.link.publish_stream(
            b'{"type":"restart"}',
            envelope=envelope,
            exchange=gateway.link.topology.worldsystem("restart"),
        )
    except Exception as exc:  # noqa: BLE001 - tell the operator, who can try again
        log.warning("restart not published", error=repr(exc))
        return error_response(
            503, ErrorCode.UNAVAILABLE, "the broker did not take it", fix="try again"
        )
    return JSONResponse({"status": "accepted", "message_id": envelope.message_id}, 202)
