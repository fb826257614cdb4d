"""Which connection produces for each phone or vehicle on this gateway replica.

One producer per endpoint and name. A second connection for the same phone would interleave its
H.264 chunks with the first's, or speak as it (IMU, log lines, command acks). A connection whose
token speaks for the name (`Principal.speaks_for`) takes the seat over, closing the older one:
a phone that reconnects after a network change is not locked out until its dead socket times
out. Anyone else gets a free seat only: an anonymous producer, where the anonymous scopes let one
in at all (the seed phones send no token), never displaces another connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from starlette.websockets import WebSocket

from edgeway.common.logging import get_logger
from edgeway.common.schemas.errors import ErrorCode
from edgeway.gateway.auth import Identity, Principal

log = get_logger("edgeway.gateway.producers")

# Close code for a producer's socket replaced by a newer one for the same name (policy).
CLOSE_REPLACED = 1008


class SeatRefused(Exception):  # noqa: N818 - a refusal the producer is told about, not a bug
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def check_identity(principal: Principal, kind: Identity, name: str) -> None:
    """Raises SeatRefused when a token is bound to other names than `name`.

    Anonymous callers are bound to nothing and pass here; they may still not displace anyone.
    """
    if principal.anonymous or principal.speaks_for(kind, name):
        return
    raise SeatRefused(
        ErrorCode.FORBIDDEN,
        f"this token may not produce as {kind.value} {name}: its {kind.value} claim "
        f"(or, without one, its subject) must name it",
    )


@dataclass(slots=True)
class _Seat:
    websocket: WebSocket
    principal: Principal


class ProducerSeats:
    """The producing connections of one endpoint, by the device or vehicle they produce for."""

    def __init__(self, endpoint: str, kind: Identity) -> None:
        self.endpoint = endpoint
        self.kind = kind
        self._seats: dict[str, _Seat] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def take(self, name: str, websocket: WebSocket, principal: Principal) -> None:
        """Seat `websocket` for `name`, or raise SeatRefused with the reason."""
        check_identity(principal, self.kind, name)
        seated = self._seats.get(name)
        if seated is not None and seated.websocket is not websocket:
            if not principal.speaks_for(self.kind, name):
                raise SeatRefused(
                    ErrorCode.IN_USE,
                    f"{self.kind.value} {name} is already connected to {self.endpoint}; "
                    f"only a token bound to {name} may replace that connection",
                )
            log.info("producer replaced by a newer connection", endpoint=self.endpoint, name=name)
            task = asyncio.create_task(self._close_replaced(seated.websocket, name))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self._seats[name] = _Seat(websocket, principal)

    def holds(self, name: str, websocket: WebSocket) -> bool:
        seated = self._seats.get(name)
        return seated is not None and seated.websocket is websocket

    def leave(self, name: str, websocket: WebSocket) -> None:
        if self.holds(name, websocket):
            del self._seats[name]

    def __contains__(self, name: str) -> bool:
        return name in self._seats

    async def _close_replaced(self, websocket: WebSocket, name: str) -> None:
        # In the background: a dead peer must not hold up the new connection.
        with contextlib.suppress(Exception):  # it may be gone already
            await websocket.close(
                CLOSE_REPLACED, f"replaced by a newer {self.endpoint} connection for {name}"
            )
