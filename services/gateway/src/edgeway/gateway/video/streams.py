"""`WS /ws/video`: a phone's H.264 byte stream, one WebSocket message at a time, unchanged and
numbered to the video relay, which parses it."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, WebSocket

from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.schemas.errors import ErrorCode
from edgeway.gateway.fanout import stop_tasks
from edgeway.gateway.limits import TokenBucket
from edgeway.gateway.state import Gateway, GatewayDep
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
from edgeway.gateway.video.state import VIDEO_ENDPOINT

# Lines a `/ws/video` socket's text messages may add to the log: 10 at once, then 1 a minute.
TEXT_LOG_BURST = 10
TEXT_LOG_RATE = 1 / 60

router = APIRouter()
log = get_logger("edgeway.gateway.video")


class StreamSession(PhoneSocket):
    """`/ws/video`: every binary message, unchanged, to the relay's stream queue, numbered."""

    endpoint = VIDEO_ENDPOINT

    def __init__(self, gateway: Gateway, websocket: WebSocket, device: str) -> None:
        super().__init__(gateway, websocket, device)
        self.chunk_seq = 0
        self.producer = f"phone/{device}"
        self.log_budget = TokenBucket(TEXT_LOG_RATE, TEXT_LOG_BURST)

    async def run(self) -> None:
        state = self.gateway.video
        self.gateway.metrics.connections.labels(self.endpoint).inc()
        writer = asyncio.create_task(self.send_queue.run())
        log.info("video stream connected", device=self.device, connection=self.connection_id)
        try:
            while (data := await read_message(self.websocket)) is not None:
                if isinstance(data, bytes):
                    await self.take_chunk(data)
                else:
                    self.take_text(data)
        finally:
            state.streams.leave(self.device, self.websocket)
            self.gateway.metrics.connections.labels(self.endpoint).dec()
            await self.drain()
            self.send_queue.close()
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
        message = decode_json(text, bucket=self.bucket, reject=self.reject)
        if message is REFUSED:
            return
        kind = message_type(message)
        # The seed only logs the encoder's configuration (the stream itself carries SPS and
        # PPS): a phone sends one at the start, so a few lines a minute are plenty.
        if self.log_budget.take():
            log.info("video text message", device=self.device, kind=kind, message=text[:512])


@router.websocket(VIDEO_ENDPOINT)
async def video(websocket: WebSocket, gateway: GatewayDep, device: str = DEFAULT_DEVICE) -> None:
    if await admit_phone(websocket, gateway, gateway.video.streams, device):
        await StreamSession(gateway, websocket, device).run()
