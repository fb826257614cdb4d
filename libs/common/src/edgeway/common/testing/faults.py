"""A TCP fault proxy for reliability tests: a service talks to RabbitMQ or PostgreSQL through it,
and the test cuts, refuses or delays that link while everything else keeps running.

It runs its own event loop in a thread, so a synchronous test, an async one and the service
processes under test (which only see a port) all use it the same way:

    with FaultProxy(upstream=("127.0.0.1", 5672)) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"   # give the service this
        proxy.cut()       # drop every open connection and refuse new ones
        proxy.restore()   # accept and forward again
        proxy.delay(0.5)  # every chunk, each way, waits this long first
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from enum import StrEnum
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

CHUNK = 64 * 1024


class Mode(StrEnum):
    FORWARD = "forward"  # what the upstream sends, both ways
    REFUSE = "refuse"  # a new connection is closed at once (open ones stay)
    CUT = "cut"  # every open connection dropped, new ones closed at once


class FaultProxy:
    def __init__(self, *, upstream: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.host = host
        self.port = 0
        self.mode = Mode.FORWARD
        self.latency = 0.0
        self.accepted = 0  # connections taken, whatever happened to them
        self._links: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    # --- life ---------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._serve, self.host, 0))
        sockets: tuple[socket.socket, ...] = tuple(self._server.sockets)
        self.port = sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    # --- faults -------------------------------------------------------------------------

    def cut(self) -> None:
        """Drop every open connection (the peers see a reset) and refuse new ones."""
        self.mode = Mode.CUT
        self._call(self._drop_all())

    def refuse(self) -> None:
        """Close new connections at once; open ones keep working."""
        self.mode = Mode.REFUSE

    def restore(self) -> None:
        self.mode = Mode.FORWARD
        self.latency = 0.0

    def delay(self, seconds: float) -> None:
        self.latency = seconds

    @property
    def open_links(self) -> int:
        return len(self._links) // 2

    # --- inside the proxy's loop --------------------------------------------------------

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _close(self) -> None:
        # In the proxy's own loop: closing its server from another thread races the loop.
        if self._server is not None:
            self._server.close()
        await self._drop_all()

    async def _drop_all(self) -> None:
        for writer in list(self._links):
            transport = writer.transport
            with contextlib.suppress(OSError):
                sock = transport.get_extra_info("socket")
                if sock is not None:  # a reset, as a pulled cable or a killed broker gives
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        self._links.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode is not Mode.FORWARD:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            for side in (writer, up_writer):
                self._links.discard(side)
                side.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await reader.read(CHUNK):
                if self.latency:
                    await asyncio.sleep(self.latency)
                if writer.transport.is_closing():
                    return
                writer.write(chunk)
                await writer.drain()
        writer.transport.abort()
