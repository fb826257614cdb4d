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

Everything else (handshake, reads, pings, close) is uvicorn's own. Under another ASGI server the
extension is absent and every message goes through ASGI.
"""

from __future__ import annotations

from collections.abc import Callable

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

# The scope's extension key; its value is {"write": WriteFrame}.
PREPARED_FRAMES = "edgeway.websocket.prepared_frames"

WriteFrame = Callable[[bytes], bool]


class PreparedFramesProtocol(WebSocketsSansIOProtocol):
    async def run_asgi(self) -> None:
        self.scope["extensions"][PREPARED_FRAMES] = {"write": self.write_frame}
        await super().run_asgi()

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
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
