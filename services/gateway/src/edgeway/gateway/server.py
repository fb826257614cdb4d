"""The gateway's WebSocket protocol for uvicorn: its websockets-sansio one, plus prepared frames.

A broadcast goes to every watcher of its channel, and a server's frames are not masked, so the
bytes on the wire are the same for each of them. Through ASGI, every one of those sends is a
task switch and a walk down Starlette's and uvicorn's send chain that encodes the frame again:
most of what a delivery cost the gateway (`python -m bench.occupancy_fanout`). This protocol adds
one ASGI extension, `PREPARED_FRAMES`, whose `write` puts a frame serialized once by the fan-out
(`edgeway.gateway.fanout`) straight onto the connection's transport, without waiting. It refuses
(returns False) whenever it could not do so without waiting or in order: the transport is paused
by a client that does not read, or the connection is closing. The fan-out then queues the message
for the ordinary ASGI send, which waits for the transport.

It also holds less per idle connection, where tens of thousands are open at once: its receive
queue and its writable flag are lighter than uvicorn's `asyncio.Queue` and `asyncio.Event` (three
deques and an Event, ~3 KiB, for a queue that holds one message at a time), and the handshake's
request and response (~2 KiB of headers) are let go once the connection is accepted.

Everything else (handshake, reads, pings, close) is uvicorn's own. Under another ASGI server the
extension is absent and every message goes through ASGI.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn._types import ASGIReceiveEvent, ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

# The scope's extension key; its value is {"write": WriteFrame}.
PREPARED_FRAMES = "edgeway.websocket.prepared_frames"

WriteFrame = Callable[[bytes], bool]


class Flag:
    """`asyncio.Event`'s `set`, `clear`, `is_set` and `wait`, with no list of waiters until one
    waits (an Event keeps a deque, ~600 bytes, from the start)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self, *, value: bool = False) -> None:
        self._set = value
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


class ReceiveQueue:
    """What uvicorn's protocol uses of its `asyncio.Queue` (`put_nowait`, `get`, `empty`) for
    one reader, the application's `receive`. uvicorn pauses reading while a message waits, so
    it rarely holds more than one."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[ASGIReceiveEvent] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: ASGIReceiveEvent) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> ASGIReceiveEvent:
        while not self._items:
            if self._waiter is not None:
                raise RuntimeError("a WebSocket is read by one task at a time")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items


class PreparedFramesProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = ReceiveQueue()  # type: ignore[assignment]
        self.writable = Flag(value=True)  # type: ignore[assignment]

    async def run_asgi(self) -> None:
        self.scope["extensions"][PREPARED_FRAMES] = {"write": self.write_frame}
        await super().run_asgi()

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # Read only to answer the handshake; the scope has a copy of the request's headers.
            # websockets' parser keeps the request itself until the connection ends.
            self.request.headers.clear()
            del self.request, self.response
        elif message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            # A refused upgrade (401, 403) is a finished exchange. uvicorn counts it as a
            # handshake never completed and logs an error for every one: a flood of refused
            # clients would read as a flood of server faults.
            self.handshake_complete = True

    def write_frame(self, frame: bytes) -> bool:
        """Write a serialized, unmasked frame now; False when that would mean waiting or closing."""
        if (
            not self.writable.is_set()
            or self.close_sent
            or self.disconnected
            or self.conn.state is not State.OPEN
            or self.transport.is_closing()
        ):
            return False
        self.transport.write(frame)
        return True
