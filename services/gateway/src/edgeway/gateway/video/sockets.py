"""What every video socket shares: reading a message, device ids and seats, error frames, and the
phone connection that `/ws/phone` and `/ws/video` build on."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, Final

import orjson
from fastapi import WebSocket

from edgeway.common.errors import ErrorObject
from edgeway.common.logging import get_logger
from edgeway.common.schemas.errors import ErrorCode
from edgeway.common.video import check_device
from edgeway.gateway.auth import Scope
from edgeway.gateway.limits import TokenBucket
from edgeway.gateway.producers import ProducerSeats, SeatRefused
from edgeway.gateway.state import Gateway, admit_websocket

OCTET_STREAM = "application/octet-stream"  # the seed's content type for JPEG frames
DEFAULT_DEVICE = "phone"

log = get_logger("edgeway.gateway.video")


def error_frame(code: str, reason: str) -> str:
    """The error object (`edgeway.common.errors`) as WebSocket text."""
    return orjson.dumps(ErrorObject(code=code, reason=reason).body()).decode()


def message_type(message: Any) -> str | None:
    """A JSON message's `type`, or None where it has none that is text (`{"type": {}}` too:
    an object would break the membership tests that route it)."""
    kind = message.get("type") if isinstance(message, dict) else None
    return kind if isinstance(kind, str) else None


# What `decode_json` gives for a message it refused (JSON's `null` is a message like any other).
REFUSED: Final = object()


def decode_json(
    text: str,
    *,
    bucket: TokenBucket,
    reject: Callable[[str, str], None],
    rate_reason: str = "too many messages",
) -> Any:
    """A text message's JSON, within the socket's rate limit; REFUSED once `reject` has told the
    client why (over the rate, or not JSON)."""
    if not bucket.take():
        reject(ErrorCode.RATE_LIMITED.value, rate_reason)
        return REFUSED
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        reject(ErrorCode.MALFORMED_JSON.value, "the message is not valid JSON")
        return REFUSED


async def read_message(websocket: WebSocket) -> str | bytes | None:
    """The next message's text or bytes; None once the client has left."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        return None
    text: str | None = message.get("text")
    if text is not None:
        return text
    data: bytes = message.get("bytes") or b""
    return data


async def admit_device(websocket: WebSocket, device: str) -> bool:
    """After accept: a bad `?device=` gets an error frame and the socket is closed (1008)."""
    reason = check_device(device)
    if reason is None:
        return True
    await websocket.send_text(error_frame(ErrorCode.INVALID_SHAPE.value, reason))
    await websocket.close(1008, "a valid ?device= is required")
    return False


async def admit_phone(
    websocket: WebSocket, gateway: Gateway, seats: ProducerSeats, device: str
) -> bool:
    """A phone's socket, from its upgrade to its device's producer seat: refused before the
    upgrade without a `video:publish` token; after it, a bad `?device=`, a token bound to another
    device or a device connected already (for an unbound caller) get an error frame saying why
    and a close (1008)."""
    principal = await admit_websocket(
        websocket, gateway, scope=Scope.VIDEO_PUBLISH, endpoint=seats.endpoint
    )
    if principal is None:
        return False
    if not await admit_device(websocket, device):
        return False
    try:
        seats.take(device, websocket, principal)
    except SeatRefused as refused:
        gateway.metrics.rejected.labels(seats.endpoint, refused.code.value).inc()
        log.info("phone refused", endpoint=seats.endpoint, device=device, reason=refused.reason)
        await websocket.send_text(error_frame(refused.code.value, refused.reason))
        await websocket.close(1008, refused.code)
        return False
    return True


class PhoneSocket:
    """What a phone's sockets share: the send queue (error frames, acks and commands down),
    the rate limit and the publish window."""

    endpoint: str

    def __init__(self, gateway: Gateway, websocket: WebSocket, device: str) -> None:
        settings = gateway.settings
        self.gateway = gateway
        self.link = gateway.link
        self.websocket = websocket
        self.device = device
        self.connection_id = uuid.uuid4().hex[:12]
        self.send_queue = gateway.producer_queue(websocket, self.endpoint)
        self.bucket = TokenBucket(settings.producer_rate, settings.producer_burst)
        # Up to this many publishes unconfirmed at once, started in arrival order.
        self.window = asyncio.Semaphore(settings.publish_window)
        self.in_flight: set[asyncio.Task[None]] = set()

    def reject(self, code: str, reason: str) -> None:
        self.gateway.metrics.rejected.labels(self.endpoint, code).inc()
        self.send_queue.offer(error_frame(code, reason))

    async def spawn(self, publish: Coroutine[Any, Any, None]) -> None:
        await self.window.acquire()
        task = asyncio.create_task(publish)
        self.in_flight.add(task)
        task.add_done_callback(self._published)

    def _published(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        self.window.release()

    async def confirmed(self, publish: Coroutine[Any, Any, None], *, what: str) -> None:
        """Run one publish; tell the phone if the broker did not take it."""
        try:
            await publish
        except Exception as exc:  # noqa: BLE001 - any broker failure: tell the phone
            log.warning(
                "publish failed", endpoint=self.endpoint, device=self.device, error=repr(exc)
            )
            self.reject(
                ErrorCode.UNAVAILABLE.value, f"{what} not accepted: the broker is unavailable"
            )
            return
        self.gateway.metrics.published.labels(self.endpoint).inc()

    async def drain(self) -> None:
        """What was received is published even if the phone left meanwhile."""
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=self.gateway.settings.graceful_timeout)
