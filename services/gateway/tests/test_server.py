"""Prepared frames: the gateway's uvicorn protocol and the fan-out, with real sockets.

A small Starlette app serves `ClientQueue`s behind uvicorn with `PreparedFramesProtocol` on a
loopback port, in the test's event loop; real `websockets` clients read what the fan-out sends.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
import uvicorn
import websockets
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from edgeway.common.testing import free_port
from edgeway.gateway.fanout import (
    ClientQueue,
    Hub,
    Packet,
    Policy,
    VideoQueue,
    prepared_writer,
    read_until_gone,
    send_frames,
)
from edgeway.gateway.metrics import Metrics
from edgeway.gateway.server import PREPARED_FRAMES, PreparedFramesProtocol

QUEUE_SIZE = 16

# The metrics these tests read, on a registry of their own.
METRICS = Metrics.create(CollectorRegistry())


class App:
    """Clients on `/text` get text frames on channel `c`; on `/video`, also packets on `v`."""

    def __init__(self) -> None:
        self.hub = Hub(bind=self._nothing, unbind=self._nothing, metrics=METRICS)
        self.extensions: list[bool] = []
        self.app = Starlette(
            routes=[WebSocketRoute("/text", self.text), WebSocketRoute("/video", self.video)]
        )

    @staticmethod
    async def _nothing(pattern: str) -> None:
        return None

    async def _serve(
        self, websocket: WebSocket, client: ClientQueue, channels: tuple[str, ...] = ("c",)
    ) -> None:
        self.extensions.append(PREPARED_FRAMES in websocket.scope["extensions"])

        async def nothing_to_catch_up() -> None:
            return None

        await self.hub.serve(
            client, channels, catch_up=nothing_to_catch_up, read=lambda: read_until_gone(websocket)
        )

    async def text(self, websocket: WebSocket) -> None:
        await websocket.accept()
        client = ClientQueue.text(
            websocket,
            size=QUEUE_SIZE,
            policy=Policy.DROP_OLDEST,
            endpoint="t-server",
            metrics=METRICS,
        )
        await self._serve(websocket, client)

    async def video(self, websocket: WebSocket) -> None:
        await websocket.accept()
        client = VideoQueue(
            send_frames(websocket),
            write=prepared_writer(websocket, binary=True),
            size=QUEUE_SIZE,
            endpoint="t-server-video",
            metrics=METRICS,
        )
        await self._serve(websocket, client, ("c", "v"))


@pytest.fixture
async def served() -> AsyncIterator[tuple[App, str]]:
    app = App()
    port = free_port()
    config = uvicorn.Config(
        app.app,
        host="127.0.0.1",
        port=port,
        ws=PreparedFramesProtocol,
        ws_per_message_deflate=False,
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(1000):
        if server.started:
            break
        await asyncio.sleep(0.01)
    yield app, f"ws://127.0.0.1:{port}"
    server.should_exit = True
    await asyncio.wait_for(task, 10)


async def watchers(app: App, count: int) -> None:
    for _ in range(500):
        if app.hub.watchers("c") == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{app.hub.watchers('c')} watchers, not {count}")


async def test_every_client_gets_the_prepared_frame_as_a_websocket_message(
    served: tuple[App, str],
) -> None:
    app, url = served
    async with (
        websockets.connect(url + "/text", compression=None) as a,
        websockets.connect(url + "/text", compression=None) as b,
        websockets.connect(url + "/video", compression=None) as video,
    ):
        await watchers(app, 3)
        assert app.extensions == [True, True, True]
        text = '{"location_name":"Café","people_detected":3}'  # not ASCII: encoded as UTF-8
        assert app.hub.deliver("c", text, kind="t") == 3
        # 126 and 70 000 bytes take the 16- and 64-bit length forms of the frame header.
        for size in (125, 126, 70_000):
            app.hub.deliver("c", "x" * size, kind="t")
        app.hub.deliver("v", Packet(b"\x00\x00\x00\x01\x65" * 10, kind="keyframe"), kind="v")
        for ws in (a, b):
            received = [await asyncio.wait_for(ws.recv(), 5) for _ in range(4)]
            assert received == [text, "x" * 125, "x" * 126, "x" * 70_000]
        received = [await asyncio.wait_for(video.recv(), 5) for _ in range(5)]
        assert received[:4] == [text, "x" * 125, "x" * 126, "x" * 70_000]
        assert received[4] == b"\x00\x00\x00\x01\x65" * 10


async def test_a_client_that_stops_reading_is_queued_for_and_nobody_else_waits(
    served: tuple[App, str],
) -> None:
    """Its transport pauses; its messages go to its queue, which drops the oldest; the others
    are still written at once; when it reads again it gets the newest, in order."""
    app, url = served
    stalled_socket = socket.socket()
    stalled_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    stalled_socket.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    before = METRICS.dropped.labels("t-server", "slow_client")._value.get()
    async with (
        websockets.connect(url + "/text", compression=None) as steady,
        websockets.connect(
            url + "/text", sock=stalled_socket, compression=None, max_queue=1
        ) as stalled,
    ):
        await watchers(app, 2)
        count, payload = 2000, "y" * 4000  # 8 MB: more than the sockets between them hold
        received: list[str] = []
        progress = asyncio.Condition()

        async def read_steady() -> None:
            while len(received) < count:
                received.append(str(await asyncio.wait_for(steady.recv(), 5)))
                async with progress:
                    progress.notify_all()

        reading = asyncio.create_task(read_steady())
        for i in range(count):
            app.hub.deliver("c", f"{i:05d}{payload}", kind="t")
            if i % 10 == 9:  # a reader that keeps up: never more than 10 messages behind
                async with progress:
                    await asyncio.wait_for(progress.wait_for(lambda i=i: len(received) > i), 10)
        await reading
        assert [int(m[:5]) for m in received] == list(range(count))
        dropped = METRICS.dropped.labels("t-server", "slow_client")._value.get() - before
        assert dropped > 0  # it fell a whole queue behind
        late: list[int] = []
        while not late or late[-1] != count - 1:
            late.append(int(str(await asyncio.wait_for(stalled.recv(), 5))[:5]))
        assert late == sorted(late)  # whatever it got, in order, up to the newest
        assert len(late) + dropped == count
