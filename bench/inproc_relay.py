"""The baseline: Omega's path in one process, no broker, no database.

`python -m bench.inproc_relay --port N` serves, with the `websockets` library (no compression):

- `WS /model/ws/connect`: frame results in; each is turned into Omega's client update exactly as
  the occupancy service does it (camera -> location name, `people_detected = total_people`,
  `occupancy_percent = occupied / (free + occupied) * 100`, timestamp unchanged), encoded once
  with orjson and written to every client with `websockets.broadcast` (synchronous, no await per
  client). A frame it cannot transform gets an error frame back, like the gateway's.
- `WS /client/ws/connect`: the latest update of every location at once, then every update.
- `GET /readyz`, `GET /healthz`: 200, so `ServiceProcess` can wait for it.

It is what the suite is compared with: the fastest this fan-out gets in Python on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from http import HTTPStatus

import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bench.loadgen import CLIENT_PATH, MODEL_PATH, PLACES, run_loop


class Relay:
    def __init__(self) -> None:
        self.clients: set[ServerConnection] = set()
        self.latest: dict[str, str] = {}  # location name -> its latest encoded update

    async def handler(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else ""
        try:
            if path == MODEL_PATH:
                await self.model(ws)
            elif path == CLIENT_PATH:
                await self.client(ws)
            else:
                await ws.close(1008, "unknown endpoint")
        except ConnectionClosed:  # a peer that went away without a close frame
            pass

    async def model(self, ws: ServerConnection) -> None:
        loads, dumps, places, clients, latest = (
            orjson.loads,
            orjson.dumps,
            PLACES,
            self.clients,
            self.latest,
        )
        async for raw in ws:
            try:
                frame = loads(raw)
                summary = frame["summary"]
                free, occupied = len(summary["free"]), len(summary["occupied"])
                location = places[frame["camera"]]
                update = {
                    "location_name": location,
                    "timestamp": frame["timestamp"],
                    "people_detected": summary["total_people"],
                    "occupancy_percent": occupied / (free + occupied) * 100,
                }
            except (orjson.JSONDecodeError, KeyError, TypeError, ZeroDivisionError) as exc:
                reason = f"cannot transform: {type(exc).__name__}: {exc}"
                await ws.send(
                    dumps({"type": "error", "code": "invalid", "reason": reason}).decode()
                )
                continue
            text = dumps(update).decode()
            latest[location] = text
            broadcast(clients, text)

    async def client(self, ws: ServerConnection) -> None:
        # Snapshot and subscription with no await in between: nothing is missed or doubled.
        for text in list(self.latest.values()):
            broadcast((ws,), text)
        self.clients.add(ws)
        try:
            async for _ in ws:  # Omega clients send nothing useful; reading notices the close
                pass
        finally:
            self.clients.discard(ws)


def _health(connection: ServerConnection, request: Request) -> Response | None:
    if request.path in ("/readyz", "/healthz"):
        return connection.respond(HTTPStatus.OK, "ok\n")
    return None


async def main(host: str, port: int) -> None:
    relay = Relay()
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
        max_size=1024 * 1024,
    ):
        await stop


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("EDGEWAY_HTTP_PORT", 8090)))
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(main(args.host, args.port))


if __name__ == "__main__":
    cli()
