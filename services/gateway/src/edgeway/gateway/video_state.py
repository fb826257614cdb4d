"""What this gateway replica holds for video: its consumers and phones, by device."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from starlette.websockets import WebSocket

from edgeway.common.logging import get_logger

log = get_logger("edgeway.gateway.video")

# Close code for a phone's `/ws/video` socket replaced by a newer one for the same device.
CLOSE_REPLACED = 1008


class VideoState:
    def __init__(self) -> None:
        # Open `/ws/video/consume` sockets per device.
        self.consumers: Counter[str] = Counter()
        # The one `/ws/video` socket streaming for each device on this replica.
        self.streams: dict[str, WebSocket] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def consumer_counts(self) -> dict[str, int]:
        return dict(self.consumers)

    def consumer_left(self, device: str) -> None:
        self.consumers[device] -= 1
        if self.consumers[device] <= 0:
            del self.consumers[device]  # ids come and go: keep only the devices watched now

    def claim_stream(self, device: str, websocket: WebSocket) -> None:
        """Make `websocket` the device's stream; an older one is closed.

        Two sockets interleaving one device's chunks would make the relay restart its parser
        at every switch. The newest wins: a phone that reconnects after a network change is
        not locked out until its dead socket times out. The old socket is closed in the
        background: a dead peer must not hold up the new connection.
        """
        previous = self.streams.get(device)
        self.streams[device] = websocket
        if previous is not None and previous is not websocket:
            log.info("video stream replaced by a newer connection", device=device)
            task = asyncio.create_task(_close_replaced(previous, device))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def release_stream(self, device: str, websocket: WebSocket) -> None:
        if self.streams.get(device) is websocket:
            del self.streams[device]


async def _close_replaced(websocket: WebSocket, device: str) -> None:
    with contextlib.suppress(Exception):  # it may be gone already
        await websocket.close(
            CLOSE_REPLACED, f"replaced by a newer /ws/video connection for {device}"
        )
