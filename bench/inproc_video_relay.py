"""The video baseline: a seed-like relay in one process, no broker.

`python -m bench.inproc_video_relay --port N` serves, with the `websockets` library:

- `WS /ws/video`: Android packets in (`PacketParser`); SPS and PPS are cached (only those, like
  the seed: no GOP cache), every payload is written to every consumer with `websockets.broadcast`.
- `WS /ws/video/consume`: the cached SPS and PPS at once, then every payload live.
- `GET /readyz`, `GET /healthz`: 200.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from http import HTTPStatus
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bench.loadgen import run_loop
from edgeway.common.video.packets import PacketParser, PacketType


class VideoRelay:
    def __init__(self) -> None:
        self.consumers: set[ServerConnection] = set()
        self.sps: bytes | None = None
        self.pps: bytes | None = None

    async def handler(self, ws: ServerConnection) -> None:
        path = urlsplit(ws.request.path).path if ws.request is not None else ""
        try:
            if path == "/ws/video":
                await self.phone(ws)
            elif path == "/ws/video/consume":
                await self.consume(ws)
            else:
                await ws.close(1008, "unknown endpoint")
        except ConnectionClosed:
            pass

    async def phone(self, ws: ServerConnection) -> None:
        parser = PacketParser()
        async for data in ws:
            if isinstance(data, str):
                continue
            for packet in parser.feed(data):
                if packet.type == PacketType.SPS:
                    self.sps = packet.payload
                elif packet.type == PacketType.PPS:
                    self.pps = packet.payload
                elif packet.type == PacketType.CONFIG:
                    continue
                broadcast(self.consumers, packet.payload)

    async def consume(self, ws: ServerConnection) -> None:
        for cached in (self.sps, self.pps):
            if cached is not None:
                broadcast((ws,), cached)
        self.consumers.add(ws)
        try:
            async for _ in ws:
                pass
        finally:
            self.consumers.discard(ws)


def _health(connection: ServerConnection, request: Request) -> Response | None:
    if request.path in ("/readyz", "/healthz"):
        return connection.respond(HTTPStatus.OK, "ok\n")
    return None


async def main(host: str, port: int) -> None:
    relay = VideoRelay()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(
        relay.handler,
        host,
        port,
        compression=None,
        process_request=_health,
        ping_interval=None,
        max_size=16 * 1024 * 1024,
    ):
        await stop


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("EDGEWAY_HTTP_PORT", 8091)))
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(main(args.host, args.port))


if __name__ == "__main__":
    cli()
