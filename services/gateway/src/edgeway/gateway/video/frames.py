"""`WS /ws/video/frames`: a phone's stream as the relay's decoded JPEGs, for viewers that cannot
decode H.264 (a browser without WebCodecs). One binary message per JPEG: the latest one at once,
then each live one; text `ping` is answered `pong`, and `?timing=1` adds the capture times
(`edgeway.gateway.video.timing`).

The late joiner's picture is asked from the relay, which keeps the last JPEG of every stream it
holds, rather than kept by each gateway replica for its watchers: a replica would have nothing
for the first viewer of a device, and would have to watch every device to have it. A JPEG stands
alone, so a viewer that falls behind loses its oldest ones, never the newest.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from fastapi import APIRouter, WebSocket

from edgeway.common.logging import get_logger
from edgeway.common.topology import Channels
from edgeway.gateway.fanout import (
    ClientQueue,
    Message,
    Packet,
    Policy,
    prepared_writer,
    send_frames,
)
from edgeway.gateway.link import ServiceUnavailableError
from edgeway.gateway.state import Gateway, GatewayDep
from edgeway.gateway.video.consumers import RELAY, answer_pings, no_stream_yet
from edgeway.gateway.video.sockets import DEFAULT_DEVICE
from edgeway.gateway.video.timing import admit_viewer, timed

FRAMES_ENDPOINT = "/ws/video/frames"
# JPEGs a viewer may be behind before its oldest is dropped: 2 s at the relay's 5 a second.
FRAMES_QUEUE_SIZE = 10
# The relay's `latest_jpeg` reply: 8-byte big-endian seq and captured_ms, then the JPEG.
PICTURE_HEADER = struct.Struct(">Qq")
# Live copies of JPEGs no newer than the one a joiner got first may still be on their way (the
# reply and the broadcast take different paths) for about a request's time: dropped so long.
STALE_S = 2.0

router = APIRouter()
log = get_logger("edgeway.gateway.video")


def parse_picture(body: bytes) -> Packet | None:
    """The relay's `latest_jpeg` reply as the socket sends it; None when it has no JPEG."""
    if len(body) < PICTURE_HEADER.size:
        raise ValueError(f"a latest_jpeg reply of {len(body)} bytes has no header")
    seq, captured_ms = PICTURE_HEADER.unpack_from(body)
    data = body[PICTURE_HEADER.size :]
    if seq == 0 or not data:
        return None
    return Packet(data, kind="jpeg", seq=seq, captured_ms=captured_ms)


async def _latest(gateway: Gateway, device: str) -> Packet | None:
    """The relay's last JPEG of `device`; None when there is none or it cannot say (logged)."""
    link = gateway.link
    try:
        reply = await link.request_raw(
            service=RELAY,
            queue=link.topology.video_requests_queue,
            body={"query": "latest_jpeg", "device": device},
        )
        return parse_picture(reply)
    except (ServiceUnavailableError, ValueError) as exc:
        log.warning("no JPEG for a new viewer: it starts at the next one", reason=str(exc))
        return None


def newer_than(client: ClientQueue, seq: int) -> Callable[[Message], bool]:
    """An `admit` that drops the JPEGs numbered up to `seq` (the viewer has the latest already)
    and takes itself off at the first newer one, or after STALE_S (a restarted relay numbers
    from 1 again)."""
    until = time.monotonic() + STALE_S

    def admit(message: Message) -> bool:
        if not isinstance(message, Packet):
            return True
        if message.seq > seq or time.monotonic() > until:
            client.admit = None
            return True
        return False

    return admit


@router.websocket(FRAMES_ENDPOINT)
async def frames(
    websocket: WebSocket, gateway: GatewayDep, device: str = DEFAULT_DEVICE, timing: str = "0"
) -> None:
    timed_socket = await admit_viewer(
        websocket, gateway, endpoint=FRAMES_ENDPOINT, device=device, timing=timing
    )
    if timed_socket is None:
        return
    client = ClientQueue(
        timed(send_frames(websocket)) if timed_socket else send_frames(websocket),
        write=None if timed_socket else prepared_writer(websocket, binary=True),
        size=FRAMES_QUEUE_SIZE,
        policy=Policy.DROP_OLDEST,
        endpoint=FRAMES_ENDPOINT,
        metrics=gateway.metrics,
    )
    gateway.metrics.connections.labels(FRAMES_ENDPOINT).inc()

    async def latest_first() -> None:
        # Watching already: a JPEG published while the relay answers is queued, not lost.
        latest = await _latest(gateway, device)
        if latest is None:
            client.offer(no_stream_yet(device))
            return
        seq = latest.seq
        client.discard_queued(lambda queued: isinstance(queued, Packet) and queued.seq <= seq)
        client.push_front([latest])
        client.admit = newer_than(client, seq)

    try:
        await gateway.link.hub.serve(
            client,
            (Channels.video_frames(device),),
            catch_up=latest_first,
            read=lambda: answer_pings(websocket, client),
        )
    finally:
        gateway.metrics.connections.labels(FRAMES_ENDPOINT).dec()
