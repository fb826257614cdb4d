"""`WS /ws/video/consume`: the relay's GOP for a late joiner, then live packets, as the seed's
binary frames; a consumer that falls behind skips to the next keyframe. With `?timing=1`, each
packet follows a text message with its capture time (`edgeway.gateway.video.timing`)."""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, WebSocket

from edgeway.common.logging import get_logger
from edgeway.common.topology import Channels
from edgeway.common.video.packets import PacketParser, PacketType
from edgeway.gateway.fanout import (
    ClientQueue,
    Packet,
    VideoQueue,
    prepared_writer,
    send_frames,
)
from edgeway.gateway.link import ServiceUnavailableError
from edgeway.gateway.state import Gateway, GatewayDep
from edgeway.gateway.video.sockets import DEFAULT_DEVICE, read_message
from edgeway.gateway.video.timing import admit_viewer, timed

CONSUME_ENDPOINT = "/ws/video/consume"
RELAY = "video-relay"
GOP_SEQ_BYTES = 8  # the big-endian last_seq before the packets of a GOP reply
PACKET_KINDS = {
    PacketType.SPS: "sps",
    PacketType.PPS: "pps",
    PacketType.KEYFRAME: "keyframe",
    PacketType.FRAME: "frame",
}

router = APIRouter()
log = get_logger("edgeway.gateway.video")


def parse_gop(body: bytes, *, offset_us: int | None = None) -> tuple[list[Packet], int]:
    """The relay's GOP reply: its packets, as the socket sends them, and its last_seq. With
    the relay's `offset_us` (its `clock` answer) each packet gets its capture time too."""
    if len(body) < GOP_SEQ_BYTES:
        raise ValueError(f"a GOP reply of {len(body)} bytes has no last_seq")
    last_seq = int.from_bytes(body[:GOP_SEQ_BYTES], "big")
    parser = PacketParser()
    packets = [
        Packet(
            packet.payload,
            kind=PACKET_KINDS[packet.type],
            captured_ms=0 if offset_us is None else (packet.timestamp_us + offset_us) // 1000,
        )
        for packet in parser.feed(body[GOP_SEQ_BYTES:])
        if packet.type in PACKET_KINDS
    ]
    if parser.corrupt or parser.buffered:
        raise ValueError("the GOP reply holds a corrupt or incomplete packet")
    return packets, last_seq


async def _clock_offset(gateway: Gateway, device: str) -> int | None:
    """What the relay adds to `device`'s packet times for Unix µs (None: it cannot say)."""
    link = gateway.link
    try:
        answer = await link.request(
            service=RELAY,
            queue=link.topology.video_requests_queue,
            body={"query": "clock", "device": device},
        )
    except (ServiceUnavailableError, ValueError) as exc:
        log.warning("no clock offset: the GOP goes without capture times", reason=str(exc))
        return None
    offset = answer.get("offset_us") if isinstance(answer, dict) else None
    return offset if isinstance(offset, int) and not isinstance(offset, bool) else None


async def _gop(gateway: Gateway, device: str, *, timing: bool) -> tuple[list[Packet], int]:
    """The relay's GOP for `device` (with capture times for a `timing` consumer); empty when
    it cannot give one (logged)."""
    link = gateway.link
    try:
        asked = link.request_raw(
            service=RELAY,
            queue=link.topology.video_requests_queue,
            body={"query": "gop", "device": device},
        )
        if not timing:
            return parse_gop(await asked)
        reply, offset_us = await asyncio.gather(asked, _clock_offset(gateway, device))
        return parse_gop(reply, offset_us=offset_us)
    except (ServiceUnavailableError, ValueError) as exc:
        log.warning(
            "no GOP for a new consumer: it starts at the next keyframe",
            device=device,
            reason=str(exc),
        )
        return [], 0


@router.websocket(CONSUME_ENDPOINT)
async def consume(
    websocket: WebSocket, gateway: GatewayDep, device: str = DEFAULT_DEVICE, timing: str = "0"
) -> None:
    timed_socket = await admit_viewer(
        websocket, gateway, endpoint=CONSUME_ENDPOINT, device=device, timing=timing
    )
    if timed_socket is None:
        return
    hub, state = gateway.link.hub, gateway.video
    # A timing consumer's messages all go through its writer, which adds the timing text.
    client = VideoQueue(
        timed(send_frames(websocket)) if timed_socket else send_frames(websocket),
        write=None if timed_socket else prepared_writer(websocket, binary=True),
        size=gateway.settings.video_queue_size,
        endpoint=CONSUME_ENDPOINT,
        metrics=gateway.metrics,
    )
    state.consumers[device] += 1
    gateway.metrics.connections.labels(CONSUME_ENDPOINT).inc()

    async def gop_first() -> None:
        # What the GOP already holds is dropped from the live packets by sequence number.
        gop, last_seq = await _gop(gateway, device, timing=timed_socket)
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
            read=lambda: answer_pings(websocket, client),
        )
    finally:
        state.consumer_left(device)
        gateway.metrics.connections.labels(CONSUME_ENDPOINT).dec()


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


async def answer_pings(websocket: WebSocket, client: ClientQueue) -> None:
    """The seed's keepalive: text "ping" gets "pong" (through the queue, in order)."""
    while (data := await read_message(websocket)) is not None:
        if data == "ping":
            client.offer("pong")
