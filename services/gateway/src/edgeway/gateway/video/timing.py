"""Opt-in timing messages of the video sockets (`?timing=1`): before each binary message, a text
`{"type":"timing","seq","kind","captured_ms"}` with the capture time the relay gave it.

Added where the message is sent, not where it is queued: the queue's policies (skip to the next
keyframe, drop the oldest JPEG) see the same messages as without timing, and a timing message
is always right before its own binary one. A socket without `timing=1` is sent exactly what it
was sent before timing existed.
"""

from __future__ import annotations

import orjson
from fastapi import WebSocket

from edgeway.common.schemas.errors import ErrorCode
from edgeway.gateway.auth import Scope
from edgeway.gateway.fanout import Message, Packet, Send
from edgeway.gateway.state import Gateway, admit_websocket
from edgeway.gateway.video.sockets import admit_device, error_frame

# `?timing=`: off (the default, what old consumers get) or on.
TIMING_VALUES = {"0": False, "1": True}


async def admit_timing(websocket: WebSocket, timing: str) -> bool | None:
    """After accept: whether `?timing=` asks for timing messages; None once a bad value got an
    error frame and the socket was closed (1008)."""
    wanted = TIMING_VALUES.get(timing)
    if wanted is None:
        reason = f"?timing= must be 0 or 1, not {timing[:16]!r}"
        await websocket.send_text(error_frame(ErrorCode.INVALID_SHAPE.value, reason))
        await websocket.close(1008, "?timing= must be 0 or 1")
    return wanted


async def admit_viewer(
    websocket: WebSocket, gateway: Gateway, *, endpoint: str, device: str, timing: str
) -> bool | None:
    """A video viewer's admission (its token's `video:subscribe`, the device, `?timing=`):
    whether it wants timing messages; None once it was refused (answered and closed)."""
    if not await admit_websocket(
        websocket, gateway, scope=Scope.VIDEO_SUBSCRIBE, endpoint=endpoint
    ):
        return None
    if not await admit_device(websocket, device):
        return None
    return await admit_timing(websocket, timing)


def timing_message(seq: int, packet: Packet) -> str:
    """The text before the `seq`-th binary message of a socket (from 1): its kind and when the
    phone captured it (Unix ms; null when the relay could not say)."""
    return orjson.dumps(
        {
            "type": "timing",
            "seq": seq,
            "kind": packet.kind,
            "captured_ms": packet.captured_ms or None,
        }
    ).decode()


def timed(send: Send) -> Send:
    """`send` (`send_frames`), with a timing message before each packet or JPEG."""
    count = 0

    async def send_timed(message: Message) -> None:
        nonlocal count
        if isinstance(message, Packet):
            count += 1
            await send(timing_message(count, message))
        await send(message)

    return send_timed
