"""The logger's control connection to the gateway (`WS /telemetry/control/ws?vin=...`).

The client keeps the connection open and reconnects with backoff when it drops. It sends
`{"type":"status",...}` on connect and after every change, and passes on the logger's log lines
as `{"type":"log","message","log_type"}`. Each `{"type":"command",...}` it receives runs a
logger command and is answered with `{"type":"ack","command_id",...status}`, or with an `error`
for a command it does not know. Lines written while the connection is down are kept (the newest
`LOG_LINES_KEPT`) and sent when it comes back.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from edgeway.common.logging import get_logger
from edgeway.edge.pacing import Backoff, Signal

LogType = Literal["info", "success", "warning", "error"]
Command = Callable[[], Awaitable[None]]

CONTROL_PATH = "/telemetry/control/ws"
LOG_LINES_KEPT = 500

log = get_logger(__name__)


def control_url_for(gateway_url: str, vin: str) -> str:
    """`ws(s)://<gateway>/telemetry/control/ws?vin=VIN` for an `http(s)://` gateway URL."""
    parts = urlsplit(gateway_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") + CONTROL_PATH
    return urlunsplit((scheme, parts.netloc, path, urlencode({"vin": vin}), ""))


class ControlClient:
    """`status()` gives the logger's `{"running","offline","buffered"}`; `commands` maps a
    command name to the coroutine that carries it out. Call `changed()` after anything that may
    change the status; `urgent` for a command's change, which is sent at once, while changes of
    `buffered` alone are sent at most once per `status_interval_s` (it moves with every packet).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str,
        status: Callable[[], dict[str, Any]],
        commands: Mapping[str, Command],
        backoff: Backoff | None = None,
        status_interval_s: float = 1.0,
        open_timeout_s: float = 10.0,
    ) -> None:
        self.url = url
        self._token = token
        self._status = status
        self._commands = commands
        self._backoff = backoff if backoff is not None else Backoff()
        self._status_interval_s = status_interval_s
        self._open_timeout_s = open_timeout_s
        self._changed = Signal()
        self._urgent = Signal()
        self._lines: deque[dict[str, Any]] = deque(maxlen=LOG_LINES_KEPT)
        self._line_added = Signal()

    def changed(self, *, urgent: bool = False) -> None:
        if urgent:
            self._urgent.fire()
        self._changed.fire()

    def log(self, message: str, log_type: LogType) -> None:
        self._lines.append({"type": "log", "message": message, "log_type": log_type})
        self._line_added.fire()

    async def run(self) -> None:
        """Keep the connection open until cancelled."""
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        delays = self._backoff.delays()
        trouble: str | None = None  # said once, not at every retry
        while True:
            try:
                async with websockets.connect(
                    self.url,
                    additional_headers=headers,
                    compression=None,
                    proxy=None,
                    open_timeout=self._open_timeout_s,
                ) as connection:
                    delays, trouble = self._backoff.delays(), None
                    log.info("control connected", url=self.url.split("?")[0])
                    await self._serve(connection)
                    why = "closed by the gateway"
            except websockets.InvalidStatus as exc:
                why = f"refused with HTTP {exc.response.status_code}"
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                why = f"{type(exc).__name__}: {exc}"
            if why != trouble:
                log.warning("control connection lost; reconnecting", reason=why)
                trouble = why
            else:
                log.debug("control connection still failing", reason=why)
            await asyncio.sleep(next(delays))

    async def _serve(self, connection: ClientConnection) -> None:
        senders = [
            asyncio.create_task(self._send_statuses(connection)),
            asyncio.create_task(self._send_lines(connection)),
        ]
        try:
            async for raw in connection:
                await self._obey(connection, raw)
        finally:
            for sender in senders:
                sender.cancel()
            # A sender fails only when the connection closed, which ends the loop above too.
            await asyncio.gather(*senders, return_exceptions=True)

    def _current(self) -> dict[str, Any]:
        return {"type": "status", **self._status()}

    async def _send_statuses(self, connection: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        sent: dict[str, Any] | None = None
        sent_at = 0.0
        while True:
            current = self._current()
            if current == sent:
                await self._changed.wait()
                continue
            if sent is not None and (current["running"], current["offline"]) == (
                sent["running"],
                sent["offline"],
            ):
                wait = sent_at + self._status_interval_s - loop.time()
                if wait > 0:
                    await self._urgent.wait(wait)
                    current = self._current()
            await connection.send(orjson.dumps(current).decode())
            sent, sent_at = current, loop.time()

    async def _send_lines(self, connection: ClientConnection) -> None:
        while True:
            while self._lines:
                await connection.send(orjson.dumps(self._lines[0]).decode())
                self._lines.popleft()  # only once sent: a line survives a dropped connection
            await self._line_added.wait()

    async def _obey(self, connection: ClientConnection, raw: str | bytes) -> None:
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("control message is not JSON; ignored")
            return
        if isinstance(message, dict) and message.get("type") == "error":
            # The gateway refused something this client sent (its reason says what).
            log.warning("gateway error on the control connection", reason=message.get("reason"))
            return
        if not isinstance(message, dict) or message.get("type") != "command":
            kind = str(message.get("type"))[:50] if isinstance(message, dict) else "non-object"
            log.info("control message ignored", type=kind)
            return
        name = message.get("command")
        ack: dict[str, Any] = {"type": "ack", "command_id": message.get("command_id")}
        command = self._commands.get(name) if isinstance(name, str) else None
        if command is None:
            ack["error"] = f"unknown command {name!r}; known: {', '.join(self._commands)}"
            log.warning("unknown control command", command=str(name)[:100])
        else:
            await command()
        await connection.send(orjson.dumps({**ack, **self._status()}).decode())
