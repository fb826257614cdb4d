"""A service's internal HTTP server, served exactly as every service's is (`service.run`).

`test_http_limits.py` starts this as a process (`python -m http_limits_app`, settings from the
environment) and attacks it with raw sockets. The application is plain ASGI, so what is tested
is the server in front of it, not a framework:

- `GET /healthz` (and any other path): 200, the body never read.
- `POST /echo`: reads the whole body and answers its size. A disconnect before the end raises
  `ClientDisconnect`, as Starlette's `Request.stream()` does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from edgeway.common.logging import configure_logging
from edgeway.common.service import run
from edgeway.common.settings import CommonSettings

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ClientDisconnect(Exception):  # noqa: N818 - Starlette's name, which the server matches
    """Starlette's exception for a client that left while its body was being read."""


async def respond(send: Send, body: dict[str, Any]) -> None:
    data = orjson.dumps(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def app(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] != "/echo":
        await respond(send, {"status": "ok"})
        return
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await respond(send, {"received": received})


def main() -> None:
    settings = CommonSettings()
    configure_logging(service="http-limits-test", level="DEBUG", fmt="json")
    run(app, settings)


if __name__ == "__main__":
    main()
